//! `hypura inspect`.

#[derive(clap::Args, Debug)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hypura inspect` is not built yet")
}
