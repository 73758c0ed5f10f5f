//! The fault wrapper over the real backends, on a temp file.

use std::io::Write;
use std::time::{Duration, Instant};

use super::*;
use crate::io::{open_reader, slot_offset_for, Backend, IoOptions};

fn byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ i as u8
}

fn temp_file(len: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..len as u64).map(byte).collect();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    f
}

fn reader(f: &tempfile::NamedTempFile, backend: Backend, plan: FaultPlan) -> FaultReader {
    let opts = IoOptions {
        backend,
        queue_depth: 2,
        chunk_size: 8192,
        ..IoOptions::default()
    };
    let inner = open_reader(f.path(), &opts).unwrap();
    FaultReader::new(inner, f.path(), plan)
}

const BACKENDS: [Backend; 2] = [Backend::Pread, Backend::Uring];

#[test]
fn eio_on_the_nth_read_names_the_file_and_offset_and_poisons_the_bytes() {
    let f = temp_file(1 << 16);
    for backend in BACKENDS {
        let mut r = reader(
            &f,
            backend,
            FaultPlan::new().with(Trigger::Nth(2), Fault::Eio),
        );
        let mut buf = AlignedBuf::new(3 * 4096).unwrap();
        for (i, off) in [100u64, 5000, 9000].into_iter().enumerate() {
            let got = r.read_blocking(FileId(0), off, 6000, &mut buf);
            if i == 1 {
                let e = got.expect_err("the second read fails").to_string();
                assert!(e.contains("EIO"), "{e}");
                assert!(e.contains(&f.path().display().to_string()), "{e}");
                assert!(e.contains("offset 5000"), "{e}");
                let at = slot_offset_for(off);
                assert!(buf.as_slice()[at..at + 6000].iter().all(|&b| b == POISON));
            } else {
                let range = got.unwrap();
                let want: Vec<u8> = (off..off + 6000).map(byte).collect();
                assert_eq!(&buf.as_slice()[range], &want[..], "{backend:?}");
            }
        }
        assert_eq!(r.injected().load(Ordering::Relaxed), 1);
        assert_eq!(r.outstanding(), 0, "the inner read was collected");
    }
}

#[test]
fn a_short_read_looks_like_the_real_one() {
    let f = temp_file(1 << 16);
    for backend in BACKENDS {
        let plan = FaultPlan::new().with(Trigger::Offset(20_000), Fault::Short { missing: 100 });
        let mut r = reader(&f, backend, plan);
        let t = r
            .submit_owned(FileId(0), 19_000, 3000, AlignedBuf::new(8192).unwrap())
            .unwrap();
        let e = r.wait(t).expect_err("short");
        assert!(
            matches!(
                &e,
                IoError::ShortRead { offset: 19_000, expected: 3000, got: 2900, file }
                    if file == f.path()
            ),
            "{e:?}"
        );
        // A real short read (past the end of the file) reads the same way.
        let t = r
            .submit_owned(
                FileId(0),
                (1 << 16) - 100,
                3000,
                AlignedBuf::new(8192).unwrap(),
            )
            .unwrap();
        let real = r.wait(t).expect_err("past the end");
        assert!(matches!(
            real,
            IoError::ShortRead {
                expected: 3000,
                got: 100,
                ..
            }
        ));
        assert_eq!(r.outstanding(), 0);
    }
}

#[test]
fn a_slow_read_is_late_and_exact() {
    let f = temp_file(1 << 16);
    for backend in BACKENDS {
        let d = Duration::from_millis(300);
        let mut r = reader(
            &f,
            backend,
            FaultPlan::new().with(Trigger::All, Fault::Slow(d)),
        );
        let t0 = Instant::now();
        let t = r
            .submit_owned(FileId(0), 4000, 9000, AlignedBuf::new(4 * 4096).unwrap())
            .unwrap();
        assert!(r.try_wait(t).unwrap().is_none(), "not before its time");
        let c = r.wait(t).unwrap();
        assert!(t0.elapsed() >= d);
        let want: Vec<u8> = (4000..13_000).map(byte).collect();
        assert_eq!(c.bytes().unwrap(), &want[..]);
    }
}

#[test]
fn a_refused_submission_queues_nothing_and_leaves_the_others_in_flight() {
    let f = temp_file(1 << 16);
    for backend in BACKENDS {
        let plan = FaultPlan::new().with(Trigger::Nth(2), Fault::Refuse);
        let mut r = reader(&f, backend, plan);
        let first = r
            .submit_owned(FileId(0), 100, 6000, AlignedBuf::new(2 * 4096).unwrap())
            .unwrap();
        let e = r
            .submit_owned(FileId(0), 9000, 3000, AlignedBuf::new(2 * 4096).unwrap())
            .expect_err("the second submission is refused");
        assert!(
            matches!(&e, IoError::Read { offset: 9000, file, .. } if file == f.path()),
            "{e:?}"
        );
        assert_eq!(
            r.outstanding(),
            1,
            "{backend:?}: nothing queued, the first in flight"
        );
        let third = r
            .submit_owned(FileId(0), 20_000, 100, AlignedBuf::new(4096).unwrap())
            .unwrap();
        for (t, off, len) in [(first, 100u64, 6000u64), (third, 20_000, 100)] {
            let c = r.wait(t).unwrap();
            let want: Vec<u8> = (off..off + len).map(byte).collect();
            assert_eq!(c.bytes().unwrap(), &want[..], "{backend:?}");
        }
        assert_eq!(r.injected().load(Ordering::Relaxed), 1);
        assert_eq!(r.outstanding(), 0);
    }
}

#[test]
fn plans_parse() {
    let p = FaultPlan::parse("eio@40, short=7@off=4096,slow=1500@all,short@3,refuse@9").unwrap();
    assert_eq!(
        p.rules,
        vec![
            (Trigger::Nth(40), Fault::Eio),
            (Trigger::Offset(4096), Fault::Short { missing: 7 }),
            (Trigger::All, Fault::Slow(Duration::from_millis(1500))),
            (Trigger::Nth(3), Fault::Short { missing: 0 }),
            (Trigger::Nth(9), Fault::Refuse),
        ]
    );
    for bad in ["", "eio", "boom@1", "eio@x", "slow@1"] {
        assert!(FaultPlan::parse(bad).is_err(), "{bad}");
    }
}
