//! `hypura profile`: measure this machine (or show the cached measurement).

use std::path::PathBuf;

use anyhow::Result;

use crate::io::Backend;
use crate::profiler::{self, MeasureOptions, ProfileSource};

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    /// Measure again even if this machine's profile is cached.
    #[arg(long)]
    pub force: bool,
    /// Print JSON (for scripts) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Directory whose filesystem is measured [default: ./models, else $HYPURA_MODELS_DIR, else .]
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// Smaller files and shorter runs: quick, rougher figures (also HYPURA_PROFILE_QUICK=1).
    #[arg(long)]
    pub quick: bool,
    /// I/O backend for the storage measurement: auto, uring, pread.
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    pub backend: Backend,
    /// Read this existing file for the storage figures (e.g. the file fio reads).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Also alternate io_uring and the pread pool at queue depth 16, 1 MiB blocks.
    #[arg(long)]
    pub compare_backends: bool,
}

pub fn run(args: ProfileArgs) -> Result<()> {
    let opts = MeasureOptions {
        path: args.path,
        quick: args.quick || profiler::quick_from_env(),
        backend: args.backend,
        file: args.file,
        compare_backends: args.compare_backends,
        progress: true,
    };
    let (p, source) =
        profiler::load_or_measure_with(args.force, &opts, crate::engine::device::measure_all)?;
    match source {
        ProfileSource::Cached(f) => {
            eprintln!(
                "cached profile {} (use --force to measure again)",
                f.display()
            )
        }
        ProfileSource::Saved(f) => eprintln!("profile saved to {}", f.display()),
        ProfileSource::NotSaved(why) => eprintln!("profile not cached: {why}"),
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", profiler::render_table(&p));
    }
    Ok(())
}
