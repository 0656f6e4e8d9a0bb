//! The `qnext` command line: thin wrappers over the library.

mod commands;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "qnext", version, about = "Qwen3-Next inference on CPUs")]
struct Cli {
    /// Worker threads for the matrix kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Report load time, memory and other details on stderr.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Log-probability of every token given its prefix; mean NLL and perplexity.
    Score(commands::score::Args),
    /// Generate text from a prompt.
    Run(commands::run::Args),
    /// OpenAI-compatible HTTP server with continuous batching.
    #[cfg(feature = "serve")]
    Serve(Box<commands::serve::Args>),
    /// Present without the server, to say so instead of "unrecognized subcommand".
    #[cfg(not(feature = "serve"))]
    #[command(hide = true)]
    Serve {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        _args: Vec<String>,
    },
    /// The process `serve` renders chat templates in (memory-limited); not run by hand.
    #[cfg(feature = "serve")]
    #[command(hide = true)]
    RenderWorker(commands::render_worker::Args),
    /// Prompt-processing and generation throughput (like llama-bench).
    Bench(commands::bench::Args),
    /// Write a random checkpoint with the real shapes and fewer experts, for benchmarks.
    Synth(commands::synth::Args),
    /// Quantise a BF16 checkpoint to the released fine-grained FP8 format (e4m3, 128×128 block scales).
    Quantize(commands::quantize::Args),
    /// Perplexities of two checkpoints on the same text, and the KL divergence of B's
    /// predictions from A's (e.g. an FP8 checkpoint against its BF16 original).
    Compare(commands::compare::Args),
    /// Config summary, parameter counts, dtypes and bytes of a checkpoint.
    Inspect {
        /// Checkpoint folder.
        #[arg(long)]
        model: PathBuf,
    },
}

/// Keeps freed activation buffers (up to tens of MB each in prefill) in the heap instead of
/// returning them to the kernel: otherwise every layer's allocations are fresh `mmap`s whose
/// pages fault in again, which cost ~5% of prefill time.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc allocator thresholds; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        qnext::kernels::parallel::set_threads(n);
    }
    let result = match cli.command {
        Command::Score(a) => commands::score::main(a, cli.verbose),
        Command::Run(a) => commands::run::main(a, cli.verbose),
        Command::Inspect { model } => commands::inspect::main(&model),
        Command::Synth(a) => commands::synth::main(a),
        Command::Quantize(a) => commands::quantize::main(a),
        Command::Compare(a) => commands::compare::main(a, cli.verbose),
        Command::Bench(a) => commands::bench::main(a, cli.verbose),
        #[cfg(feature = "serve")]
        Command::Serve(a) => commands::serve::main(*a, cli.verbose),
        #[cfg(feature = "serve")]
        Command::RenderWorker(a) => commands::render_worker::main(a),
        #[cfg(not(feature = "serve"))]
        Command::Serve { .. } => Err(anyhow::anyhow!(
            "this qnext was built without the server (cargo feature `serve`); build it with the \
             default features to use `qnext serve`"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
