//! One module per subcommand.

pub mod bench;
mod bench_speculation;
pub mod bundled;
pub mod compare;
pub mod inspect;
pub mod quantize;
#[cfg(feature = "serve")]
pub mod render_worker;
pub mod run;
pub mod score;
#[cfg(feature = "serve")]
pub mod serve;
pub mod synth;

use anyhow::Result;
use qnext::checkpoint::LoadMode;
use qnext::kernels::matmul::Precision;
use qnext::model::Model;
use std::path::Path;
use std::time::Instant;

/// Loads a model, reporting time and resident memory when `verbose`.
pub fn load_model(dir: &Path, verbose: bool, mode: LoadMode) -> Result<Model> {
    let t0 = Instant::now();
    let mode = mode.resolve(dir);
    let model = Model::load_with(dir, mode)?;
    if verbose {
        let (all, active) = model.weight_bytes();
        eprintln!(
            "loaded {} ({mode:?}) in {:.2}s: {:.2} GB of weights, {:.1} MB read per token, RSS {:.1} MB",
            dir.display(),
            t0.elapsed().as_secs_f64(),
            all as f64 / 1e9,
            active as f64 / 1e6,
            rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }
    Ok(model)
}

/// Resident set size from /proc (Linux only).
pub fn rss_bytes() -> Option<u64> {
    qnext::procfs::kb_field("/proc/self/status", "VmRSS:")
}

/// `--load`: where the weights live once loaded.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct LoadArg {
    /// auto (the default): hugepages where the machine has the memory for the copy with room
    /// to spare, else populate. mmap: map the files (fast start, pages fault in on use);
    /// populate: map and read every page now; hugepages: copy into anonymous memory on 2 MiB
    /// pages (decode measured fastest, see BENCHMARKS.md).
    #[arg(long = "load", value_enum, default_value_t = LoadChoice::Auto)]
    pub load: LoadChoice,
}

/// `--exact`, `--lm-head`: how the matrix products round.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct PrecisionArg {
    /// f32 activations and accumulation in every matrix product, weights as stored (the
    /// reference semantics). Default: bfloat16 dot products for BF16 and FP8 weights where
    /// the CPU has AVX-512 BF16 (about twice as fast in prefill; tolerance in BENCHMARKS.md);
    /// on CPUs with AVX2 but no AVX-512, f32 kernels that apply FP8 block scales to the
    /// activations (decode ≈ 1.2× faster on a Zen 3).
    #[arg(long)]
    pub exact: bool,
    /// stored: lm_head as the checkpoint has it (BF16 in the FP8 releases). q8: an 8-bit
    /// copy made at load (sign + 7-bit integer, one scale per 128×128 block): half the bytes
    /// of a BF16 lm_head, 16 % of a decode step's, at a small cost in logit accuracy
    /// (BENCHMARKS.md).
    #[arg(long = "lm-head", value_enum, default_value_t = LmHeadChoice::Stored)]
    pub lm_head: LmHeadChoice,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LmHeadChoice {
    Stored,
    Q8,
}

impl PrecisionArg {
    pub fn precision(self) -> Precision {
        if self.exact {
            Precision::Exact
        } else {
            Precision::Fast
        }
    }

    /// Sets the model's precision and, with `--lm-head q8`, requantizes its `lm_head`.
    pub fn apply(self, model: &mut Model) {
        model.precision = self.precision();
        if self.lm_head == LmHeadChoice::Q8 {
            model.quantize_lm_head();
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadChoice {
    Auto,
    Mmap,
    Populate,
    Hugepages,
}

impl LoadArg {
    pub fn mode(self) -> LoadMode {
        match self.load {
            LoadChoice::Auto => LoadMode::Auto,
            LoadChoice::Mmap => LoadMode::Mmap,
            LoadChoice::Populate => LoadMode::Populate,
            LoadChoice::Hugepages => LoadMode::HugePages,
        }
    }
}
