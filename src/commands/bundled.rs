//! The bundled model: `models/qnext-tiny` in the source tree, a small Qwen3-Next trained by
//! `tools/tiny_model/` (Thinking chat template, tool calls, an MTP head). `run`, `score`, `bench`
//! and `serve` use it when no model is named, so a fresh checkout answers a question at once.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The name the server gives the bundled model.
#[cfg(feature = "serve")]
pub const NAME: &str = "qnext-tiny";
const DIR: &str = "models/qnext-tiny";

/// `given`, or the bundled model. Looked for, in order: `$QNEXT_MODEL`; the source tree the
/// binary was built from; the folders above the executable (a `target/release/qnext` inside a
/// checkout); the current directory.
pub fn model_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    if let Some(dir) = std::env::var_os("QNEXT_MODEL") {
        return Ok(PathBuf::from(dir));
    }
    first_present(&candidates())
}

fn first_present(tried: &[PathBuf]) -> Result<PathBuf> {
    if let Some(dir) = tried.iter().find(|d| d.join("config.json").is_file()) {
        eprintln!(
            "qnext: no --model given: using the bundled model {}",
            dir.display()
        );
        return Ok(dir.clone());
    }
    let list: Vec<String> = tried.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "no model given and the bundled model ({DIR}) was not found in {}; name a checkpoint folder \
         (--model DIR, or QNEXT_MODEL=DIR)",
        list.join(", ")
    )
}

fn candidates() -> Vec<PathBuf> {
    let mut out = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(DIR)];
    if let Ok(exe) = std::env::current_exe() {
        out.extend(exe.ancestors().skip(1).take(3).map(|d| d.join(DIR)));
    }
    out.push(PathBuf::from(DIR));
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_folder_with_a_config_wins_and_absence_names_every_place() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("config.json"), "{}").unwrap();
        assert_eq!(first_present(&[a.clone(), b.clone()]).unwrap(), b);
        let err = first_present(std::slice::from_ref(&a))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&a.display().to_string()) && err.contains("--model"),
            "{err}"
        );
    }

    #[test]
    fn a_named_model_is_taken_as_given() {
        let p = PathBuf::from("/some/where");
        assert_eq!(model_dir(Some(p.clone())).unwrap(), p);
    }
}
