//! `qnext bench`: prompt processing (pp) and generation (tg) throughput, like `llama-bench`,
//! plus the bytes of weights read per generated token and the bandwidth that implies.

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use qnext::cache::{SeqCache, Snapshot};
use qnext::model::{Model, SeqInput, Want};
use std::path::PathBuf;
use std::time::Instant;

/// The read-bandwidth probe's buffer: far larger than any cache.
const PROBE_BYTES: usize = 4 << 30;

#[derive(ClapArgs)]
pub struct Args {
    /// Checkpoint folder (with tokenizer.json). Default: the bundled model, models/qnext-tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(skip)]
    dir: PathBuf,
    /// Prompt length for pp.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated for tg.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Context already in the cache before tg starts (llama-bench's `-d`). When not 0, tg at
    /// depth 0 is measured too, alternating with it, and their ratio reported.
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Also measure the memory read bandwidth (4 GiB buffer, best of at least 10 rounds) to
    /// compare with. With generation, the probe runs before each timed generation and after
    /// the last, and each run is also compared with the better probe beside it.
    #[arg(long)]
    read_bandwidth: bool,
    #[command(flatten)]
    load: super::LoadArg,
    #[command(flatten)]
    precision: super::PrecisionArg,
    /// Print the time per kind of work of prompt processing (per token) and of one decode step.
    #[arg(long)]
    profile: bool,
    /// Only run kernel micro-benchmarks: matrix products on synthetic weights (from memory and
    /// from cache), then one-token products over the --model checkpoint's own matrices next to a
    /// plain read of the same bytes.
    #[arg(long)]
    kernels: bool,
    /// Measure speculative decoding with the MTP head instead: verification steps of 1 + k
    /// tokens for k = 1..K against a decode step, the draft's cost, the speedup they give
    /// by acceptance rate, and generation with K drafts per step (at --depth, --repeat
    /// times, --gen-tokens generated).
    #[arg(long, default_value_t = 0)]
    speculative_tokens: usize,
}

pub(super) fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Stay within the ids a tokenizer defines (151,669 for Qwen) when the vocabulary is padded.
            ((s >> 33) % vocab.min(151_669) as u64) as u32
        })
        .collect()
}

pub(super) fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Seconds to prefill `n` tokens in one forward call.
fn pp(model: &Model, n: usize, seed: u64) -> Result<f64> {
    let ids = random_ids(n, model.cfg.vocab_size, seed);
    let mut cache = model.new_cache(n);
    let t0 = Instant::now();
    model.forward(&mut [SeqInput {
        tokens: &ids,
        cache: &mut cache,
        want: Want::Last,
    }])?;
    Ok(t0.elapsed().as_secs_f64())
}

/// A sequence with `depth` tokens of context already in its cache, and a snapshot to rewind
/// to, so that each timed round generates from the same state without prefilling again.
struct Prefilled {
    cache: SeqCache,
    snap: Snapshot,
    next: u32,
    /// [`SeqCache::decode_traffic`] at the prefilled depth.
    snap_traffic: usize,
}

/// The set-up prompt goes in chunks of this many tokens, so that its activations stay a few
/// hundred MB whatever the depth (one call of 32K tokens peaked at 12.6 GB).
const SETUP_CHUNK: usize = 2048;

fn prefill(model: &Model, depth: usize, n: usize, seed: u64) -> Result<Prefilled> {
    let mut cache = model.new_cache(depth + n + 1);
    let first = random_ids(depth + 1, model.cfg.vocab_size, seed);
    let chunks: Vec<&[u32]> = first.chunks(SETUP_CHUNK).collect();
    let pb = (depth >= 4 * SETUP_CHUNK)
        .then(|| qnext::progress::bar(first.len() as u64, "depth set-up"));
    let t0 = Instant::now();
    let mut next = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let out = model.forward(&mut [SeqInput {
            tokens: chunk,
            cache: &mut cache,
            want: if last { Want::Last } else { Want::None },
        }])?;
        if last {
            next = argmax(&out[0].logits);
        }
        if let Some(pb) = &pb {
            pb.inc(chunk.len() as u64);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "depth set-up: {} tokens in {secs:.1} s ({:.1} tokens/s, chunks of {SETUP_CHUNK})",
            first.len(),
            first.len() as f64 / secs
        );
    }
    let snap = cache.snapshot();
    let snap_traffic = cache.decode_traffic();
    Ok(Prefilled {
        cache,
        snap,
        next,
        snap_traffic,
    })
}

