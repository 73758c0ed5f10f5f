//! I/O engine behaviour: every backend returns exactly the bytes `std::fs` does, for unaligned
//! ranges of 1 B..64 MiB, on a real model and on tmpfs (the buffered fallback); truncation gives
//! a typed short-read error naming the offset; io_uring and pread agree byte for byte.
//! Nothing here depends on speed.

#![cfg(target_os = "linux")]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hypura::io::{
    open_reader, slot_len_for, AlignedBuf, Backend, BackendKind, FileId, IoError, IoOptions,
    ReadBackend, Ticket, ALIGN,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const MIB: usize = 1 << 20;

/// The real model the CI fetches, or a random 200 MiB file when it is absent.
fn model_file() -> &'static Path {
    static FILE: OnceLock<(PathBuf, Option<tempfile::TempDir>)> = OnceLock::new();
    let (p, _) = FILE.get_or_init(|| {
        let real =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if real.is_file() {
            return (real, None);
        }
        // CI fetches the model and sets HYPURA_REQUIRE_MODELS: its absence is then a failure.
        assert!(
            !std::env::var("HYPURA_REQUIRE_MODELS").is_ok_and(|v| v == "1"),
            "{} is missing and HYPURA_REQUIRE_MODELS=1 (run models/fetch.sh)",
            real.display()
        );
        eprintln!("{} absent: using a random 200 MiB file", real.display());
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let p = dir.path().join("random.bin");
        write_random(&p, 200 * MIB + 123, 7);
        (p, Some(dir))
    });
    p
}

fn write_random(path: &Path, len: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap();
}

fn std_read(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut v, off)
        .unwrap();
    v
}

fn opts(backend: Backend) -> IoOptions {
    IoOptions {
        backend,
        ..IoOptions::default()
    }
}

/// Opens with `backend`; `None` when io_uring is unavailable here (e.g. a seccomp'd CI box).
fn try_open(path: &Path, o: &IoOptions) -> Option<Box<dyn ReadBackend>> {
    match open_reader(path, o) {
        Ok(r) => Some(r),
        Err(IoError::UringUnavailable(e)) => {
            eprintln!("io_uring unavailable here ({e}); skipping the io_uring half");
            None
        }
        Err(e) => panic!("open_reader({}): {e}", path.display()),
    }
}

/// Random `(offset, len)` pairs: log-uniform sizes 1 B..=64 MiB (capped by the file),
/// unaligned offsets, plus the edge cases (first byte, last byte, the unaligned tail).
fn random_ranges(file_len: u64, n: usize, seed: u64) -> Vec<(u64, usize)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let max = (64 * MIB).min(file_len as usize);
    let mut v = vec![
        (0, 1),
        (file_len - 1, 1),
        (file_len - 5000, 5000),
        (4096, 4096),
        (31, 64 * 1024),
    ];
    v.push((0, max));
    for _ in 0..n {
        let bits = rng.gen_range(0.0..(max as f64).log2());
        let len = (2f64.powf(bits) as usize).clamp(1, max);
        let off = rng.gen_range(0..=file_len - len as u64);
        v.push((off, len));
    }
    v
}

/// Reads all `ranges` with up to `batch` requests in flight, collecting them in a scrambled
/// order, and checks each against `std::fs`.
fn check_ranges(r: &mut dyn ReadBackend, path: &Path, ranges: &[(u64, usize)], batch: usize) {
    let mut rng = StdRng::seed_from_u64(99);
    for group in ranges.chunks(batch) {
        let mut tickets: Vec<(Ticket, u64, usize)> = group
            .iter()
            .map(|&(off, len)| {
                let buf = AlignedBuf::for_read(off, len).unwrap();
                assert!(buf.len() >= slot_len_for(off, len));
                (r.submit_owned(FileId(0), off, len, buf).unwrap(), off, len)
            })
            .collect();
        // Collect out of order: completion is per request.
        while !tickets.is_empty() {
            let i = rng.gen_range(0..tickets.len());
            let (t, off, len) = tickets.swap_remove(i);
            let c = r
                .wait(t)
                .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
            assert_eq!((c.file_offset, c.len), (off, len));
            assert_eq!(c.data_offset, (off % ALIGN as u64) as usize);
            let got = c.bytes().unwrap();
            assert!(
                got == std_read(path, off, len).as_slice(),
                "bytes differ at {off}+{len}"
            );
        }
    }
    assert_eq!(r.outstanding(), 0);
}

