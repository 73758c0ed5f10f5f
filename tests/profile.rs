//! `hypura profile`: JSON fields present and sane, cached under $XDG_CACHE_HOME, reused without
//! --force, scratch file removed, models never touched. No assertion depends on speed.

use std::path::Path;
use std::process::{Command, Output};

use hypura::profiler::MachineProfile;

fn profile(cache: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_hypura"))
        .arg("profile")
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("HYPURA_PROFILE_QUICK")
        .output()
        .expect("running hypura");
    assert!(
        out.status.success(),
        "hypura profile {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn parse(out: &Output) -> (serde_json::Value, MachineProfile) {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"));
    let p: MachineProfile = serde_json::from_str(&text).unwrap();
    (v, p)
}

fn cache_files(cache: &Path) -> Vec<std::path::PathBuf> {
    let dir = cache.join("hypura");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn check_sane(v: &serde_json::Value, p: &MachineProfile) {
    for key in ["cpu", "memory", "storage", "gpus", "machine_key", "version"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for key in ["model", "physical_cores", "logical_cores", "simd"] {
        assert!(v["cpu"].get(key).is_some(), "missing cpu.{key}");
    }
    for key in [
        "total_bytes",
        "available_bytes",
        "effective_limit_bytes",
        "read_gbps",
        "copy_gbps",
    ] {
        assert!(v["memory"].get(key).is_some(), "missing memory.{key}");
    }
    for key in [
        "path",
        "backend",
        "fallbacks",
        "seq",
        "best_seq_gbps",
        "rand4k_p50_us",
        "rand4k_p99_us",
        "rand4k_iops",
    ] {
        assert!(v["storage"].get(key).is_some(), "missing storage.{key}");
    }

    let c = &p.cpu;
    assert!(!c.model.is_empty());
    assert!(c.physical_cores >= 1 && c.physical_cores <= c.logical_cores);
    assert!(c.usable_cores >= 1 && c.usable_cores <= c.logical_cores);

    let m = &p.memory;
    assert!(m.total_bytes > 0);
    assert!(m.available_bytes <= m.total_bytes);
    assert!(m.effective_limit_bytes <= m.total_bytes && m.effective_limit_bytes > 0);
    if let Some(l) = m.cgroup_limit_bytes {
        assert!(m.effective_limit_bytes <= l);
    }
    assert!(m.available_bytes <= m.effective_limit_bytes);
    assert!(m.read_gbps > 0.0 && m.copy_gbps > 0.0);

    let s = &p.storage;
    assert!(
        s.backend == "io_uring" || s.backend == "pread",
        "{}",
        s.backend
    );
    assert_eq!(
        s.seq.len(),
        12,
        "queue depths 1/4/16/32 x blocks 128K/1M/4M"
    );
    for qd in [1, 4, 16, 32] {
        for bs in [128 << 10, 1 << 20, 4 << 20] {
            let r = s
                .seq
                .iter()
                .find(|r| r.queue_depth == qd && r.block_size == bs);
            assert!(
                r.is_some_and(|r| r.gbps > 0.0 && r.gbps.is_finite()),
                "seq QD{qd} {bs}"
            );
        }
    }
    let best = s.seq.iter().map(|r| r.gbps).fold(0.0, f64::max);
    assert_eq!(s.best_seq_gbps, best);
    assert!(s.rand4k_p50_us > 0.0 && s.rand4k_p99_us >= s.rand4k_p50_us);
    assert!(s.rand4k_iops > 0.0);
    assert!(s.file_bytes >= 4096);

    assert!(
        !p.gpus.is_empty(),
        "ggml always has at least the CPU device"
    );
    for g in &p.gpus {
        assert!(!g.name.is_empty());
        assert!(["cpu", "gpu", "igpu", "accel", "other"].contains(&g.kind.as_str()));
        assert!(g.free_bytes <= g.total_bytes);
    }
}

#[test]
fn profile_json_cache_reuse_and_scratch_cleanup() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir_s = dir.path().to_str().unwrap();

    let first = profile(
        cache.path(),
        &["--json", "--force", "--quick", "--path", dir_s],
    );
    let (v, p) = parse(&first);
    check_sane(&v, &p);
    assert!(p.quick);
    assert!(
        p.storage.scratch_file,
        "empty dir: a scratch file is written"
    );
    assert_eq!(
        p.storage.path,
        std::fs::canonicalize(dir.path())
            .unwrap()
            .display()
            .to_string()
    );

    // Scratch file removed.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // Cached as TOML under $XDG_CACHE_HOME/hypura, keyed to the machine, same content.
    let files = cache_files(cache.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(name, format!("profile-{}.toml", p.machine_key));
    let cached: MachineProfile =
        toml::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    assert_eq!(cached, p);
    let mtime = std::fs::metadata(&files[0]).unwrap().modified().unwrap();

    // Without --force: the cache is reused, same content, nothing re-measured or rewritten.
    let second = profile(cache.path(), &["--json", "--quick", "--path", dir_s]);
    assert_eq!(second.stdout, first.stdout);
    assert!(String::from_utf8_lossy(&second.stderr).contains("cached"));
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().modified().unwrap(),
        mtime
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());

    // Table output from the cache.
    let table = profile(cache.path(), &["--quick", "--path", dir_s]);
    let text = String::from_utf8(table.stdout).unwrap();
    for section in [
        "CPU",
        "Memory",
        "Storage",
        "sequential GB/s",
        "random 4 KiB",
        "Devices",
    ] {
        assert!(text.contains(section), "table lacks {section}:\n{text}");
    }

    // --force measures again.
    let third = profile(
        cache.path(),
        &["--json", "--force", "--quick", "--path", dir_s],
    );
    assert!(String::from_utf8_lossy(&third.stderr).contains("saved"));
    let (v3, p3) = parse(&third);
    check_sane(&v3, &p3);
    assert_eq!(cache_files(cache.path()).len(), 1);
}

#[test]
fn profile_reads_an_existing_model_and_leaves_it_alone() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let model = dir.path().join("model.gguf");
    let data: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&model, &data).unwrap();

    let out = profile(
        cache.path(),
        &[
            "--json",
            "--force",
            "--quick",
            "--path",
            dir.path().to_str().unwrap(),
        ],
    );
    let (v, p) = parse(&out);
    check_sane(&v, &p);
    assert!(!p.storage.scratch_file);
    assert!(p.storage.file.ends_with("model.gguf"), "{}", p.storage.file);
    assert_eq!(p.storage.file_bytes, data.len() as u64);
    assert_eq!(
        std::fs::read(&model).unwrap(),
        data,
        "the model must be untouched"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("model.gguf")]);
}

#[test]
fn profile_rejects_a_missing_directory() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hypura"))
        .args([
            "profile",
            "--quick",
            "--path",
            "/nonexistent/hypura-profile-dir",
        ])
        .env("XDG_CACHE_HOME", cache.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}
