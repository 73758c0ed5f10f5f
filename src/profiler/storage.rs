//! Storage throughput and latency through Hypura's own I/O engine, bypassing the page cache.
//!
//! The file read is `--file`, else the largest `.gguf` under the directory when it is big
//! enough, else a scratch file written with O_DIRECT (so it is not in the page cache) and
//! removed afterwards, also on errors.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;

use super::{BackendComparison, MeasureOptions, SeqResult, StorageProfile};
use crate::io::{
    self, open_reader, AlignedBuf, Backend, FileId, IoOptions, ReadBackend, ReaderInfo,
};
use crate::util::rng::Rng;

pub(crate) const QUEUE_DEPTHS: [usize; 4] = [1, 4, 16, 32];
pub(crate) const BLOCK_SIZES: [usize; 3] = [128 << 10, 1 << 20, 4 << 20];
const RAND_QD: usize = 32;
const COMPARE_QD: usize = 16;
const COMPARE_BS: usize = 1 << 20;
const COMPARE_RUNS: usize = 3;
const MIB: u64 = 1 << 20;

/// Sizes and time budgets.
struct Plan {
    scratch_bytes: u64,
    /// A model at least this big is read instead of writing a scratch file.
    min_model_bytes: u64,
    seq_budget: Duration,
    rand_budget: Duration,
    rand_max_ops: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                scratch_bytes: 32 * MIB,
                min_model_bytes: 16 * MIB,
                seq_budget: Duration::from_millis(60),
                rand_budget: Duration::from_millis(100),
                rand_max_ops: 2000,
            }
        } else {
            Plan {
                scratch_bytes: 1024 * MIB,
                min_model_bytes: 512 * MIB,
                seq_budget: Duration::from_millis(1200),
                rand_budget: Duration::from_millis(1000),
                rand_max_ops: 50_000,
            }
        }
    }
}

/// Progress steps of [`measure`].
pub(crate) fn steps(opts: &MeasureOptions) -> usize {
    1 + QUEUE_DEPTHS.len() * BLOCK_SIZES.len()
        + 2
        + if opts.compare_backends {
            2 * COMPARE_RUNS
        } else {
            0
        }
}

/// Removes the scratch file when dropped (errors and panics included).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not remove scratch file {}: {e}", self.0.display());
            }
        }
    }
}

pub(crate) fn measure(
    dir: &Path,
    opts: &MeasureOptions,
    bar: &ProgressBar,
) -> Result<StorageProfile> {
    let plan = Plan::new(opts.quick);
    let mut fallbacks: Vec<String> = Vec::new();

    bar.set_message("storage: preparing the test file");
    let (file, scratch) = if let Some(f) = &opts.file {
        anyhow::ensure!(f.is_file(), "{} is not a file", f.display());
        (f.clone(), None)
    } else if let Some(m) = largest_model(dir, plan.min_model_bytes) {
        (m, None)
    } else {
        let path = dir.join(format!(
            ".hypura-profile-scratch-{}.bin",
            std::process::id()
        ));
        let guard = Scratch(path.clone());
        let bytes = scratch_size(dir, plan.scratch_bytes)?;
        writescratch(&path, bytes, &mut fallbacks)?;
        (path, Some(guard))
    };
    let file_len = std::fs::metadata(&file)
        .with_context(|| format!("stat {}", file.display()))?
        .len();
    anyhow::ensure!(
        file_len >= 4096,
        "{} is too small to measure ({file_len} bytes)",
        file.display()
    );
    bar.inc(1);

    let mut pool = Pool::default();
    let mut infos: Vec<ReaderInfo> = Vec::new();
    let mut seq = Vec::new();
    for &qd in &QUEUE_DEPTHS {
        for &bs in &BLOCK_SIZES {
            bar.set_message(format!(
                "storage: sequential, queue depth {qd}, {} KiB blocks",
                bs >> 10
            ));
            let (gbps, info) = seq_run(
                &file,
                file_len,
                opts.backend,
                qd,
                bs,
                plan.seq_budget,
                &mut pool,
            )?;
            seq.push(SeqResult {
                queue_depth: qd,
                block_size: bs,
                gbps,
            });
            infos.push(info);
            bar.inc(1);
        }
    }

    bar.set_message("storage: random 4 KiB latency (queue depth 1)");
    let (lat, info) = rand_run(&file, file_len, opts.backend, 1, &plan, &mut pool)?;
    infos.push(info);
    bar.inc(1);
    let (p50, p99) = percentiles(lat.latencies_us);
    bar.set_message(format!(
        "storage: random 4 KiB IOPS (queue depth {RAND_QD})"
    ));
    let (iops, info) = rand_run(&file, file_len, opts.backend, RAND_QD, &plan, &mut pool)?;
    infos.push(info);
    bar.inc(1);

    let mut backend_comparison = Vec::new();
    if opts.compare_backends {
        let mut runs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let backends = [Backend::Uring, Backend::Pread];
        for i in 0..COMPARE_RUNS * 2 {
            let b = i % 2;
            bar.set_message(format!(
                "storage: io_uring vs pread at queue depth {COMPARE_QD}, run {}",
                i / 2 + 1
            ));
            match seq_run(
                &file,
                file_len,
                backends[b],
                COMPARE_QD,
                COMPARE_BS,
                plan.seq_budget,
                &mut pool,
            ) {
                Ok((g, info)) => {
                    runs[b].push(g);
                    infos.push(info);
                }
                Err(e) if b == 0 => {
                    fallbacks.push(format!("backend comparison: io_uring not measured ({e:#})"))
                }
                Err(e) => return Err(e),
            }
            bar.inc(1);
        }
        for (b, r) in backends.iter().zip(runs) {
            if r.is_empty() {
                continue;
            }
            backend_comparison.push(BackendComparison {
                backend: match b {
                    Backend::Uring => "io_uring".into(),
                    _ => "pread".into(),
                },
                queue_depth: COMPARE_QD,
                block_size: COMPARE_BS,
                median_gbps: super::round_to(median(&r), 3),
                runs_gbps: r,
            });
        }
    }

    for info in &infos {
        for f in &info.fallbacks {
            if !fallbacks.contains(f) {
                fallbacks.push(f.clone());
            }
        }
    }
    let main = &infos[0];
    let best = seq
        .iter()
        .max_by(|a, b| a.gbps.total_cmp(&b.gbps))
        .expect("at least one run")
        .clone();
    Ok(StorageProfile {
        path: super::canonical_string(dir),
        file: if scratch.is_some() {
            "(scratch file, removed)".to_string()
        } else {
            super::canonical_string(&file)
        },
        file_bytes: file_len,
        scratch_file: scratch.is_some(),
        backend: main.backend.to_string(),
        direct: main.direct,
        fixed_buffers: main.fixed_buffers,
        fallbacks,
        best_seq_gbps: best.gbps,
        best_seq_queue_depth: best.queue_depth,
        best_seq_block_size: best.block_size,
        seq,
        rand4k_p50_us: p50,
        rand4k_p99_us: p99,
        rand4k_iops: iops.ops_per_sec.round(),
        rand4k_queue_depth: RAND_QD,
        backend_comparison,
    })
}

