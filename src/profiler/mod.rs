//! Machine profile: CPU, memory (and the container's limit), storage throughput through
//! Hypura's own I/O engine, and ggml devices. Measured by `hypura profile`, cached as TOML
//! under `$XDG_CACHE_HOME/hypura/profile-<machine key>.toml` and reused by other commands
//! through [`load_or_measure`] / [`load_cached`].
//!
//! The profiler sits below the engine: the ggml devices (the GPUs' copy bandwidth) are measured
//! by the caller's [`DeviceProbe`] (`engine::device::measure_all`), run only when a fresh
//! measurement is made.

mod cpu;
mod ggml;
pub mod memory;
mod report;
mod storage;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use report::render_table;

/// Bumped when the profile's meaning or layout changes; other versions are re-measured.
pub const PROFILE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineProfile {
    pub version: u32,
    /// Hash of /etc/machine-id (or host name), CPU model and total memory.
    pub machine_key: String,
    pub measured_at_unix: u64,
    pub hypura_version: String,
    /// Measured with the small, quick settings (`--quick`): rougher figures.
    pub quick: bool,
    pub cpu: CpuProfile,
    pub memory: MemoryProfile,
    pub storage: StorageProfile,
    /// Every ggml device (CPU, GPU, integrated GPU, accelerator).
    pub gpus: Vec<GpuProfile>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuProfile {
    pub model: String,
    pub physical_cores: usize,
    pub logical_cores: usize,
    /// Cores this process may use (affinity, cgroup CPU quota).
    pub usable_cores: usize,
    /// SIMD features of this CPU that ggml can use (AVX2, AVX512*, AMX*, NEON, ...).
    pub simd: Vec<String>,
    /// SIMD features the linked ggml build was compiled for (`ggml_cpu_has_*`).
    pub ggml_simd: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryProfile {
    pub total_bytes: u64,
    /// MemAvailable, lowered to the cgroup's headroom (limit - usage) in a container.
    pub available_bytes: u64,
    /// cgroup v2 `memory.max` / v1 `memory.limit_in_bytes`; absent when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_limit_bytes: Option<u64>,
    /// min(total, cgroup limit): what a memory budget must stay under.
    pub effective_limit_bytes: u64,
    /// Multi-threaded sequential read bandwidth, GB/s (1e9 bytes/s).
    pub read_gbps: f64,
    /// Multi-threaded copy bandwidth, GB/s of bytes copied (each byte is read and written).
    pub copy_gbps: f64,
    pub bandwidth_threads: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeqResult {
    pub queue_depth: usize,
    pub block_size: usize,
    pub gbps: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendComparison {
    pub backend: String,
    pub queue_depth: usize,
    pub block_size: usize,
    /// One figure per alternated run, in run order.
    pub runs_gbps: Vec<f64>,
    pub median_gbps: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorageProfile {
    /// Directory measured (canonical).
    pub path: String,
    /// File read: an existing model, or a scratch file written for the purpose (removed).
    pub file: String,
    pub file_bytes: u64,
    pub scratch_file: bool,
    /// I/O backend the engine ran with (io_uring / pread).
    pub backend: String,
    /// Page cache bypassed (O_DIRECT / F_NOCACHE).
    pub direct: bool,
    pub fixed_buffers: bool,
    pub fallbacks: Vec<String>,
    pub seq: Vec<SeqResult>,
    pub best_seq_gbps: f64,
    pub best_seq_queue_depth: usize,
    pub best_seq_block_size: usize,
    /// Random 4 KiB reads at queue depth 1.
    pub rand4k_p50_us: f64,
    pub rand4k_p99_us: f64,
    /// Random 4 KiB reads per second at `rand4k_queue_depth`.
    pub rand4k_iops: f64,
    pub rand4k_queue_depth: usize,
    /// `--compare-backends`: io_uring and pread alternated at one queue depth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_comparison: Vec<BackendComparison>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuProfile {
    pub name: String,
    pub description: String,
    /// cpu, gpu, igpu, accel.
    pub kind: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Host→device copy bandwidth from pinned host memory (GB/s), GPUs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2d_pinned_gbps: Option<f64>,
    /// Host→device copy bandwidth from ordinary (pageable) memory (GB/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2d_pageable_gbps: Option<f64>,
}

/// Measures every ggml device for [`MachineProfile::gpus`] (`engine::device::measure_all`).
pub type DeviceProbe = fn() -> Vec<GpuProfile>;

/// What to measure and how.
#[derive(Clone, Debug, Default)]
pub struct MeasureOptions {
    /// Directory whose filesystem is measured (default: [`default_models_dir`]).
    pub path: Option<PathBuf>,
    /// Smaller sizes and shorter runs (tests, CI).
    pub quick: bool,
    /// Backend for the storage measurement.
    pub backend: crate::io::Backend,
    /// Read this existing file instead of a model from `path` or a scratch file.
    pub file: Option<PathBuf>,
    /// Also alternate io_uring and pread at queue depth 16, 1 MiB blocks.
    pub compare_backends: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl MeasureOptions {
    /// Options other commands use: the default models dir, quick if `HYPURA_PROFILE_QUICK=1`.
    pub fn for_commands(path: Option<&Path>) -> MeasureOptions {
        MeasureOptions {
            path: path.map(Path::to_path_buf),
            quick: quick_from_env(),
            progress: true,
            ..MeasureOptions::default()
        }
    }

    /// Only the defaults: a profile measured so can stand for the machine in the cache lookup.
    fn is_plain(&self) -> bool {
        self.file.is_none() && self.backend == crate::io::Backend::Auto && !self.compare_backends
    }
}

/// `HYPURA_PROFILE_QUICK=1` asks for the quick measurement.
pub fn quick_from_env() -> bool {
    std::env::var("HYPURA_PROFILE_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `./models` if it exists, else `$HYPURA_MODELS_DIR`, else the current directory.
pub fn default_models_dir() -> PathBuf {
    let local = PathBuf::from("models");
    if local.is_dir() {
        return local;
    }
    match std::env::var_os("HYPURA_MODELS_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("."),
    }
}

/// The cached profile of this machine, if any (and of the current layout version).
pub fn load_cached() -> Option<MachineProfile> {
    let path = cache_file()?;
    let text = std::fs::read_to_string(&path).ok()?;
    match toml::from_str::<MachineProfile>(&text) {
        Ok(p) if p.version == PROFILE_VERSION && p.machine_key == machine_key() => Some(p),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("ignoring unreadable profile cache {}: {e}", path.display());
            None
        }
    }
}

/// The cached profile, or a fresh measurement (saved to the cache) when there is none, when
/// `force`, or when the cache was measured on another directory than `path`.
pub fn load_or_measure(
    force: bool,
    path: Option<&Path>,
    devices: DeviceProbe,
) -> Result<MachineProfile> {
    Ok(load_or_measure_with(force, &MeasureOptions::for_commands(path), devices)?.0)
}

/// Where a profile came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileSource {
    /// Read from this cache file.
    Cached(PathBuf),
    /// Measured now and saved to this cache file.
    Saved(PathBuf),
    /// Measured now and not cached (the reason).
    NotSaved(String),
}

/// As [`load_or_measure`], with every option; also says where the profile came from.
/// Measurements with a forced backend are not cached (they do not describe how `run` reads).
pub fn load_or_measure_with(
    force: bool,
    opts: &MeasureOptions,
    devices: DeviceProbe,
) -> Result<(MachineProfile, ProfileSource)> {
    if !force && opts.is_plain() {
        if let Some(p) = load_cached() {
            let want_path = opts.path.as_deref().map(canonical_string);
            let path_ok = want_path.is_none_or(|w| w == p.storage.path);
            let quality_ok = !p.quick || opts.quick;
            if path_ok && quality_ok {
                let file = cache_file().unwrap_or_default();
                return Ok((p, ProfileSource::Cached(file)));
            }
        }
    }
    let p = measure(opts, devices)?;
    if opts.backend != crate::io::Backend::Auto {
        return Ok((
            p,
            ProfileSource::NotSaved(format!("the {:?} backend was forced", opts.backend)),
        ));
    }
    match save(&p) {
        Ok(file) => Ok((p, ProfileSource::Saved(file))),
        Err(e) => {
            tracing::warn!("could not cache the machine profile: {e:#}");
            Ok((p, ProfileSource::NotSaved(format!("{e:#}"))))
        }
    }
}

/// Measures everything (no cache involved); `devices` measures the ggml devices.
pub fn measure(opts: &MeasureOptions, devices: DeviceProbe) -> Result<MachineProfile> {
    let dir = opts.path.clone().unwrap_or_else(default_models_dir);
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let steps = 3 + storage::steps(opts);
    let bar = progress_bar(opts.progress, steps as u64);

    bar.set_message("CPU");
    let cpu = cpu::probe(ggml::cpu_features());
    bar.inc(1);
    bar.set_message("GPUs (ggml devices)");
    let gpus = devices();
    bar.inc(1);
    bar.set_message("memory bandwidth");
    let memory = memory::probe(opts.quick)?;
    bar.inc(1);
    let storage = storage::measure(&dir, opts, &bar)
        .with_context(|| format!("measuring storage under {}", dir.display()))?;
    bar.finish_and_clear();

    Ok(MachineProfile {
        version: PROFILE_VERSION,
        machine_key: machine_key_for(&cpu.model, memory.total_bytes),
        measured_at_unix: crate::util::unix_secs(),
        hypura_version: env!("CARGO_PKG_VERSION").to_string(),
        quick: opts.quick,
        cpu,
        memory,
        storage,
        gpus,
    })
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} profiling [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Writes the profile to the cache (atomically: temp file + rename). Returns the path.
pub fn save(p: &MachineProfile) -> Result<PathBuf> {
    let path = cache_file().context("no cache directory ($XDG_CACHE_HOME and $HOME unset)")?;
    let text = toml::to_string_pretty(p).context("serialising the profile")?;
    crate::util::fs::write_atomic(&path, text)?;
    Ok(path)
}

/// `$XDG_CACHE_HOME/hypura` (or `~/.cache/hypura`).
pub use crate::util::fs::cache_dir;

/// This machine's cache file.
pub fn cache_file() -> Option<PathBuf> {
    Some(cache_dir()?.join(format!("profile-{}.toml", machine_key())))
}

/// Stable key of this machine: FNV-1a of machine id, CPU model and total memory.
pub fn machine_key() -> String {
    machine_key_for(&cpu::model(), memory::total_bytes())
}

fn machine_key_for(cpu_model: &str, total_mem: u64) -> String {
    let id = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    format!(
        "{:016x}",
        fnv1a(format!("{id}\n{cpu_model}\n{total_mem}").as_bytes())
    )
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Rounds to `digits` decimals: figures are noisy anyway, and short decimals survive JSON and
/// TOML round trips exactly.
pub(crate) fn round_to(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

pub(crate) fn canonical_string(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn key_depends_on_inputs() {
        assert_ne!(machine_key_for("a", 1), machine_key_for("a", 2));
        assert_eq!(machine_key_for("a", 1).len(), 16);
    }
}
