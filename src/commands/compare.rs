//! `qnext compare`: what checkpoint B costs against checkpoint A on the same text (e.g. an FP8
//! checkpoint against the BF16 it was quantised from).

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use qnext::checkpoint::LoadMode;
use qnext::engine::compare::{self, Position, Summary};
use std::path::{Path, PathBuf};

#[derive(ClapArgs)]
pub struct Args {
    /// The two checkpoint folders: --model A --model B. B is measured against A.
    #[arg(long = "model", num_args = 1, required = true)]
    models: Vec<PathBuf>,
    #[command(flatten)]
    tokens: super::score::TokensArg,
    /// Only the first N tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Positions per forward call.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// One model at a time: A's log-probabilities go to a temporary file, then B reads them
    /// back. Chosen by itself when the two checkpoints do not fit in the available memory.
    #[arg(long)]
    sequential: bool,
    /// One JSON object on stdout, with every position's figures.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    precision: super::PrecisionArg,
}

/// Bytes of a checkpoint's safetensors files.
fn weight_file_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Removes the spill file however the comparison ends.
struct Spill(PathBuf);

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn main(args: Args, verbose: bool) -> Result<()> {
    let [a_dir, b_dir] = <[PathBuf; 2]>::try_from(args.models.clone())
        .map_err(|m| anyhow::anyhow!("give --model twice (A, then B); got {}", m.len()))?;
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    let mut ids = args.tokens.read(&a_dir)?;
    ids.truncate(args.max_tokens.unwrap_or(usize::MAX));
    let (a_bytes, b_bytes) = (weight_file_bytes(&a_dir), weight_file_bytes(&b_dir));
    let available = qnext::procfs::kb_field("/proc/meminfo", "MemAvailable:");
    // Both mapped at once, they must stay resident: a pass that pages one out to read the
    // other would re-read both from disk on every chunk.
    let sequential =
        args.sequential || available.is_some_and(|m| (a_bytes + b_bytes) as f64 > 0.9 * m as f64);
    let pb = qnext::progress::bar(ids.len() as u64 - 1, "comparing");
    let t0 = std::time::Instant::now();
    let load = |dir: &Path| -> Result<qnext::model::Model> {
        let mut m = super::load_model(dir, verbose, LoadMode::Mmap)?;
        args.precision.apply(&mut m);
        Ok(m)
    };
    let positions = if sequential {
        let path = std::env::temp_dir().join(format!("qnext-compare-{}.f32", std::process::id()));
        let spill = Spill(path);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spill.0)
            .with_context(|| format!("cannot create {}", spill.0.display()))?;
        let vocab = {
            let a = load(&a_dir)?;
            compare::check_tokens(&a, &ids)?;
            pb.set_message("A alone");
            compare::first_pass(&a, &ids, args.chunk, &mut file, |p| {
                pb.set_position(p as u64)
            })?;
            a.cfg.vocab_size
        };
        let b = load(&b_dir)?;
        pb.set_message("B against A");
        compare::second_pass(vocab, &b, &ids, args.chunk, &mut file, |p| {
            pb.set_position(p as u64)
        })?
    } else {
        let (a, b) = (load(&a_dir)?, load(&b_dir)?);
        compare::together(&a, &b, &ids, args.chunk, |p| pb.set_position(p as u64))?
    };
    pb.finish_and_clear();
    let s = compare::summarize(&positions);
    if args.json {
        println!("{}", to_json(&a_dir, &b_dir, &ids, &s, &positions));
    } else {
        print_summary(&a_dir, &b_dir, &s);
    }
    if verbose {
        eprintln!(
            "{} positions in {:.1} s ({})",
            s.positions,
            t0.elapsed().as_secs_f64(),
            if sequential {
                "one model at a time"
            } else {
                "both models together"
            }
        );
    }
    Ok(())
}

fn print_summary(a: &Path, b: &Path, s: &Summary) {
    println!("A: {}", a.display());
    println!("B: {}", b.display());
    println!("positions        {}", s.positions);
    println!("perplexity A     {:.4}", s.perplexity_a);
    println!(
        "perplexity B     {:.4} ({:+.3} %)",
        s.perplexity_b,
        100.0 * (s.perplexity_b / s.perplexity_a - 1.0)
    );
    println!("KL(A||B) mean    {:.6}", s.kl_mean);
    println!("KL(A||B) median  {:.6}", s.kl_median);
    println!("KL(A||B) p99     {:.6}", s.kl_p99);
    println!("KL(A||B) max     {:.6}", s.kl_max);
    println!("top-1 agreement  {:.2} %", 100.0 * s.top1_agreement);
}

fn to_json(a: &Path, b: &Path, ids: &[u32], s: &Summary, ps: &[Position]) -> serde_json::Value {
    serde_json::json!({
        "model_a": a.display().to_string(),
        "model_b": b.display().to_string(),
        "tokens": ids.len(),
        "positions": s.positions,
        "perplexity_a": s.perplexity_a,
        "perplexity_b": s.perplexity_b,
        "kl_mean": s.kl_mean,
        "kl_median": s.kl_median,
        "kl_p99": s.kl_p99,
        "kl_max": s.kl_max,
        "top1_agreement": s.top1_agreement,
        "per_position": {
            "next_token": &ids[1..],
            "nll_a": ps.iter().map(|p| p.nll_a).collect::<Vec<_>>(),
            "nll_b": ps.iter().map(|p| p.nll_b).collect::<Vec<_>>(),
            "kl": ps.iter().map(|p| p.kl).collect::<Vec<_>>(),
            "top1_a": ps.iter().map(|p| p.top_a).collect::<Vec<_>>(),
            "top1_b": ps.iter().map(|p| p.top_b).collect::<Vec<_>>(),
        },
    })
}