/// The largest `*.gguf` directly under `dir` of at least `min` bytes.
fn largest_model(dir: &Path, min: u64) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        })
        .filter_map(|e| Some((e.metadata().ok().filter(|m| m.is_file())?.len(), e.path())))
        .filter(|(len, _)| *len >= min)
        .max()
        .map(|(_, p)| p)
}

/// The scratch size that fits: the plan's, or less on a nearly full filesystem.
fn scratch_size(dir: &Path, want: u64) -> Result<u64> {
    // The field types differ between platforms (u32 on macOS).
    #[allow(clippy::unnecessary_cast)]
    let avail = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64)
        .unwrap_or(u64::MAX);
    let fits = (avail / 2).min(want) / MIB * MIB;
    if fits < 16 * MIB {
        bail!(
            "not enough free space under {} for a scratch file ({} MiB free)",
            dir.display(),
            avail / MIB
        );
    }
    Ok(fits)
}

/// Writes `bytes` of random data, bypassing the page cache where possible (else flushing and
/// dropping it afterwards), so the reads that follow come from the device.
fn writescratch(path: &Path, bytes: u64, fallbacks: &mut Vec<String>) -> Result<()> {
    use std::io::Write;
    let (mut f, direct) =
        io::open_for_write_nocache(path).with_context(|| format!("creating {}", path.display()))?;
    const BLOCK: usize = 4 << 20;
    let mut block = AlignedBuf::new(BLOCK)?;
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    rng.fill_bytes(block.as_mut_slice());
    let mut written = 0u64;
    while written < bytes {
        let n = (bytes - written).min(BLOCK as u64) as usize;
        // Make every block distinct (no dedup/compression shortcuts).
        block.as_mut_slice()[..8].copy_from_slice(&(written ^ rng.next_u64()).to_le_bytes());
        f.write_all(&block.as_slice()[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        written += n as u64;
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    if !direct {
        io::drop_cache(&f, 0, bytes);
        fallbacks.push(format!(
            "scratch file written through the page cache (O_DIRECT refused on {}), then dropped from it",
            path.parent().unwrap_or(path).display()
        ));
    }
    Ok(())
}

/// Page-aligned buffers reused across runs.
#[derive(Default)]
struct Pool {
    bufs: Vec<AlignedBuf>,
}

impl Pool {
    /// `n` buffers of at least `len` bytes.
    fn take(&mut self, n: usize, len: usize) -> Result<Vec<AlignedBuf>> {
        self.bufs.retain(|b| b.len() >= len);
        while self.bufs.len() < n {
            self.bufs.push(AlignedBuf::new(len.max(4 << 20))?);
        }
        Ok(self.bufs.split_off(self.bufs.len() - n))
    }

    fn give(&mut self, bufs: impl IntoIterator<Item = AlignedBuf>) {
        self.bufs.extend(bufs);
    }
}

fn open(file: &Path, backend: Backend, qd: usize, bs: usize) -> Result<Box<dyn ReadBackend>> {
    let opts = IoOptions {
        backend,
        queue_depth: qd,
        chunk_size: bs,
        max_requests: qd,
        direct: true,
        ..IoOptions::default()
    };
    let r = open_reader(file, &opts).with_context(|| format!("opening {}", file.display()))?;
    if !r.info().direct {
        // Buffered fallback: at least start from a cold cache.
        if let Ok(f) = std::fs::File::open(file) {
            io::drop_cache(&f, 0, 0);
        }
    }
    Ok(r)
}

fn register(r: &mut dyn ReadBackend, bufs: &[AlignedBuf]) -> Result<()> {
    let regions: Vec<(*mut u8, usize)> = bufs
        .iter()
        .map(|b| (b.as_ptr() as *mut u8, b.len()))
        .collect();
    r.register_buffers(&regions)?;
    Ok(())
}

/// Sequential read of the file from the start (one pass at most, within `budget`) with `qd`
/// requests of `bs` bytes in flight. GB/s.
fn seq_run(
    file: &Path,
    file_len: u64,
    backend: Backend,
    qd: usize,
    bs: usize,
    budget: Duration,
    pool: &mut Pool,
) -> Result<(f64, ReaderInfo)> {
    let mut r = open(file, backend, qd, bs)?;
    let mut spare = pool.take(qd, bs)?;
    register(r.as_mut(), &spare)?;
    let mut inflight = VecDeque::with_capacity(qd);
    let mut off = 0u64;
    let mut bytes = 0u64;
    let t0 = Instant::now();
    while let Some(b) = spare.pop() {
        if off >= file_len {
            spare.push(b);
            break;
        }
        let len = (file_len - off).min(bs as u64) as usize;
        inflight.push_back((r.submit_owned(FileId(0), off, len, b)?, len));
        off += len as u64;
    }
    while let Some((t, len)) = inflight.pop_front() {
        let c = r.wait(t)?;
        bytes += len as u64;
        let b = c.into_buf().expect("owned buffer");
        if off < file_len && t0.elapsed() < budget {
            let len = (file_len - off).min(bs as u64) as usize;
            inflight.push_back((r.submit_owned(FileId(0), off, len, b)?, len));
            off += len as u64;
        } else {
            spare.push(b);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let info = r.info().clone();
    drop(r);
    pool.give(spare);
    Ok((super::round_to(bytes as f64 / secs / 1e9, 3), info))
}

struct RandResult {
    latencies_us: Vec<f64>,
    ops_per_sec: f64,
}

/// Random aligned 4 KiB reads with `qd` in flight until the budget or op cap.
fn rand_run(
    file: &Path,
    file_len: u64,
    backend: Backend,
    qd: usize,
    plan: &Plan,
    pool: &mut Pool,
) -> Result<(RandResult, ReaderInfo)> {
    const BS: usize = 4096;
    let blocks = file_len / BS as u64;
    let mut r = open(file, backend, qd, BS)?;
    let mut spare = pool.take(qd, BS)?;
    register(r.as_mut(), &spare)?;
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    let mut lat = Vec::with_capacity(plan.rand_max_ops + qd);
    let mut inflight = VecDeque::with_capacity(qd);
    let mut issued = 0usize;
    let t0 = Instant::now();
    while let Some(b) = spare.pop() {
        let off = rng.next_u64() % blocks * BS as u64;
        inflight.push_back((r.submit_owned(FileId(0), off, BS, b)?, Instant::now()));
        issued += 1;
    }
    let mut done = 0usize;
    while let Some((t, started)) = inflight.pop_front() {
        let c = r.wait(t)?;
        lat.push(started.elapsed().as_secs_f64() * 1e6);
        done += 1;
        let b = c.into_buf().expect("owned buffer");
        if issued < plan.rand_max_ops && t0.elapsed() < plan.rand_budget {
            let off = rng.next_u64() % blocks * BS as u64;
            inflight.push_back((r.submit_owned(FileId(0), off, BS, b)?, Instant::now()));
            issued += 1;
        } else {
            spare.push(b);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let info = r.info().clone();
    drop(r);
    pool.give(spare);
    Ok((
        RandResult {
            latencies_us: lat,
            ops_per_sec: done as f64 / secs,
        },
        info,
    ))
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (super::round_to(at(0.50), 1), super::round_to(at(0.99), 1))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    crate::util::median_sorted(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_and_median() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        let (p50, p99) = percentiles(v.clone());
        assert!((50.0..=51.0).contains(&p50) && (98.0..=100.0).contains(&p99));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
