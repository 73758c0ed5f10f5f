//! `hypura profile`.

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {}

pub fn run(_args: ProfileArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hypura profile` is not built yet")
}
