//! Finding, mapping and indexing the safetensors files of a checkpoint folder.

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::view::{DType, TensorRef};

/// Where tensor bytes live once a checkpoint is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// `HugePages` where the machine has the memory for the copy with room to spare, else
    /// `Populate` ([`LoadMode::resolve`]).
    Auto,
    /// Mapped from the files, paged in on first use (fast start; tests, scoring).
    Mmap,
    /// Mapped from the files, every page read in up front (MAP_POPULATE).
    Populate,
    /// Copied into anonymous memory on 2 MiB transparent huge pages (advised, then collapsed),
    /// sparing the TLB a miss and the hardware prefetchers a restart per 4 KiB page: decode
    /// measured 3–4 % faster than `Populate` (BENCHMARKS.md). Resident memory is the same.
    HugePages,
}

impl LoadMode {
    /// The mode `Auto` stands for with the checkpoint in `dir`; other modes as they are.
    ///
    /// A copy on huge pages is pinned memory (without swap it cannot be given back, unlike a
    /// file mapping), so `Auto` takes it only when the weights, an eighth more and 2 GiB for
    /// caches and activations fit in what the kernel reports available. Page cache counts as
    /// available: the copy itself passes through it and may evict it.
    pub fn resolve(self, dir: &Path) -> LoadMode {
        if self != LoadMode::Auto {
            return self;
        }
        let weights: u64 = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let available = crate::procfs::kb_field("/proc/meminfo", "MemAvailable:").unwrap_or(0);
        if available >= weights + weights / 8 + (2 << 30) {
            LoadMode::HugePages
        } else {
            LoadMode::Populate
        }
    }
}

struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

