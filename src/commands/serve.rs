//! `qnext serve`: the OpenAI-compatible server.

use anyhow::Result;
use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub struct Args {
    /// Checkpoint folder or Hugging Face repo id.
    model: String,
}

pub fn main(_a: Args, _verbose: bool) -> Result<()> {
    anyhow::bail!("not implemented yet")
}
