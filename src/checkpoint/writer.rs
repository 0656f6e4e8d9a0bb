//! Streaming safetensors writer: the header is computed from the tensor list up front, then
//! each tensor's bytes are produced and written in order, so only one tensor is ever in memory.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::view::DType;

pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Writes `specs` to `path`; `fill(spec)` returns each tensor's little-endian bytes.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    mut fill: impl FnMut(&TensorSpec) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for s in specs {
        let end = off + s.bytes();
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype.name(), "shape": s.shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut text = serde_json::to_string(&header)?;
    // Pad so the data section starts 8-byte aligned, as the reference writer does.
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 22, f);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    for s in specs {
        let data = fill(s)?;
        if data.len() != s.bytes() {
            bail!(
                "tensor `{}`: produced {} bytes, expected {}",
                s.name,
                data.len(),
                s.bytes()
            );
        }
        w.write_all(&data)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    w.flush()?;
    Ok(())
}
