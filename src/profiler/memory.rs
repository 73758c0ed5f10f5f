//! Memory size, the container's limit (cgroup v2 / v1) and multi-threaded bandwidth.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::MemoryProfile;

/// Limits at or above this are "unlimited" (cgroup v1 writes PAGE_COUNTER_MAX * page size).
const UNLIMITED: u64 = 1 << 60;

pub(crate) fn probe(quick: bool) -> Result<MemoryProfile> {
    let total = total_bytes();
    let mut available = available_bytes().unwrap_or(total);
    let (limit, usage) = cgroup_memory();
    if let Some(l) = limit {
        if let Some(u) = usage {
            available = available.min(l.saturating_sub(u));
        }
    }
    let effective = limit.map_or(total, |l| l.min(total));
    let (read_gbps, copy_gbps, threads) = bandwidth(quick, effective.min(available.max(1 << 30)));
    Ok(MemoryProfile {
        total_bytes: total,
        available_bytes: available.min(effective),
        cgroup_limit_bytes: limit,
        effective_limit_bytes: effective,
        read_gbps,
        copy_gbps,
        bandwidth_threads: threads,
    })
}

/// Memory this process may use now: available memory, capped by the memory
/// cgroup's limit (the limit itself, not limit − usage: a cgroup's usage
/// counts reclaimable page cache). Read live, so it sees the current cgroup.
pub fn usable_now() -> u64 {
    let total = total_bytes();
    let available = available_bytes().unwrap_or(total);
    let (limit, _) = cgroup_memory();
    limit.map_or(available, |l| available.min(l))
}

/// The tightest memory cgroup limit over this process's cgroup and its
/// ancestors, read live; `None` when unlimited.
pub fn cgroup_limit_now() -> Option<u64> {
    cgroup_memory().0
}

#[cfg(target_os = "linux")]
fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

#[cfg(target_os = "linux")]
pub(crate) fn total_bytes() -> u64 {
    meminfo("MemTotal").unwrap_or(0)
}

#[cfg(target_os = "linux")]
fn available_bytes() -> Option<u64> {
    meminfo("MemAvailable").or_else(|| meminfo("MemFree"))
}

#[cfg(target_os = "macos")]
fn sysctl_u64(name: &str) -> Option<u64> {
    let out = std::process::Command::new("sysctl")
        .arg("-n")
        .arg(name)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[cfg(target_os = "macos")]
pub(crate) fn total_bytes() -> u64 {
    sysctl_u64("hw.memsize").unwrap_or(0)
}

/// Free + inactive + speculative + purgeable pages from `vm_stat`.
#[cfg(target_os = "macos")]
fn available_bytes() -> Option<u64> {
    let out = std::process::Command::new("vm_stat").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let page: u64 = text
        .split("page size of ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mut pages = 0;
    for l in text.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if [
            "Pages free",
            "Pages inactive",
            "Pages speculative",
            "Pages purgeable",
        ]
        .contains(&k.trim())
        {
            pages += v.trim().trim_end_matches('.').parse::<u64>().unwrap_or(0);
        }
    }
    Some(pages * page)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub(crate) fn total_bytes() -> u64 {
    0
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn available_bytes() -> Option<u64> {
    None
}

/// (limit, usage) of this process's memory cgroup; limit `None` when unlimited.
fn cgroup_memory() -> (Option<u64>, Option<u64>) {
    let Ok(self_cgroup) = std::fs::read_to_string("/proc/self/cgroup") else {
        return (None, None);
    };
    cgroup_memory_at(&self_cgroup, Path::new("/sys/fs/cgroup"))
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Reads the limits from a cgroup filesystem mounted at `root`, for a process whose
/// `/proc/self/cgroup` is `self_cgroup`. The tightest limit of the cgroup and its ancestors
/// wins; when the cgroup's own directory is not visible (cgroup namespaces), the mount root is
/// the process's cgroup.
pub(crate) fn cgroup_memory_at(self_cgroup: &str, root: &Path) -> (Option<u64>, Option<u64>) {
    let mut limit: Option<u64> = None;
    let mut usage: Option<u64> = None;
    let mut tighten = |v: Option<u64>| {
        if let Some(v) = v.filter(|&v| v < UNLIMITED) {
            limit = Some(limit.map_or(v, |l| l.min(v)));
        }
    };
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if id == "0" && ctrls.is_empty() {
            // cgroup v2 (pure, or the unified half of a hybrid setup).
            for mount in [root.to_path_buf(), root.join("unified")] {
                for dir in candidate_dirs(&mount, rel) {
                    match std::fs::read_to_string(dir.join("memory.max")) {
                        Ok(s) if s.trim() == "max" => {}
                        Ok(s) => tighten(s.trim().parse().ok()),
                        Err(_) => continue,
                    }
                    if usage.is_none() {
                        usage = read_u64(&dir.join("memory.current"));
                    }
                }
            }
        } else if ctrls.split(',').any(|c| c == "memory") {
            let mount = root.join("memory");
            for dir in candidate_dirs(&mount, rel) {
                let Some(v) = read_u64(&dir.join("memory.limit_in_bytes")) else {
                    continue;
                };
                tighten(Some(v));
                if usage.is_none() {
                    usage = read_u64(&dir.join("memory.usage_in_bytes"));
                }
            }
        }
    }
    (limit, usage)
}

/// `mount/rel` and its ancestors up to `mount`, deepest first; just `mount` when `mount/rel`
/// does not exist (a namespaced view).
fn candidate_dirs(mount: &Path, rel: &str) -> Vec<std::path::PathBuf> {
    let own = mount.join(rel);
    if !own.is_dir() {
        return if mount.is_dir() {
            vec![mount.to_path_buf()]
        } else {
            vec![]
        };
    }
    let mut v = Vec::new();
    let mut d = own.as_path();
    loop {
        v.push(d.to_path_buf());
        if d == mount {
            break;
        }
        match d.parent() {
            Some(p) if p.starts_with(mount) => d = p,
            _ => break,
        }
    }
    v
}

/// (read GB/s, copy GB/s, threads) with every usable core, over a buffer of at most
/// `budget / 8` bytes.
fn bandwidth(quick: bool, budget: u64) -> (f64, f64, usize) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let bytes = want.min(budget / 8).max(16 << 20) as usize;
    let words = bytes / 8 / threads / 64 * 64 * threads;
    let target = Duration::from_millis(if quick { 100 } else { 700 });

    // Touch every page first so page faults are not measured.
    let mut buf: Vec<u64> = (0..words as u64).collect();
    let per = words / threads;

    let read = best_of(target, || {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(per) {
                s.spawn(move || {
                    std::hint::black_box(part.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                });
            }
        });
        (words * 8) as f64 / t0.elapsed().as_secs_f64()
    });

    let (src, dst) = buf.split_at_mut(words / 2);
    let per = src.len().div_ceil(threads);
    let copy = best_of(target, || {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for (a, b) in src.chunks(per).zip(dst.chunks_mut(per)) {
                s.spawn(move || {
                    b.copy_from_slice(a);
                    std::hint::black_box(b.first());
                });
            }
        });
        (src.len() * 8) as f64 / t0.elapsed().as_secs_f64()
    });
    (
        super::round_to(read / 1e9, 3),
        super::round_to(copy / 1e9, 3),
        threads,
    )
}

