//! `qnext score`: log-probability of every token given its prefix.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args as ClapArgs;
use qnext::engine::score::{next_token_logprobs, Feed};
use std::path::{Path, PathBuf};

#[derive(ClapArgs)]
pub struct Args {
    /// Checkpoint folder (with tokenizer.json). Default: the bundled model, models/qnext-tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(skip)]
    dir: PathBuf,
    #[command(flatten)]
    tokens: TokensArg,
    /// How tokens are fed: all at once, one at a time, or in chunks of N.
    #[arg(long, default_value = "all")]
    feed: Feed,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    precision: super::PrecisionArg,
}

/// `--ids-file` or `--text-file`: the tokens `score` and `compare` read.
#[derive(clap::Args)]
pub struct TokensArg {
    /// JSON array of token ids.
    #[arg(
        long,
        conflicts_with = "text_file",
        required_unless_present = "text_file"
    )]
    ids_file: Option<PathBuf>,
    /// UTF-8 text, tokenized with the (first) checkpoint's tokenizer.json.
    #[arg(long)]
    text_file: Option<PathBuf>,
}

impl TokensArg {
    /// The token ids, the text tokenized with `dir`'s tokenizer.json.
    pub fn read(&self, dir: &Path) -> Result<Vec<u32>> {
        read_tokens(dir, self.ids_file.as_ref(), self.text_file.as_ref())
    }
}

fn read_ids(path: &PathBuf) -> Result<Vec<u32>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow!("{}: expected a JSON array of token ids", path.display()))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64()
                .filter(|&x| x <= u32::MAX as u64)
                .map(|x| x as u32)
                .ok_or_else(|| anyhow!("{}: element {i} ({x}) is not a token id", path.display()))
        })
        .collect()
}

/// The token ids of `--ids-file`, or of `--text-file` tokenized with `dir`'s tokenizer.json.
fn read_tokens(
    dir: &Path,
    ids_file: Option<&PathBuf>,
    text_file: Option<&PathBuf>,
) -> Result<Vec<u32>> {
    Ok(match (ids_file, text_file) {
        (Some(p), _) => read_ids(p)?,
        (None, Some(p)) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            let tok = qnext::text::tokenizer::Tokenizer::from_file(dir.join("tokenizer.json"))?;
            tok.encode(&text, false)?
        }
        (None, None) => bail!("give --ids-file or --text-file"),
    })
}

pub fn main(mut args: Args, verbose: bool) -> Result<()> {
    args.dir = super::bundled::model_dir(args.model.take())?;
    let ids = args.tokens.read(&args.dir)?;
    if ids.len() < 2 {
        bail!("need at least 2 tokens to score, got {}", ids.len());
    }
    let mut model = super::load_model(&args.dir, verbose, qnext::checkpoint::LoadMode::Mmap)?;
    args.precision.apply(&mut model);
    if ids.len() > model.cfg.context_length() {
        bail!(
            "{} tokens exceed the model's context length {}",
            ids.len(),
            model.cfg.context_length()
        );
    }
    let t0 = std::time::Instant::now();
    let lp = next_token_logprobs(&model, &ids, args.feed)?;
    let secs = t0.elapsed().as_secs_f64();
    let mean_nll = -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64;
    let ppl = mean_nll.exp();
    if args.json {
        let out = serde_json::json!({
            "tokens": ids.len(),
            "next_token_logprobs": lp,
            "mean_nll": mean_nll,
            "perplexity": ppl,
        });
        println!("{out}");
    } else {
        for (i, l) in lp.iter().enumerate() {
            println!("{}\t{}\t{:.6}", i + 1, ids[i + 1], l);
        }
        println!("mean_nll {mean_nll:.6}");
        println!("perplexity {ppl:.4}");
    }
    if verbose {
        eprintln!(
            "{} tokens in {secs:.2}s ({:.1} tokens/s)",
            ids.len(),
            ids.len() as f64 / secs
        );
    }
    Ok(())
}
