//! `qnext render-worker`: the child process `qnext serve` renders chat templates in
//! (`server::render_worker`); not meant to be run by hand.

use anyhow::Result;
use clap::Args as ClapArgs;
use qnext::server::render_worker::serve_stdio;
use qnext::text::{ChatTemplate, RenderLimits};
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// The checkpoint folder whose template to load.
    #[arg(long)]
    dir: PathBuf,
    /// The template file given to `serve --chat-template`, instead of the checkpoint's.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Bytes of rendered text at most.
    #[arg(long)]
    max_output: usize,
    /// Bytes of address space this process may use.
    #[arg(long)]
    memory: u64,
}

pub fn main(a: Args) -> Result<()> {
    let mut template = match &a.chat_template {
        Some(f) => ChatTemplate::from_file(f)?,
        None => ChatTemplate::from_checkpoint_dir(&a.dir)?,
    };
    template.set_limits(RenderLimits {
        max_output_bytes: a.max_output,
        ..RenderLimits::default()
    });
    serve_stdio(template, a.memory)
}