#[test]
fn random_ranges_equal_std_fs_on_model_each_backend() {
    let path = model_file();
    let len = std::fs::metadata(path).unwrap().len();
    let ranges = random_ranges(len, 40, 1);
    for backend in [Backend::Uring, Backend::Pread] {
        let Some(mut r) = try_open(path, &opts(backend)) else {
            continue;
        };
        let info = r.info().clone();
        assert!(
            info.direct,
            "O_DIRECT should work on {} ({:?})",
            path.display(),
            info
        );
        assert_eq!(r.file_len(FileId(0)), Some(len));
        check_ranges(r.as_mut(), path, &ranges, 6);
    }
}

#[test]
fn small_chunks_and_shallow_queue_split_large_requests() {
    let path = model_file();
    let len = std::fs::metadata(path).unwrap().len();
    let ranges = random_ranges(len, 12, 2);
    for backend in [Backend::Uring, Backend::Pread] {
        let o = IoOptions {
            backend,
            queue_depth: 3,
            chunk_size: 64 * 1024,
            max_requests: 8,
            ..IoOptions::default()
        };
        let Some(mut r) = try_open(path, &o) else {
            continue;
        };
        check_ranges(r.as_mut(), path, &ranges, 8);
    }
}

fn is_tmpfs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

fn kernel_refuses_o_direct(p: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EINVAL),
    }
}

#[test]
fn tmpfs_fallback_reads_equal_std_fs() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() || !is_tmpfs(shm) {
        eprintln!("/dev/shm is not tmpfs here; skipping");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("weights.bin");
    let flen = 24 * MIB + 777;
    write_random(&path, flen, 3);
    let ranges = random_ranges(flen as u64, 25, 4);
    let refused = kernel_refuses_o_direct(&path);
    for backend in [Backend::Uring, Backend::Pread] {
        // Tmpfs refuses O_DIRECT before Linux 6.6; on newer kernels we inject the refusal so
        // the same fallback path is exercised.
        let mut o = opts(backend);
        o.simulate.direct_refused = !refused;
        let Some(mut r) = try_open(&path, &o) else {
            continue;
        };
        let info = r.info().clone();
        assert!(
            !info.direct,
            "fallback to buffered reads expected: {info:?}"
        );
        assert!(
            info.fallbacks
                .iter()
                .any(|f| f.contains("O_DIRECT refused")),
            "fallback not reported: {info:?}"
        );
        check_ranges(r.as_mut(), &path, &ranges, 5);

        if !refused {
            // And the real thing: this kernel's tmpfs takes O_DIRECT.
            let Some(mut r) = try_open(&path, &opts(backend)) else {
                continue;
            };
            assert!(r.info().direct);
            check_ranges(r.as_mut(), &path, &ranges, 5);
        }
    }
}

#[test]
fn truncated_after_open_gives_short_read_naming_the_offset() {
    for backend in [Backend::Uring, Backend::Pread] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("t.bin");
        write_random(&path, 8 * MIB, 5);
        let Some(mut r) = try_open(&path, &opts(backend)) else {
            continue;
        };
        let new_len = MIB as u64 + 100;
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(new_len)
            .unwrap();

        // Entirely past the new end.
        let off = 2 * MIB as u64 + 12;
        let mut buf = AlignedBuf::for_read(off, 65536).unwrap();
        match r.read_blocking(FileId(0), off, 65536, &mut buf) {
            Err(e @ IoError::ShortRead { .. }) => {
                let IoError::ShortRead {
                    offset,
                    expected,
                    got,
                    ref file,
                } = e
                else {
                    unreachable!()
                };
                assert_eq!((offset, expected, got), (off, 65536, 0));
                assert_eq!(file, &path);
                let msg = e.to_string();
                assert!(
                    msg.contains(&off.to_string()) && msg.contains("t.bin"),
                    "{msg}"
                );
            }
            other => panic!("{backend:?}: expected ShortRead, got {other:?}"),
        }

        // Straddling the new end: some bytes, not all, is still an error.
        let off = MIB as u64 - 1000;
        let mut buf = AlignedBuf::for_read(off, 3 * MIB).unwrap();
        match r.read_blocking(FileId(0), off, 3 * MIB, &mut buf) {
            Err(IoError::ShortRead {
                offset,
                expected,
                got,
                ..
            }) => {
                assert_eq!((offset, expected, got), (off, 3 * MIB, 1100));
            }
            other => panic!("{backend:?}: expected ShortRead, got {other:?}"),
        }

        // Up to exactly the new (unaligned) end is fine.
        let off = MIB as u64 - 50;
        let mut buf = AlignedBuf::for_read(off, 150).unwrap();
        let range = r.read_blocking(FileId(0), off, 150, &mut buf).unwrap();
        assert_eq!(&buf.as_slice()[range], std_read(&path, off, 150).as_slice());
        assert_eq!(r.outstanding(), 0);
    }
}

