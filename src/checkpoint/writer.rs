//! Streaming safetensors writers: the header is computed from the tensor list up front, then
//! each tensor's bytes are produced and written, in order or several at once at their offsets,
//! so only one tensor per thread is ever in memory.

use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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

/// The header bytes (length prefix included) for `specs` in order, and each tensor's offset
/// in the file.
fn header(specs: &[TensorSpec]) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    let mut offsets = Vec::with_capacity(specs.len());
    for s in specs {
        let end = off + s.bytes();
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype.name(), "shape": s.shape, "data_offsets": [off, end]}),
        );
        offsets.push(off as u64);
        off = end;
    }
    let mut text = serde_json::to_string(&header)?;
    // Pad so the data section starts 8-byte aligned, as the reference writer does.
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let start = (8 + text.len()) as u64;
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    Ok((bytes, offsets.into_iter().map(|o| o + start).collect()))
}

fn check_len(s: &TensorSpec, data: &[u8], path: &Path) -> Result<()> {
    if data.len() != s.bytes() {
        bail!(
            "tensor `{}` for {}: produced {} bytes, expected {}",
            s.name,
            path.display(),
            data.len(),
            s.bytes()
        );
    }
    Ok(())
}

/// Writes `specs` to `path`; `fill(spec)` returns each tensor's little-endian bytes.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    mut fill: impl FnMut(&TensorSpec) -> Result<Vec<u8>>,
) -> Result<()> {
    let (head, _) = header(specs)?;
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 22, f);
    w.write_all(&head)?;
    for s in specs {
        let data = fill(s)?;
        check_len(s, &data, path)?;
        w.write_all(&data)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    w.flush()?;
    Ok(())
}

/// The tensor bytes of one group, borrowed (e.g. from a mapped input) or made.
pub type Parts<'a> = Vec<Cow<'a, [u8]>>;

/// Like [`write_safetensors`], with the tensors made on `threads` threads at once and each
/// written at its place: `groups` cuts `specs` into consecutive runs that `fill(g)` makes
/// together (a weight and its scales), in any order. Each thread holds one group at a time.
/// Stops at the first error, which it returns.
pub fn write_safetensors_parallel<'a>(
    path: &Path,
    specs: &[TensorSpec],
    groups: &[Range<usize>],
    threads: usize,
    fill: &(dyn Fn(usize) -> Result<Parts<'a>> + Sync),
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let (head, offsets) = header(specs)?;
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all_at(&head, 0)
        .with_context(|| format!("writing {}", path.display()))?;
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let work = || loop {
        let g = next.fetch_add(1, Ordering::Relaxed);
        if g >= groups.len() || failed.lock().map_or(true, |e| e.is_some()) {
            return;
        }
        let result = fill(g).and_then(|parts| {
            if parts.len() != groups[g].len() {
                bail!(
                    "group {g} of {}: {} parts for {} tensors",
                    path.display(),
                    parts.len(),
                    groups[g].len()
                );
            }
            for (i, data) in groups[g].clone().zip(&parts) {
                check_len(&specs[i], data, path)?;
                f.write_all_at(data, offsets[i])
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        });
        if let Err(e) = result {
            let mut slot = failed.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads.max(1) {
            s.spawn(work);
        }
        work();
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(())
}