/// Runs `f` (returning bytes/s) at least three times and until `target` has passed; the best.
fn best_of(target: Duration, mut f: impl FnMut() -> f64) -> f64 {
    let t0 = Instant::now();
    let mut best: f64 = 0.0;
    let mut runs = 0;
    while runs < 3 || (t0.elapsed() < target && runs < 50) {
        best = best.max(f());
        runs += 1;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn cgroup_walks_v1_and_v2_ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let v2 = root.join("a/b");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "1000\n").unwrap();
        std::fs::write(v2.join("memory.current"), "300\n").unwrap();
        std::fs::write(root.join("a/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_at("0::/a/b\n", root), (Some(1000), Some(300)));
        let v1 = root.join("memory/x/y");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        std::fs::write(root.join("memory/x/memory.limit_in_bytes"), "500\n").unwrap();
        std::fs::write(root.join("memory/x/memory.usage_in_bytes"), "100\n").unwrap();
        assert_eq!(
            cgroup_memory_at("4:memory:/x/y\n", root),
            (Some(500), Some(100))
        );
        assert_eq!(cgroup_memory_at("1:cpu:/\n", root), (None, None));
    }

    #[test]
    fn cgroup_v2_nested_limits() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(&r.join("a/memory.max"), "1073741824\n");
        write(&r.join("a/b/memory.max"), "max\n");
        write(&r.join("a/b/memory.current"), "1000\n");
        assert_eq!(
            cgroup_memory_at("0::/a/b\n", r),
            (Some(1 << 30), Some(1000))
        );
        write(&r.join("a/b/memory.max"), "536870912\n");
        assert_eq!(cgroup_memory_at("0::/a/b\n", r).0, Some(1 << 29));
    }

    #[test]
    fn cgroup_v1_and_namespaced_view() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        // The process's own directory is not visible: the mount root stands for it.
        write(&r.join("memory/memory.limit_in_bytes"), "2147483648\n");
        write(&r.join("memory/memory.usage_in_bytes"), "5\n");
        assert_eq!(
            cgroup_memory_at("4:memory:/docker/abc\n1:cpu:/x\n", r),
            (Some(2 << 30), Some(5))
        );
        write(
            &r.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        assert_eq!(cgroup_memory_at("4:memory:/docker/abc\n", r).0, None);
    }

    #[test]
    fn unlimited_v2() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("memory.max"), "max\n");
        assert_eq!(cgroup_memory_at("0::/\n", d.path()).0, None);
    }
}