#[test]
fn uring_and_pread_give_identical_bytes() {
    let path = model_file();
    let len = std::fs::metadata(path).unwrap().len() as usize;
    let Some(mut u) = try_open(path, &opts(Backend::Uring)) else {
        return;
    };
    assert_eq!(u.info().backend, BackendKind::Uring);
    let mut p = open_reader(path, &opts(Backend::Pread)).unwrap();
    assert_eq!(p.info().backend, BackendKind::Pread);
    for (off, n) in [
        (0u64, len),
        (13, len - 13),
        (len as u64 / 3 + 5, 7 * MIB + 3),
    ] {
        let mut a = AlignedBuf::for_read(off, n).unwrap();
        let mut b = AlignedBuf::for_read(off, n).unwrap();
        let ra = u.read_blocking(FileId(0), off, n, &mut a).unwrap();
        let rb = p.read_blocking(FileId(0), off, n, &mut b).unwrap();
        assert_eq!(ra, rb);
        assert!(
            a.as_slice()[ra] == b.as_slice()[rb],
            "backends differ at {off}+{n}"
        );
    }
}

#[test]
fn uring_fixed_buffers_and_registration_fallback() {
    let path = model_file();
    let Some(mut r) = try_open(path, &opts(Backend::Uring)) else {
        return;
    };
    let info = r.info().clone();
    assert!(!info.fixed_buffers);
    // The buffers are registered first, then handed over: reads use READ_FIXED.
    let bufs: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::new(3 * MIB).unwrap()).collect();
    let regions: Vec<(*mut u8, usize)> = bufs
        .iter()
        .map(|b| (b.as_ptr() as *mut u8, b.len()))
        .collect();
    let on = r.register_buffers(&regions).unwrap();
    // Registration may be refused (RLIMIT_MEMLOCK); either way reads must be right.
    assert_eq!(on, r.info().fixed_buffers);
    let mut ts = Vec::new();
    for (i, b) in bufs.into_iter().enumerate() {
        let off = 1000 + i as u64 * 5 * MIB as u64;
        ts.push((r.submit_owned(FileId(0), off, 2 * MIB + 5, b).unwrap(), off));
    }
    for (t, off) in ts.into_iter().rev() {
        let c = r.wait(t).unwrap();
        assert!(c.bytes().unwrap() == std_read(path, off, 2 * MIB + 5).as_slice());
    }

    let mut o = opts(Backend::Uring);
    o.simulate.register_buffers_fails = true;
    let mut r = open_reader(path, &o).unwrap();
    let buf = AlignedBuf::new(MIB).unwrap();
    assert!(!r
        .register_buffers(&[(buf.as_ptr() as *mut u8, buf.len())])
        .unwrap());
    assert!(
        r.info()
            .fallbacks
            .iter()
            .any(|f| f.contains("fixed buffers")),
        "{:?}",
        r.info()
    );
    let t = r.submit_owned(FileId(0), 5, 1000, buf).unwrap();
    assert!(r.wait(t).unwrap().bytes().unwrap() == std_read(path, 5, 1000).as_slice());
}

