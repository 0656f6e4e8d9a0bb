//! JSON that keeps object keys in the order they were written.
//!
//! Chat templates print tools with `tojson`, and Python's `json.dumps` keeps dict insertion
//! order, so the prompt depends on the key order of the request. `serde_json::Value` sorts keys
//! unless the crate's `preserve_order` feature is on; [`OrderedJson`] does not depend on it.
//! It is also the bridge to template values: objects become a minijinja map object that
//! enumerates its keys in order.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// A JSON value whose objects are ordered lists of entries.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderedJson {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    String(String),
    Array(Vec<OrderedJson>),
    Object(Vec<(String, OrderedJson)>),
}

impl OrderedJson {
    /// Parses JSON text, keeping key order. A repeated key keeps its first position and its last
    /// value, as Python's `json.loads` does.
    pub fn parse(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// Looks a key up in an object (`None` for other kinds).
    pub fn get(&self, key: &str) -> Option<&OrderedJson> {
        match self {
            OrderedJson::Object(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            OrderedJson::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, OrderedJson::Null)
    }

    /// Short name of the JSON kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            OrderedJson::Null => "null",
            OrderedJson::Bool(_) => "a boolean",
            OrderedJson::Int(_) | OrderedJson::UInt(_) | OrderedJson::Float(_) => "a number",
            OrderedJson::String(_) => "a string",
            OrderedJson::Array(_) => "an array",
            OrderedJson::Object(_) => "an object",
        }
    }

    /// The template value: arrays become sequences, objects become ordered maps.
    pub fn to_template_value(&self) -> Value {
        match self {
            OrderedJson::Null => Value::from(()),
            OrderedJson::Bool(b) => Value::from(*b),
            OrderedJson::Int(i) => Value::from(*i),
            OrderedJson::UInt(u) => Value::from(*u),
            OrderedJson::Float(f) => Value::from(*f),
            OrderedJson::String(s) => Value::from(s.as_str()),
            OrderedJson::Array(items) => Value::from(
                items
                    .iter()
                    .map(Self::to_template_value)
                    .collect::<Vec<_>>(),
            ),
            OrderedJson::Object(entries) => Value::from_object(OrderedMap::new(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_template_value()))
                    .collect(),
            )),
        }
    }
}

impl From<&serde_json::Value> for OrderedJson {
    /// Key order is kept only as far as `serde_json` kept it (see the module docs).
    fn from(v: &serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => OrderedJson::Null,
            serde_json::Value::Bool(b) => OrderedJson::Bool(*b),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    OrderedJson::Int(i)
                } else if let Some(u) = n.as_u64() {
                    OrderedJson::UInt(u)
                } else {
                    OrderedJson::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            serde_json::Value::String(s) => OrderedJson::String(s.clone()),
            serde_json::Value::Array(a) => OrderedJson::Array(a.iter().map(Self::from).collect()),
            serde_json::Value::Object(m) => {
                OrderedJson::Object(m.iter().map(|(k, v)| (k.clone(), Self::from(v))).collect())
            }
        }
    }
}

impl<'de> Deserialize<'de> for OrderedJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OrderedJsonVisitor)
    }
}

struct OrderedJsonVisitor;

impl<'de> Visitor<'de> for OrderedJsonVisitor {
    type Value = OrderedJson;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<OrderedJson, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => OrderedJson::Int(i),
            Err(_) => OrderedJson::UInt(v),
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<OrderedJson, E> {
        Ok(OrderedJson::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<OrderedJson, E> {
        Ok(OrderedJson::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<OrderedJson, D::Error> {
        OrderedJson::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OrderedJson, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(OrderedJson::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedJson, A::Error> {
        let mut entries: Vec<(String, OrderedJson)> = Vec::new();
        // An index, so that an object with many keys is not quadratic to parse.
        let mut index: HashMap<String, usize> = HashMap::new();
        while let Some((key, value)) = map.next_entry::<String, OrderedJson>()? {
            match index.get(&key) {
                Some(&i) => entries[i].1 = value,
                None => {
                    index.insert(key.clone(), entries.len());
                    entries.push((key, value));
                }
            }
        }
        Ok(OrderedJson::Object(entries))
    }
}

impl Serialize for OrderedJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            OrderedJson::Null => s.serialize_unit(),
            OrderedJson::Bool(b) => s.serialize_bool(*b),
            OrderedJson::Int(i) => s.serialize_i64(*i),
            OrderedJson::UInt(u) => s.serialize_u64(*u),
            OrderedJson::Float(f) => s.serialize_f64(*f),
            OrderedJson::String(v) => s.serialize_str(v),
            OrderedJson::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            OrderedJson::Object(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// A template map that enumerates its keys in insertion order (minijinja's own maps are sorted
/// unless its `preserve_order` feature is on).
#[derive(Debug)]
struct OrderedMap {
    entries: Vec<(String, Value)>,
    /// Key → position, only for maps large enough for a linear search to hurt.
    index: Option<HashMap<String, usize>>,
}

impl OrderedMap {
    const INDEX_FROM: usize = 16;

    fn new(entries: Vec<(String, Value)>) -> Self {
        let index = (entries.len() >= Self::INDEX_FROM).then(|| {
            entries
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect()
        });
        Self { entries, index }
    }
}

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        let pos = match &self.index {
            Some(index) => *index.get(key)?,
            None => self.entries.iter().position(|(k, _)| k == key)?,
        };
        Some(self.entries[pos].1.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.entries
                .iter()
                .map(|(k, _)| Value::from(k.as_str()))
                .collect(),
        )
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.entries.len())
    }
}
