//! `qnext run`: generate text from a prompt, streaming it to stdout.

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use qnext::model::{SeqInput, Want};
use qnext::sampling::{GenerationConfig, Sampler};
use qnext::text::chat_template::ChatTemplate;
use qnext::text::detokenizer::DecodeStream;
use qnext::text::tokenizer::Tokenizer;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(ClapArgs)]
pub struct Args {
    /// Checkpoint folder (with tokenizer.json).
    #[arg(long)]
    model: PathBuf,
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
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
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
    #[command(flatten)]
    load: super::LoadArg,
    #[command(flatten)]
    precision: super::PrecisionArg,
}

pub fn main(args: Args, verbose: bool) -> Result<()> {
    let tok = Tokenizer::from_file(args.model.join("tokenizer.json"))?;
    let prompt = if args.chat {
        let template = match &args.chat_template {
            Some(f) => ChatTemplate::from_file(f)?,
            None => ChatTemplate::from_checkpoint_dir(&args.model)?,
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
    let mut model = super::load_model(&args.model, verbose, args.load.mode())?;
    args.precision.apply(&mut model);
    let ctx = model.cfg.context_length();
    if ids.len() >= ctx {
        bail!(
            "the prompt has {} tokens, the context length is {ctx}",
            ids.len()
        );
    }
    let max_new = args.max_tokens.min(ctx - ids.len());

    let gen_path = args.model.join("generation_config.json");
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

    let mut cache = model.new_cache(ids.len() + max_new);
    let t0 = Instant::now();
    let out = model.forward(&mut [SeqInput {
        tokens: &ids,
        cache: &mut cache,
        want: Want::Last,
    }])?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut logits = out.into_iter().next().map(|o| o.logits).unwrap_or_default();

    let t1 = Instant::now();
    let mut output: Vec<u32> = Vec::new();
    let mut stream = DecodeStream::new(true);
    let mut stdout = std::io::stdout().lock();
    let mut generated = 0;
    let mut stop = "length";
    while generated < max_new {
        let next = sampler.sample(&logits, &ids, &output)?;
        generated += 1;
        if eos.contains(&next) {
            stop = "eos";
            break;
        }
        output.push(next);
        if let Some(piece) = stream.step(&tok, next)? {
            stdout.write_all(piece.as_bytes())?;
            stdout.flush()?;
        }
        if generated == max_new {
            break;
        }
        let out = model.forward(&mut [SeqInput {
            tokens: &[next],
            cache: &mut cache,
            want: Want::Last,
        }])?;
        logits = out.into_iter().next().map(|o| o.logits).unwrap_or_default();
    }
    if let Some(rest) = stream.flush(&tok)? {
        stdout.write_all(rest.as_bytes())?;
    }
    writeln!(stdout)?;
    let decode = t1.elapsed().as_secs_f64();
    eprintln!(
        "prompt {} tokens in {prefill:.2}s ({:.1} tokens/s); generated {generated} tokens in {decode:.2}s ({:.2} tokens/s); stop: {stop}",
        ids.len(),
        ids.len() as f64 / prefill,
        generated as f64 / decode.max(1e-9),
    );
    Ok(())
}
