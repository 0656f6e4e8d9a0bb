//! Memory figures from Linux's `/proc` files (absent elsewhere: callers treat `None` as
//! unknown).

/// A `kB` field of a `/proc` file (e.g. `("/proc/self/status", "VmHWM:")`), in bytes.
pub fn kb_field(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