struct Entry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range inside the whole file (header included).
    start: usize,
    end: usize,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    shards: Vec<Shard>,
    /// The shards are mappings of their files (not copies in anonymous memory).
    file_backed: bool,
    tensors: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `dir`: `model.safetensors.index.json` + its shards, or `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        Checkpoint::open_with(dir, LoadMode::Mmap)
    }

    /// Like [`Checkpoint::open`], placing the tensors as `mode` says.
    pub fn open_with(dir: &Path, mode: LoadMode) -> Result<Checkpoint> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let mode = mode.resolve(dir);
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let (files, weight_map) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    anyhow!("{}: field `weight_map` is missing", index_path.display())
                })?;
            let mut weight_map = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: `weight_map.{name}` is not a file name",
                        index_path.display()
                    )
                })?;
                // Shards are files of this folder: a name with a path in it would have qnext
                // map whatever file (or device) an index written by someone else points to.
                let plain = Path::new(file)
                    .file_name()
                    .is_some_and(|f| f == std::ffi::OsStr::new(file));
                if !plain || file.contains('\\') {
                    bail!(
                        "{}: `weight_map.{name}` is {file:?}, not the name of a file in the \
                         checkpoint folder",
                        index_path.display()
                    );
                }
                weight_map.insert(name.clone(), file.to_owned());
            }
            let mut files: Vec<String> = weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, Some(weight_map))
        } else if single.exists() {
            (vec!["model.safetensors".to_owned()], None)
        } else {
            bail!(
                "no model.safetensors or model.safetensors.index.json in {}",
                dir.display()
            );
        };

        let pb = crate::progress::bar(files.len() as u64, "mapping shards");
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (i, name) in files.iter().enumerate() {
            let path = dir.join(name);
            let file_map = map_file(&path)?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&file_map).map_err(|e| {
                    anyhow!(
                        "{} is truncated or not a valid safetensors file ({e:?})",
                        path.display()
                    )
                })?;
            let data_start = 8 + header_len;
            // The bytes the model reads: the header and every tensor but the vision tower's.
            let mut wanted: Vec<(usize, usize)> = meta
                .tensors()
                .iter()
                .filter(|(n, _)| !never_loaded(n))
                .map(|(_, t)| (data_start + t.data_offsets.0, data_start + t.data_offsets.1))
                .collect();
            wanted.push((0, data_start));
            let map = match mode {
                LoadMode::HugePages => copy_to_huge_pages(&path, file_map.len(), &wanted)?,
                LoadMode::Populate => {
                    read_ahead(&file_map, &wanted);
                    file_map
                }
                _ => file_map,
            };
            for (tname, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let prev = tensors.insert(
                    tname.clone(),
                    Entry {
                        shard: i,
                        dtype: DType::from_safetensors(info.dtype),
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
                if prev.is_some() {
                    bail!(
                        "tensor `{tname}` appears in more than one file ({})",
                        path.display()
                    );
                }
            }
            shards.push(Shard {
                path,
                map: Arc::new(map),
            });
            pb.inc(1);
        }
        pb.finish_and_clear();

        if let Some(wm) = weight_map {
            for (name, file) in &wm {
                match tensors.get(name) {
                    None => bail!(
                        "tensor `{name}` is listed in {} but missing from {file}",
                        index_path.display()
                    ),
                    Some(e)
                        if shards[e.shard].path.file_name().and_then(|f| f.to_str())
                            != Some(file) =>
                    {
                        bail!(
                            "tensor `{name}` is listed in {} under {file} but found in {}",
                            index_path.display(),
                            shards[e.shard].path.display()
                        )
                    }
                    _ => {}
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_owned(),
            shards,
            file_backed: mode != LoadMode::HugePages,
            tensors,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, e) = self.tensors.get_key_value(name).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` is missing from the checkpoint in {}",
                self.dir.display()
            )
        })?;
        if !self.file_backed && never_loaded(name) {
            bail!(
                "tensor `{name}` of {} belongs to the vision tower, which qnext does not load",
                self.dir.display()
            );
        }
        let shard = &self.shards[e.shard];
        Ok(TensorRef {
            name: key,
            file: &shard.path,
            dtype: e.dtype,
            shape: &e.shape,
            map: &shard.map,
            range: e.start..e.end,
        })
    }

    /// The shard files in order, each with its tensors in the order of their bytes.
    pub fn layout(&self) -> Vec<(&Path, Vec<&str>)> {
        let mut per: Vec<Vec<(usize, &str)>> = vec![Vec::new(); self.shards.len()];
        for (name, e) in &self.tensors {
            per[e.shard].push((e.start, name));
        }
        self.shards
            .iter()
            .zip(per)
            .map(|(s, mut t)| {
                t.sort_unstable();
                (s.path.as_path(), t.into_iter().map(|(_, n)| n).collect())
            })
            .collect()
    }

    /// Drops shard `i`'s pages from this process (they stay in the page cache), for a pass
    /// that reads each shard once, such as quantisation: resident memory stays at about one
    /// shard instead of growing to the whole checkpoint. Reading the shard again faults its
    /// pages back in from the file; a copy made with `--load hugepages` is left as it is.
    pub fn release_shard(&self, i: usize) {
        let map = &self.shards[i].map;
        // An anonymous mapping (the hugepages copy) would be zeroed: only file mappings.
        if self.file_backed {
            // SAFETY: MADV_DONTNEED on a read-only, private, file-backed mapping that was
            // never written discards only clean pages, and the next access reads them again
            // from the same file: every reference into the mapping keeps seeing the same bytes.
            let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Total bytes of tensor data, by dtype name.
    pub fn bytes_by_dtype(&self) -> BTreeMap<String, (usize, usize)> {
        let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for e in self.tensors.values() {
            let slot = out.entry(e.dtype.name()).or_default();
            slot.0 += 1;
            slot.1 += e.end - e.start;
        }
        out
    }
}

/// Tensors the engine never reads: the vision tower of the Qwen3.5 / 3.6 releases (text only
/// here). Neither copied nor read ahead, so they cost neither memory nor load time (≈ 0.9 GB
/// in Qwen3.6-35B-A3B).
fn never_loaded(name: &str) -> bool {
    name.starts_with("model.visual.")
}

/// Byte ranges merged where they touch or overlap, in order.
fn merged(ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut r = ranges.to_vec();
    r.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `MADV_POPULATE_READ` (Linux ≥ 5.14; not in every `libc` release): fault a range in now.
const MADV_POPULATE_READ: libc::c_int = 22;

/// Reads the pages of `ranges` of a file mapping now (what `MAP_POPULATE` does for all of it).
fn read_ahead(map: &Mmap, ranges: &[(usize, usize)]) {
    const PAGE: usize = 4096;
    for (s, e) in merged(ranges) {
        let start = s / PAGE * PAGE;
        // SAFETY: [start, e) lies inside the mapping (start rounds down within its first
        // page, and mappings start on a page); MADV_POPULATE_READ only faults pages in,
        // never changes what they read.
        let done = unsafe {
            libc::madvise(
                map.as_ptr().add(start) as *mut libc::c_void,
                e - start,
                MADV_POPULATE_READ,
            )
        } == 0;
        if !done {
            // Older kernels: touch a byte per page.
            let sum = (s..e).step_by(PAGE).fold(0u8, |acc, at| acc ^ map[at]);
            std::hint::black_box(sum);
        }
    }
}

/// Copies `ranges` of a file into a read-only anonymous mapping of its size advised to use
/// transparent huge pages; the rest of the mapping is never touched (no memory).
fn copy_to_huge_pages(path: &Path, len: usize, ranges: &[(usize, usize)]) -> Result<Mmap> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut anon = memmap2::MmapMut::map_anon(len.max(1))
        .with_context(|| format!("cannot allocate {len} bytes for {}", path.display()))?;
    // Only a hint: without THP support the copy still works, on small pages.
    let _ = anon.advise(memmap2::Advice::HugePage);
    let ranges = merged(ranges);
    // Read, not copied from a mapping of the file: its pages would count as this process's
    // memory while they are mapped.
    for &(s, e) in &ranges {
        f.read_exact_at(&mut anon[s..e], s as u64)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    for &(s, e) in &ranges {
        collapse_to_huge_pages(&mut anon[s..e]);
    }
    anon.make_read_only()
        .with_context(|| format!("cannot protect the copy of {}", path.display()))
}

/// `MADV_COLLAPSE` (Linux ≥ 6.1; not yet in the `libc` crate): collapse a range into
/// transparent huge pages now, where page faults could only get small pages (free memory
/// fragmented, e.g. by the page cache that the copy came through).
const MADV_COLLAPSE: libc::c_int = 25;

/// Asks the kernel to back `map` with 2 MiB pages. Best effort: older kernels answer
/// `EINVAL`, and a range the kernel cannot collapse stays on small pages; both work the same,
/// only with more TLB misses (`bench` reports how much of the process is on huge pages).
fn collapse_to_huge_pages(range: &mut [u8]) {
    const HUGE: usize = 2 << 20;
    // Whole 2 MiB pages inside the range only: collapsing one that reaches into bytes never
    // copied would allocate them.
    let start = (range.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (range.as_ptr() as usize + range.len()) / HUGE * HUGE;
    if end <= start {
        return;
    }
    // SAFETY: [start, end) lies inside `range`, part of this process's own private anonymous
    // mapping, alive for the call; MADV_COLLAPSE keeps its contents (it copies them into the
    // huge pages it allocates).
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, MADV_COLLAPSE);
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let opts = memmap2::MmapOptions::new();
    // SAFETY: the mapping is read-only and checkpoint files are treated as immutable while
    // qnext runs; a file truncated or rewritten underneath a running process is outside what
    // any mmap-based loader (safetensors, llama.cpp, vLLM) can defend against.
    let map = unsafe { opts.map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index whose shard names carry a path (out of the folder, or to a device) is refused
    /// before anything is opened, naming the entry.
    #[test]
    fn shard_names_are_plain_file_names() {
        for bad in [
            "../model.safetensors",
            "/dev/zero",
            "sub/model.safetensors",
            "..",
            "",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": bad}});
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
            let e = format!("{:#}", Checkpoint::open(dir.path()).err().unwrap());
            assert!(
                e.contains("weight_map.model.embed_tokens.weight") && e.contains("not the name"),
                "{bad:?}: {e}"
            );
        }
    }

    /// Every mode serves the same bytes for every tensor, and `Auto` resolves to a concrete
    /// mode.
    #[test]
    fn load_modes_serve_the_same_bytes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fp8-bf16scale");
        assert_ne!(LoadMode::Auto.resolve(&dir), LoadMode::Auto);
        let base = Checkpoint::open_with(&dir, LoadMode::Mmap).unwrap();
        for mode in [LoadMode::Auto, LoadMode::Populate, LoadMode::HugePages] {
            let other = Checkpoint::open_with(&dir, mode).unwrap();
            let mut names: Vec<&str> = base.names().collect();
            names.sort();
            assert_eq!(other.names().count(), names.len());
            for name in names {
                let (a, b) = (base.get(name).unwrap(), other.get(name).unwrap());
                assert_eq!(a.bytes(), b.bytes(), "{name} differs under {mode:?}");
            }
        }
    }

    /// A Qwen3.5 checkpoint's vision tower is not copied: in the huge-page copy its tensors
    /// are refused by name, everything else reads as in the files (two shards, the vision
    /// tensors between text ones); mapped from the files, all of them read.
    #[test]
    fn vision_tower_is_not_loaded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/q35-moe-bf16");
        let base = Checkpoint::open_with(&dir, LoadMode::Mmap).unwrap();
        let visual: Vec<&str> = base.names().filter(|n| never_loaded(n)).collect();
        assert!(visual.len() > 5, "fixture without a vision tower");
        for mode in [LoadMode::Populate, LoadMode::HugePages] {
            let other = Checkpoint::open_with(&dir, mode).unwrap();
            for name in base.names() {
                let a = base.get(name).unwrap();
                match other.get(name) {
                    Ok(b) => assert_eq!(a.bytes(), b.bytes(), "{name} differs under {mode:?}"),
                    Err(e) => {
                        assert!(
                            mode == LoadMode::HugePages && never_loaded(name),
                            "{name}: {e}"
                        );
                        assert!(e.to_string().contains("vision tower"), "{e}");
                    }
                }
            }
        }
        assert_eq!(
            merged(&[(10, 20), (0, 5), (5, 8), (19, 30), (40, 41)]),
            vec![(0, 8), (10, 30), (40, 41)]
        );
    }
}