/// Seconds to generate `n` tokens greedily from the prefilled state (rewound first).
fn decode(model: &Model, p: &mut Prefilled, n: usize) -> Result<f64> {
    p.cache.restore(&p.snap)?;
    let mut next = p.next;
    // A profile covers the generation steps only, not the prompt that set up the depth.
    qnext::kernels::profile::reset();
    let t0 = Instant::now();
    for _ in 0..n {
        let out = model.forward(&mut [SeqInput {
            tokens: &[next],
            cache: &mut p.cache,
            want: Want::Last,
        }])?;
        next = argmax(&out[0].logits);
    }
    Ok(t0.elapsed().as_secs_f64())
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

type Totals = Vec<(qnext::kernels::profile::Kind, u64)>;

/// Runs `f` with the profiler on; its seconds and the time per kind of work.
fn profiled(f: impl FnOnce() -> Result<f64>) -> Result<(f64, Totals)> {
    qnext::kernels::profile::reset();
    qnext::kernels::profile::enable(true);
    let secs = f();
    qnext::kernels::profile::enable(false);
    Ok((secs?, qnext::kernels::profile::totals()))
}

/// Milliseconds per unit (token or step) for each kind of work; `units` divides the totals.
fn print_profile(title: &str, totals: &Totals, per_unit_ms: f64, units: f64) {
    println!("{title}");
    let sum: u64 = totals.iter().map(|t| t.1).sum();
    for &(kind, ns) in totals {
        let ms = ns as f64 / 1e6 / units;
        println!(
            "  {:<40} {ms:8.2} ms {:5.1}%",
            kind.name(),
            100.0 * ns as f64 / sum.max(1) as f64
        );
    }
    println!(
        "  {:<40} {:8.2} ms",
        "(outside these spans)",
        per_unit_ms - sum as f64 / 1e6 / units
    );
}

pub fn main(mut a: Args, verbose: bool) -> Result<()> {
    a.dir = super::bundled::model_dir(a.model.take())?;
    if a.repeat == 0 || (a.prompt_tokens == 0 && a.gen_tokens == 0) {
        bail!(
            "nothing to measure: --repeat and one of --prompt-tokens/--gen-tokens must be positive"
        );
    }
    let mode = a.load.mode().resolve(&a.dir);
    if a.kernels {
        let (bw, fetched) = qnext::kernels::bandwidth::read_bandwidths(2 << 30, 7);
        println!(
            "read bandwidth {:.1} GB/s (plain loop; {:.1} GB/s with software prefetches, {:.2}x)",
            bw / 1e9,
            fetched / 1e9,
            fetched / bw
        );
        // 1 GiB of matrices streams from memory; 4 MiB stays in cache, which shows what the
        // kernel's instructions alone allow.
        for (total, place, rounds) in [(1usize << 30, "memory", 5), (4 << 20, "cache", 200)] {
            for t in [1usize, 2, 4, 64, 256] {
                for (name, gbps, secs) in
                    qnext::kernels::microbench::matvec_bandwidth(total, 2048, t, rounds)
                {
                    println!(
                        "matmul {name:<10} t={t:<3} from {place:<6}: {gbps:6.1} GB/s of weights, {:6.1} GMAC/s ({:.1} us per 512x2048)",
                        gbps * 1e9 / if name.starts_with("fp8") { 1.0 } else { 2.0 } * t as f64 / 1e9,
                        secs * 1e6
                    );
                }
            }
        }
        for (depth, layers) in [(4096usize, 12usize), (4096, 1), (131072, 1)] {
            let (ms, gbps) = qnext::kernels::microbench::attention_decode(depth, layers, 21);
            println!(
                "attention decode depth {depth} over {layers:>2} layers' caches: {:.3} ms per layer, {gbps:.1} GB/s of cache",
                ms / layers as f64
            );
        }
        for (depth, tokens) in [(8192usize, 256usize), (32768, 256)] {
            let (ms, us) = qnext::kernels::microbench::attention_prompt(depth, tokens, 5);
            println!(
                "attention prompt depth {depth} + {tokens} tokens: {ms:.1} ms per layer, {us:.1} us per token",
            );
        }
        if let Some(peak) = qnext::kernels::microbench::bf16_peak() {
            println!("bf16 dot-product peak (registers only): {peak:.0} GFLOP/s");
        }
        if let Some(peak) = qnext::kernels::microbench::fma_peak_avx2() {
            println!("f32 FMA peak, AVX2 (registers only): {peak:.0} GFLOP/s");
        }
        for g in qnext::kernels::microbench::gemm_rates(5) {
            println!(
                "prefill {:<4} {:<15} {:>2} x {:>5}x{:<4} t={:<3}: {:6.1} GFLOP/s blocked, {:6.1} dot products",
                g.dtype, g.name, g.jobs, g.rows, g.cols, g.tokens, g.gflops, g.dot_gflops
            );
        }
        // The same products over this checkpoint's own matrices, mapped as for inference.
        let cfg = qnext::config::Config::from_file(&a.dir.join("config.json"))?;
        let ck = qnext::checkpoint::Checkpoint::open_with(&a.dir, mode)?;
        let p = a.precision.precision();
        for g in qnext::kernels::microbench::model_matvec(&ck, cfg.quantization.as_ref(), p, 5)? {
            println!(
                "model {:<15} {:>5} matrices {:>7.1} MB  t=1: {:.1} GB/s, plain read {:.1} GB/s ({:.0}%)",
                g.group,
                g.matrices,
                g.bytes as f64 / 1e6,
                g.kernel,
                g.read,
                100.0 * g.kernel / g.read
            );
        }
        let step = qnext::kernels::microbench::decode_step_products(&ck, &cfg, p, 7)?;
        println!(
            "model decode step, products only: {} dispatches, {:.1} MB, {:.2} ms ({:.1} GB/s), plain read of the same bytes {:.1} GB/s ({:.0}%)",
            step.dispatches,
            step.bytes as f64 / 1e6,
            step.ms,
            step.bytes as f64 / step.ms / 1e6,
            step.read,
            100.0 * step.bytes as f64 / step.ms / 1e6 / step.read
        );
        return Ok(());
    }
    let t0 = Instant::now();
    let mut model = Model::load_with(&a.dir, mode)?;
    a.precision.apply(&mut model);
    let load_s = t0.elapsed().as_secs_f64();
    if a.speculative_tokens > 0 {
        let settings = super::bench_speculation::Settings {
            k: a.speculative_tokens,
            depth: a.depth,
            gen_tokens: a.gen_tokens.max(2),
            repeat: a.repeat,
            profile: a.profile,
        };
        let out = super::bench_speculation::run(&mut model, &settings)?;
        if a.json {
            let mut out = out;
            out["model"] = serde_json::json!(a.dir.display().to_string());
            out["isa"] = serde_json::json!(format!("{:?}", qnext::kernels::isa::isa()));
            println!("{out}");
        }
        return Ok(());
    }
    let (all_bytes, token_bytes) = model.weight_bytes();
    let threads = qnext::kernels::parallel::threads();
    // One untimed round warms caches and the thread pool.
    if a.prompt_tokens > 0 {
        pp(&model, a.prompt_tokens.min(64), 1)?;
    }
    // Generation starts from prefilled states, built once: at the requested depth and, when
    // that is not 0, at depth 0 too, timed alternately so that the ratio between them is
    // measured under the same conditions (this machine's bandwidth drifts within minutes).
    let mut at_depth = if a.gen_tokens > 0 {
        Some(prefill(&model, a.depth, a.gen_tokens, 200)?)
    } else {
        None
    };
    let mut at_zero = if a.gen_tokens > 0 && a.depth > 0 {
        Some(prefill(&model, 0, a.gen_tokens, 300)?)
    } else {
        None
    };
    if let Some(p) = at_depth.as_mut() {
        decode(&model, p, 2.min(a.gen_tokens))?;
    }
    if a.profile && a.prompt_tokens > 0 {
        let secs = profiled(|| pp(&model, a.prompt_tokens, 7))?;
        print_profile(
            &format!(
                "profile of prompt processing ({:.1} s for {} tokens, per token):",
                secs.0, a.prompt_tokens
            ),
            &secs.1,
            secs.0 * 1e3 / a.prompt_tokens as f64,
            a.prompt_tokens as f64,
        );
    }
    if let (true, Some(p)) = (a.profile, at_depth.as_mut()) {
        let (secs, totals) = profiled(|| decode(&model, p, a.gen_tokens))?;
        let per_token_ms = secs * 1e3 / a.gen_tokens as f64;
        print_profile(
            &format!(
                "profile of one decode step ({per_token_ms:.1} ms per token, depth {}):",
                a.depth
            ),
            &totals,
            per_token_ms,
            a.gen_tokens as f64,
        );
    }
    let (mut pps, mut tgs, mut tg0s) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..a.repeat {
        if a.prompt_tokens > 0 {
            let s = pp(&model, a.prompt_tokens, 100 + r as u64)?;
            pps.push(a.prompt_tokens as f64 / s);
            if verbose {
                eprintln!("repeat {r}: pp {:.2} tokens/s", pps[r]);
            }
        }
    }
    // Every kind of work has run by now, so this is the engine's peak; read before the
    // probe's buffer exists, which is not the engine's memory.
    let rss = qnext::procfs::kb_field("/proc/self/status", "VmHWM:").unwrap_or(0);
    // What `--load hugepages` obtained.
    let huge = qnext::procfs::kb_field("/proc/self/smaps_rollup", "AnonHugePages:").unwrap_or(0);
    // With `--read-bandwidth` and generation, the probe runs before each timed generation
    // and after the last, so each run has a probe on either side of it in time.
    let probe = if a.read_bandwidth && at_depth.is_some() {
        Some(
            qnext::kernels::bandwidth::Probe::new(PROBE_BYTES)
                .context("could not map the read-bandwidth probe's buffer")?,
        )
    } else {
        None
    };
    // At least 10 rounds in all, as for a probe taken once.
    let probe_rounds = 10usize.div_ceil(a.repeat + 1).max(3);
    let mut probes = Vec::new();
    for r in 0..a.repeat {
        if let Some(p) = at_zero.as_mut() {
            tg0s.push(a.gen_tokens as f64 / decode(&model, p, a.gen_tokens)?);
        }
        if let Some(p) = at_depth.as_mut() {
            if let Some(probe) = &probe {
                probes.push(probe.best_of(probe_rounds) / 1e9);
            }
            tgs.push(a.gen_tokens as f64 / decode(&model, p, a.gen_tokens)?);
            if verbose {
                eprintln!("repeat {r}: tg {:.2} tokens/s", tgs[r]);
            }
        }
    }
    // Per round, tg at depth over tg at depth 0 measured just before it; the median of those.
    let depth_ratio =
        (!tg0s.is_empty()).then(|| median(tgs.iter().zip(&tg0s).map(|(d, z)| d / z).collect()));
    let tg0_tps = (!tg0s.is_empty()).then(|| median(tg0s.clone()));
    let pp_tps = if pps.is_empty() {
        0.0
    } else {
        median(pps.clone())
    };
    let tg_tps = if tgs.is_empty() {
        0.0
    } else {
        median(tgs.clone())
    };
    let gbps = token_bytes as f64 * tg_tps / 1e9;
    // The caches' own traffic per generated token, at the requested depth.
    let state_bytes = at_depth.as_ref().map_or(0, |p| p.snap_traffic);
    let memory_gbps = (token_bytes + state_bytes) as f64 * tg_tps / 1e9;
    if let Some(probe) = &probe {
        probes.push(probe.best_of(probe_rounds) / 1e9);
    }
    drop(probe);
    let bw = if !probes.is_empty() {
        probes.iter().copied().fold(0.0, f64::max)
    } else if a.read_bandwidth {
        qnext::kernels::bandwidth::read_bandwidth(PROBE_BYTES, 10) / 1e9
    } else {
        0.0
    };
    // Per generation run, its GB/s over the better of the probes just before and just after
    // it; the median of those.
    let adjacent_fraction = (probes.len() == tgs.len() + 1 && !tgs.is_empty()).then(|| {
        median(
            tgs.iter()
                .enumerate()
                .map(|(r, tg)| token_bytes as f64 * tg / 1e9 / probes[r].max(probes[r + 1]))
                .collect(),
        )
    });
    if a.json {
        let out = serde_json::json!({
            "model": a.dir.display().to_string(),
            "threads": threads,
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "depth": a.depth,
            "repeat": a.repeat,
            "pp_tokens_per_s": pp_tps,
            "tg_tokens_per_s": tg_tps,
            "pp_runs": pps,
            "tg_runs": tgs,
            "tg_depth0_tokens_per_s": tg0_tps,
            "tg_depth0_runs": tg0s,
            "depth_ratio": depth_ratio,
            "bytes_per_token": token_bytes,
            "weight_bytes": all_bytes,
            "gb_per_s": gbps,
            "state_bytes_per_token": state_bytes,
            "memory_gb_per_s": memory_gbps,
            "peak_rss_bytes": rss,
            "huge_page_bytes": huge,
            "load_s": load_s,
            "load_mode": format!("{mode:?}").to_lowercase(),
            "precision": format!("{:?}", model.precision).to_lowercase(),
            "lm_head": format!("{:?}", a.precision.lm_head).to_lowercase(),
            "read_bandwidth_gb_per_s": bw,
            "read_bandwidth_runs": probes,
            "bandwidth_fraction": if bw > 0.0 { gbps / bw } else { 0.0 },
            "bandwidth_fraction_adjacent": adjacent_fraction,
            "memory_bandwidth_fraction": if bw > 0.0 { memory_gbps / bw } else { 0.0 },
        });
        println!("{out}");
    } else {
        println!("model      {}", a.dir.display());
        println!("threads    {threads}");
        println!("pp{:<8} {pp_tps:.2} tokens/s", a.prompt_tokens);
        println!(
            "tg{:<8} {tg_tps:.2} tokens/s (depth {})",
            a.gen_tokens, a.depth
        );
        if let (Some(z), Some(ratio)) = (tg0_tps, depth_ratio) {
            println!(
                "tg{:<8} {z:.2} tokens/s (depth 0, alternating): depth {} runs at {ratio:.2}× depth 0",
                a.gen_tokens, a.depth
            );
        }
        println!(
            "weights    {:.3} GB, {:.1} MB read per token, {gbps:.1} GB/s",
            all_bytes as f64 / 1e9,
            token_bytes as f64 / 1e6
        );
        if state_bytes > 0 {
            println!(
                "state      {:.1} MB read and written per token (DeltaNet states, K/V); with the weights {memory_gbps:.1} GB/s",
                state_bytes as f64 / 1e6
            );
        }
        println!("peak RSS   {:.2} GB", rss as f64 / 1e9);
        if huge > 0 {
            println!("huge pages {:.2} GB", huge as f64 / 1e9);
        }
        if bw > 0.0 {
            println!(
                "read bw    {bw:.1} GB/s measured; tg reaches {:.0}% of it ({:.0}% with the state)",
                100.0 * gbps / bw,
                100.0 * memory_gbps / bw
            );
        }
        if let Some(f) = adjacent_fraction {
            let runs: Vec<String> = probes.iter().map(|p| format!("{p:.1}")).collect();
            println!(
                "           probes between the tg runs: {} GB/s; each run against the better probe beside it: {:.0}% (median)",
                runs.join(", "),
                100.0 * f
            );
        }
    }
    Ok(())
}
