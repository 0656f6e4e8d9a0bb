//! `qnext run`: generate text from a prompt, streaming it to stdout.

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use qnext::engine::speculative::generate;
use qnext::sampling::{GenerationConfig, Sampler};
use qnext::text::chat_template::ChatTemplate;
use qnext::text::detokenizer::DecodeStream;
use qnext::text::tokenizer::Tokenizer;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(ClapArgs)]
pub struct Args {
    /// Checkpoint folder (with tokenizer.json). Default: the bundled model, models/qnext-tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(skip)]
    dir: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message with the checkpoint's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// A chat template file replacing the checkpoint's (.jinja, or JSON with `chat_template`).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Most tokens to generate (a thinking model reasons first: allow for it).
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// 0 = greedy. Default: the checkpoint's generation_config.json.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Seed for sampling (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Speculative decoding: draft this many tokens per step with the checkpoint's MTP head
    /// and verify them in one step (the output is unchanged; acceptance is reported at the end).
    #[arg(long, default_value_t = 0)]
    speculative_tokens: usize,
    #[command(flatten)]
    load: super::LoadArg,
    #[command(flatten)]
    precision: super::PrecisionArg,
}

pub fn main(mut args: Args, verbose: bool) -> Result<()> {
    args.dir = super::bundled::model_dir(args.model.take())?;
    let tok = Tokenizer::from_file(args.dir.join("tokenizer.json"))?;
    let prompt = if args.chat {
        let template = match &args.chat_template {
            Some(f) => ChatTemplate::from_file(f)?,
            None => ChatTemplate::from_checkpoint_dir(&args.dir)?,
        };
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": args.prompt}));
        template.render(
            &serde_json::Value::Array(messages),
            None,
            true,
            &serde_json::Map::new(),
        )?
    } else {
        args.prompt.clone()
    };
    let ids = tok.encode(&prompt, false)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let mut model = super::load_model(&args.dir, verbose, args.load.mode())?;
    args.precision.apply(&mut model);
    let ctx = model.cfg.context_length();
    if ids.len() >= ctx {
        bail!(
            "the prompt has {} tokens, the context length is {ctx}",
            ids.len()
        );
    }
    let max_new = args.max_tokens.min(ctx - ids.len());

    let gen_path = args.dir.join("generation_config.json");
    let gen = if gen_path.exists() {
        GenerationConfig::from_file(&gen_path)?
    } else {
        GenerationConfig::default()
    };
    let mut params = gen.sampling_params();
    if let Some(t) = args.temperature {
        params.temperature = t;
    }
    if let Some(p) = args.top_p {
        params.top_p = p;
    }
    if let Some(k) = args.top_k {
        params.top_k = k;
    }
    if let Some(m) = args.min_p {
        params.min_p = m;
    }
    if let Some(r) = args.repetition_penalty {
        params.repetition_penalty = r;
    }
    params.seed = args.seed;
    let mut eos = gen.eos_token_ids.clone();
    eos.extend(&model.cfg.eos_token_ids);
    let mut sampler = Sampler::new(params)?;

    if args.speculative_tokens > 0 && !model.has_mtp() {
        bail!(
            "--speculative-tokens {}: {} has no MTP head (mtp.* tensors), which drafts the tokens",
            args.speculative_tokens,
            args.dir.display()
        );
    }
    if args.speculative_tokens > 0 {
        model.quantize_draft_head();
    }
    let mut cache = model.new_cache(ids.len() + max_new);
    let t0 = Instant::now();
    let mut first: Option<Instant> = None;
    let mut stream = DecodeStream::new(true);
    let mut stdout = std::io::stdout().lock();
    let mut generated: usize = 0;
    let mut stop = "length";
    let mut failed: Option<anyhow::Error> = None;
    let acceptance = generate(
        &model,
        &mut cache,
        &ids,
        &mut sampler,
        (max_new, args.speculative_tokens),
        &eos,
        |t, _| {
            first.get_or_insert_with(Instant::now);
            generated += 1;
            if eos.contains(&t) {
                stop = "eos";
                return false;
            }
            let piece = stream.step(&tok, t).and_then(|p| {
                if let Some(p) = p {
                    stdout.write_all(p.as_bytes())?;
                    stdout.flush()?;
                }
                Ok(())
            });
            if let Err(e) = piece {
                failed = Some(e);
                return false;
            }
            true
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(rest) = stream.flush(&tok)? {
        stdout.write_all(rest.as_bytes())?;
    }
    writeln!(stdout)?;
    let first = first.unwrap_or_else(Instant::now);
    let prefill = first.duration_since(t0).as_secs_f64();
    let decode = first.elapsed().as_secs_f64();
    // The first token comes with the prompt's step; the rate counts the steps after it.
    eprintln!(
        "prompt {} tokens in {prefill:.2}s ({:.1} tokens/s); generated {generated} tokens in {decode:.2}s ({:.2} tokens/s); stop: {stop}",
        ids.len(),
        ids.len() as f64 / prefill,
        generated.saturating_sub(1) as f64 / decode.max(1e-9),
    );
    if args.speculative_tokens > 0 {
        eprintln!("{}", acceptance.summary());
    }
    Ok(())
}