#[test]
fn uring_unavailable_falls_back_to_pread() {
    let path = model_file();
    let mut o = opts(Backend::Auto);
    o.simulate.uring_unavailable = true;
    let mut r = open_reader(path, &o).unwrap();
    assert_eq!(r.info().backend, BackendKind::Pread);
    assert!(r
        .info()
        .fallbacks
        .iter()
        .any(|f| f.contains("io_uring unavailable")));
    check_ranges(
        r.as_mut(),
        path,
        &random_ranges(std::fs::metadata(path).unwrap().len(), 5, 6),
        3,
    );
    // Asking for io_uring explicitly is an error, not a silent fallback.
    o.backend = Backend::Uring;
    assert!(matches!(
        open_reader(path, &o),
        Err(IoError::UringUnavailable(_))
    ));
}

#[test]
fn tickets_queue_bounds_and_bad_requests() {
    let path = model_file();
    for backend in [Backend::Uring, Backend::Pread] {
        let o = IoOptions {
            backend,
            max_requests: 4,
            queue_depth: 2,
            ..IoOptions::default()
        };
        let Some(mut r) = try_open(path, &o) else {
            continue;
        };

        // A buffer smaller than slot_len_for is refused up front.
        let small = AlignedBuf::new(4096).unwrap();
        assert!(matches!(
            r.submit_owned(FileId(0), 4000, 200, small),
            Err(IoError::InvalidRequest(_))
        ));
        let b = AlignedBuf::new(4096).unwrap();
        assert!(matches!(
            r.submit_owned(FileId(3), 0, 10, b),
            Err(IoError::InvalidRequest(_))
        ));

        // The table is bounded: the fifth outstanding request is refused.
        let mut ts = Vec::new();
        for i in 0..4u64 {
            let buf = AlignedBuf::for_read(i * 1_000_003, 300_000).unwrap();
            ts.push(
                r.submit_owned(FileId(0), i * 1_000_003, 300_000, buf)
                    .unwrap(),
            );
        }
        let extra = AlignedBuf::new(8192).unwrap();
        assert!(matches!(
            r.submit_owned(FileId(0), 0, 10, extra),
            Err(IoError::QueueFull { capacity: 4 })
        ));
        assert_eq!(r.outstanding(), 4);

        // try_wait never blocks and eventually sees the completion; a ticket is collected once.
        let t = ts.pop().unwrap();
        let c = loop {
            if let Some(c) = r.try_wait(t).unwrap() {
                break c;
            }
            std::thread::yield_now();
        };
        assert_eq!(c.file_offset, 3 * 1_000_003);
        assert!(matches!(r.try_wait(t), Err(IoError::BadTicket)));
        assert!(matches!(r.wait(t), Err(IoError::BadTicket)));
        r.wait_all(&ts).unwrap();
        assert_eq!(r.outstanding(), 0);

        // Zero-length reads complete at once.
        let t = r
            .submit_owned(FileId(0), 12345, 0, AlignedBuf::new(4096).unwrap())
            .unwrap();
        assert_eq!(r.wait(t).unwrap().len, 0);

        // Requests still queued when the reader is dropped are cancelled safely.
        for i in 0..4u64 {
            let buf = AlignedBuf::for_read(i * 4096, 8 * MIB).unwrap();
            r.submit_owned(FileId(0), i * 4096, 8 * MIB, buf).unwrap();
        }
        drop(r);
    }
}

#[test]
fn second_file_in_the_same_reader() {
    let path = model_file();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let other = dir.path().join("shard2.bin");
    write_random(&other, 3 * MIB + 1, 8);
    for backend in [Backend::Uring, Backend::Pread] {
        let Some(mut r) = try_open(path, &opts(backend)) else {
            continue;
        };
        let f = r.add_file(&other).unwrap();
        assert_eq!(f, FileId(1));
        assert_eq!(r.file_len(f), Some(3 * MIB as u64 + 1));
        let mut buf = AlignedBuf::for_read(77, 3 * MIB - 76).unwrap();
        let range = r.read_blocking(f, 77, 3 * MIB - 76, &mut buf).unwrap();
        assert!(buf.as_slice()[range] == std_read(&other, 77, 3 * MIB - 76)[..]);
        let mut buf = AlignedBuf::for_read(100, 100).unwrap();
        let range = r.read_blocking(FileId(0), 100, 100, &mut buf).unwrap();
        assert!(buf.as_slice()[range] == std_read(path, 100, 100)[..]);
    }
}
