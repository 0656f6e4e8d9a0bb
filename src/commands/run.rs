//! `qnext run`: generate text.

use anyhow::Result;
use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub struct Args {}

pub fn main(_a: Args, _v: bool) -> Result<()> {
    Ok(())
}
