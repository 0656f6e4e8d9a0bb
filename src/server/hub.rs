//! Where a model comes from: a local checkpoint folder, or a Hugging Face repo id resolved
//! through the standard Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `models--ORG--NAME/snapshots/<rev>` via `refs/main`), downloading
//! into that cache with `hf-hub` when the files are missing and `HF_HUB_OFFLINE` is not set.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Files a checkpoint needs besides its weights; the optional ones are fetched when present.
const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL_FILES: [&str; 5] = [
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
];

/// The Hugging Face environment, read once so that tests can build their own.
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// The `hub` folder of the cache.
    pub cache_dir: Option<PathBuf>,
    pub offline: bool,
    /// `HF_ENDPOINT`, when set.
    pub endpoint: Option<String>,
    pub revision: String,
}

impl HubEnv {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).or_else(|| {
            let home = var("HF_HOME").map(PathBuf::from).or_else(|| {
                var("XDG_CACHE_HOME")
                    .map(|x| PathBuf::from(x).join("huggingface"))
                    .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))
            })?;
            Some(home.join("hub"))
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
        });
        HubEnv {
            cache_dir,
            offline,
            endpoint: var("HF_ENDPOINT"),
            revision: "main".into(),
        }
    }
}

/// A local folder as is; otherwise a repo id looked up in the cache, then downloaded.
pub fn resolve_model(spec: &str, env: &HubEnv) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if !looks_like_repo_id(spec) {
        bail!("model folder {spec} does not exist (and it is not a Hugging Face repo id)");
    }
    let Some(cache) = env.cache_dir.clone() else {
        bail!(
            "model {spec}: not a local folder, and no Hugging Face cache folder is known \
             (set HF_HOME or HOME)"
        );
    };
    if let Some(dir) = cached_snapshot(&cache, spec, &env.revision) {
        if is_complete(&dir) {
            return Ok(dir);
        }
    }
    let repo_dir = cache.join(repo_folder(spec));
    if env.offline {
        bail!(
            "model {spec} is not a local folder and is not (completely) in the Hugging Face \
             cache at {}; HF_HUB_OFFLINE is set, so it cannot be downloaded",
            repo_dir.display()
        );
    }
    download(spec, env, &cache).with_context(|| {
        format!(
            "model {spec} is not a local folder and is not in the Hugging Face cache at {}, \
             and downloading it from the Hugging Face Hub failed (no network access?); \
             download it beforehand or pass a checkpoint folder",
            repo_dir.display()
        )
    })
}

/// `org/name` or `name`, with the characters the Hub allows.
fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (parts.len() == 1 || parts.len() == 2) && parts.iter().all(|p| ok(p))
}

fn repo_folder(spec: &str) -> String {
    format!("models--{}", spec.replace('/', "--"))
}

/// The snapshot the revision's ref points at; with no ref, a single snapshot if there is only
/// one (a cache filled by `snapshot_download(revision=<hash>)`).
fn cached_snapshot(cache: &Path, spec: &str, revision: &str) -> Option<PathBuf> {
    let repo = cache.join(repo_folder(spec));
    let snapshots = repo.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(repo.join("refs").join(revision)) {
        let dir = snapshots.join(hash.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let direct = snapshots.join(revision);
    if direct.is_dir() {
        return Some(direct);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    (dirs.len() == 1).then(|| dirs.remove(0))
}

fn is_complete(dir: &Path) -> bool {
    REQUIRED_FILES.iter().all(|f| dir.join(f).exists())
        && (dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists())
}

fn download(spec: &str, env: &HubEnv, cache: &Path) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_progress(true)
        .with_retries(1);
    if let Some(e) = &env.endpoint {
        builder = builder.with_endpoint(e.clone());
    }
    let api = builder
        .build()
        .context("setting up the Hugging Face client")?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        spec.to_owned(),
        hf_hub::RepoType::Model,
        env.revision.clone(),
    ));
    let info = repo.info().context("reading the repository's file list")?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut dir = None;
    for name in files.iter().filter(|f| {
        REQUIRED_FILES.contains(&f.as_str())
            || OPTIONAL_FILES.contains(&f.as_str())
            || (f.ends_with(".safetensors") && !f.contains('/'))
    }) {
        let path = repo
            .get(name)
            .with_context(|| format!("downloading {name}"))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    match dir {
        Some(d) if is_complete(&d) => Ok(d),
        _ => bail!("the repository has no config.json, tokenizer.json and safetensors weights"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("Qwen/Qwen3-Next-80B-A3B-Instruct"));
        assert!(looks_like_repo_id("gpt2"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert_eq!(repo_folder("Qwen/X"), "models--Qwen--X");
    }
}
