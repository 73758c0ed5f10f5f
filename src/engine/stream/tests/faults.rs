//! Faults during a run, through the callbacks: EIO on the n-th read and short
//! reads abort the compute with an error naming the file and the offset, and
//! nothing computes on the bytes a failed read did not deliver; a slow read is
//! waited for; a refused submission in the middle of a layer's reads aborts
//! with the layer's earlier reads collected, and the next pass reads it
//! afresh. Over the fake reader and the real pread and io_uring backends
//! (a temp file), dense and experts, CPU and the staged GPU tier on ggml's
//! CPU device. Every case runs on its own thread under a time limit.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;
use crate::io::fault::{Fault, FaultPlan, FaultReader, Trigger};
use crate::io::{open_reader, Backend, IoOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Io {
    Fake,
    /// The fake reader completing every read at submission: layers ahead
    /// are read, and copied, before the ones computing.
    FakeAtSubmit,
    Pread,
    Uring,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dense,
    Experts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Cpu,
    StagedGpu,
}

const IOS: [Io; 3] = [Io::Fake, Io::Pread, Io::Uring];
const KINDS: [Kind; 2] = [Kind::Dense, Kind::Experts];
const TIERS: [Tier; 2] = [Tier::Cpu, Tier::StagedGpu];
const PASSES: usize = 3;

/// How a case ended.
#[derive(Debug)]
struct Outcome {
    /// The streaming error, if any.
    error: Option<String>,
    /// The path the reader's errors name.
    path: String,
    /// File ranges of the streamed tensors.
    tensors: Vec<(u64, u64)>,
    /// Faults the wrapper reported.
    injected: usize,
    /// Passes that ran to the end (before the error).
    passes_ok: usize,
    /// The pass after the error had been taken: ran to the end, or its error.
    recovered: Option<Result<(), String>>,
    elapsed: Duration,
}

fn model(kind: Kind) -> FakeModel {
    match kind {
        Kind::Dense => dense_model(),
        Kind::Experts => {
            let expert: &[usize] = &[5000, 3000, 4096 + 64];
            FakeModel::new(&[expert, expert, expert], 8)
        }
    }
}

fn case_plan(m: &FakeModel, kind: Kind, tier: Tier) -> Plan {
    // An expert cache slot holds one expert's pieces, each with a spare page.
    let slot: u64 = m
        .specs
        .iter()
        .filter(|t| t.layer == 0)
        .map(|t| (crate::io::slot_len_for(0, t.size / t.n_experts) + ALIGN) as u64)
        .sum();
    match (kind, tier) {
        (Kind::Dense, Tier::Cpu) => plan(m, Mode::Dense, 1, 0),
        (Kind::Experts, Tier::Cpu) => plan(m, Mode::Experts, 1, 6 * slot),
        (Kind::Dense, Tier::StagedGpu) => {
            let mut p = plan(m, Mode::GpuDense, 2, 0);
            p.gpu = gpu_plan(2, Vec::new());
            p
        }
        (Kind::Experts, Tier::StagedGpu) => {
            let mut p = plan(m, Mode::GpuExperts, 1, 10 * slot);
            p.gpu = gpu_plan(2, vec![0]);
            p
        }
    }
}

/// Router picks of pass `pass` (two tokens, k = 2), varied so every pass misses.
fn ids_for(pass: usize, layer: usize) -> Vec<i32> {
    let p = (pass * 3 + layer) as i32;
    vec![p % 8, (p + 1) % 8, (p * 5 + 2) % 8, 7 - p % 8]
}

/// Runs `PASSES` decode passes over a model streamed through `faults` (and,
/// for the real backends, the file cut at `truncate_at`); every range that
/// computes un-aborted must see the file's bytes.
fn run_case(
    io: Io,
    kind: Kind,
    tier: Tier,
    faults: FaultPlan,
    truncate_at: Option<u64>,
) -> Outcome {
    let t0 = Instant::now();
    let mut m = model(kind);
    let moe_tokens = if kind == Kind::Experts { 2 } else { 0 };
    let (nodes, topk) = graph(&mut m, moe_tokens);
    let p = case_plan(&m, kind, tier);
    let tmp = (io != Io::Fake && io != Io::FakeAtSubmit).then(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &m.file).unwrap();
        f
    });
    let (inner, path): (Box<dyn ReadBackend>, std::path::PathBuf) = match (io, &tmp) {
        (Io::Fake, _) => (
            Box::new(m.reader(Complete::WhenCollected { polls: 1 })),
            "fake.gguf".into(),
        ),
        (Io::FakeAtSubmit, _) => (Box::new(m.reader(Complete::AtSubmit)), "fake.gguf".into()),
        (_, Some(f)) => {
            let opts = IoOptions {
                backend: if io == Io::Pread {
                    Backend::Pread
                } else {
                    Backend::Uring
                },
                queue_depth: 2,
                chunk_size: 8192,
                ..IoOptions::default()
            };
            let r = open_reader(f.path(), &opts).unwrap();
            if let Some(len) = truncate_at {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(f.path())
                    .unwrap()
                    .set_len(len)
                    .unwrap();
            }
            (r, f.path().to_path_buf())
        }
        _ => unreachable!(),
    };
    let fr = FaultReader::new(inner, &path, faults);
    let injected = fr.injected();
    let gpu = (tier == Tier::StagedGpu).then(|| (cpu_device(), Upload::Staged));
    // SAFETY: the fake tensors live in `m`, which outlives the Streamer.
    let mut st = *unsafe { Streamer::from_reported(&p, &m.reported(), Box::new(fr), gpu) }.unwrap();
    let mut pass = 0;
    let run_pass = |st: &Streamer, m: &mut FakeModel, pass: usize| -> bool {
        let ids: Vec<Vec<i32>> = (0..topk.len()).map(|l| ids_for(pass, l)).collect();
        for (l, &k) in topk.iter().enumerate() {
            m.tensors.set_ids(k, &ids[l]);
        }
        let (cb, user) = eval(st);
        let ran = compute(cb, user, &nodes, |range| {
            // SAFETY: the Streamer's own user data, alive.
            if unsafe { abort_callback(user) } {
                return; // ggml computes nothing more
            }
            match kind {
                Kind::Dense => check_dense(m, range),
                Kind::Experts => check_experts(m, range, &ids),
            };
        });
        // Failed or not, every read in flight is one the engine will
        // collect: none is left behind writing into memory given away.
        let e = st.engine();
        let held = e.dense.tickets_held() + e.experts.tickets_held();
        assert_eq!(
            e.reader.outstanding(),
            held,
            "{io:?} {kind:?} {tier:?} pass {pass}: reads in flight that nothing collects"
        );
        ran && !st.failed()
    };
    let mut passes_ok = 0;
    while pass < PASSES {
        let ok = run_pass(&st, &mut m, pass);
        pass += 1;
        if !ok {
            break;
        }
        passes_ok += 1;
    }
    let error = st.take_error();
    // The Streamer lives on (a server's next request): the next pass reads
    // afresh, byte-exact, or fails cleanly again.
    let recovered = error.as_ref().map(|_| {
        if run_pass(&st, &mut m, pass) {
            Ok(())
        } else {
            Err(st.take_error().unwrap_or_default())
        }
    });
    drop(st);
    for t in &m.specs {
        assert_eq!(data_and_buffer(t), (t.reserved, std::ptr::null_mut()));
    }
    Outcome {
        error,
        path: path.display().to_string(),
        tensors: m
            .specs
            .iter()
            .map(|t| (t.file_offset, t.file_offset + t.size as u64))
            .collect(),
        injected: injected.load(Ordering::Relaxed),
        passes_ok,
        recovered,
        elapsed: t0.elapsed(),
    }
}

/// `run_case` on its own thread: a hang fails the test instead of blocking it.
fn bounded(io: Io, kind: Kind, tier: Tier, faults: FaultPlan, truncate_at: Option<u64>) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(run_case(io, kind, tier, faults, truncate_at));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(o) => {
            h.join().unwrap();
            o
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{io:?} {kind:?} {tier:?}: hung"),
        // The case panicked: show its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(h.join().unwrap_err())
        }
    }
}

/// The offset an error names, which must lie inside a streamed tensor.
fn named_offset(o: &Outcome, e: &str) -> u64 {
    let at = e
        .find("offset ")
        .unwrap_or_else(|| panic!("no offset: {e}"))
        + 7;
    let off: u64 = e[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no offset: {e}"));
    assert!(
        o.tensors.iter().any(|&(a, b)| (a..b).contains(&off)),
        "offset {off} is in no tensor: {e}"
    );
    off
}

fn assert_failed(o: &Outcome, what: &str, label: &str) -> String {
    let e = o
        .error
        .clone()
        .unwrap_or_else(|| panic!("{label}: no error: {o:?}"));
    assert!(e.contains("read failed"), "{label}: {e}");
    assert!(e.contains(what), "{label}: {e}");
    assert!(e.contains(&o.path), "{label}: the file is named: {e}");
    assert!(o.injected >= 1 || what == "short read", "{label}: {o:?}");
    e
}

#[test]
fn eio_on_the_nth_read_aborts_and_names_the_file_and_offset() {
    for io in IOS {
        for kind in KINDS {
            for tier in TIERS {
                let label = format!("{io:?} {kind:?} {tier:?}");
                // The 5th read: inside the first pass.
                let plan = FaultPlan::new().with(Trigger::Nth(5), Fault::Eio);
                let o = bounded(io, kind, tier, plan, None);
                let e = assert_failed(&o, "EIO", &label);
                named_offset(&o, &e);
                assert_eq!(o.passes_ok, 0, "{label}: {o:?}");
                assert_eq!(o.injected, 1, "{label}");
                // The fault hit once: the next pass reads the layer again.
                assert_eq!(o.recovered, Some(Ok(())), "{label}");
            }
        }
    }
}

#[test]
fn a_short_read_aborts_and_names_the_file_and_offset() {
    for io in IOS {
        for kind in KINDS {
            for tier in TIERS {
                let label = format!("{io:?} {kind:?} {tier:?}");
                let m = model(kind);
                // Inside the second streamed layer's first tensor.
                let l = m.specs[0].layer;
                let t = m.specs.iter().find(|t| t.layer > l).unwrap();
                let at = t.file_offset + 100;
                let plan = FaultPlan::new().with(Trigger::Offset(at), Fault::Short { missing: 1 });
                let o = bounded(io, kind, tier, plan, None);
                let e = assert_failed(&o, "short read", &label);
                assert!(named_offset(&o, &e) <= at, "{label}: {e}");
                assert!(o.injected >= 1, "{label}");
                // The fault stays: the next pass fails the same way where it
                // reads that tensor again (dense; experts only if picked).
                match o.recovered.clone().unwrap() {
                    Ok(()) => assert_eq!(kind, Kind::Experts, "{label}"),
                    Err(again) => assert!(
                        again.contains("short read") && again.contains(&o.path),
                        "{label}: {again}"
                    ),
                }
            }
        }
    }
}

#[test]
fn a_file_truncated_while_open_is_a_short_read_on_the_real_backends() {
    for io in [Io::Pread, Io::Uring] {
        for kind in KINDS {
            for tier in TIERS {
                let label = format!("{io:?} {kind:?} {tier:?}");
                let m = model(kind);
                let t = m.specs.iter().find(|t| t.layer > m.specs[0].layer).unwrap();
                let cut = t.file_offset + t.size as u64 / 2;
                let o = bounded(io, kind, tier, FaultPlan::new(), Some(cut));
                let e = assert_failed(&o, "short read", &label);
                named_offset(&o, &e);
                assert_eq!(o.injected, 0);
            }
        }
    }
}

#[test]
fn a_slow_read_is_waited_for_and_the_bytes_stay_exact() {
    let d = Duration::from_millis(1200);
    for (io, kind, tier) in [
        (Io::Pread, Kind::Dense, Tier::Cpu),
        (Io::Uring, Kind::Experts, Tier::StagedGpu),
    ] {
        let plan = FaultPlan::new().with(Trigger::Nth(4), Fault::Slow(d));
        let o = bounded(io, kind, tier, plan, None);
        assert!(o.error.is_none(), "{o:?}");
        assert_eq!((o.passes_ok, o.injected), (PASSES, 1), "{o:?}");
        assert!(o.elapsed >= d, "{o:?}");
    }
}

#[test]
fn a_refused_submission_mid_layer_collects_the_layer_and_the_next_pass_reads_it_afresh() {
    // Submission 2 is the second read of the first layer the pass needs
    // (the wait path); submission 5 the second of the next batch (dense: the
    // layer read ahead at `l_out`; experts: the second run of misses of
    // layer 0, or its second expert with the pinned cache). The reads before
    // it are still in flight when it is refused (the fake completes only
    // when collected).
    for k in [2, 5] {
        for io in IOS {
            for kind in KINDS {
                for tier in TIERS {
                    let label = format!("submission {k}, {io:?} {kind:?} {tier:?}");
                    let plan = FaultPlan::new().with(Trigger::Nth(k), Fault::Refuse);
                    let o = bounded(io, kind, tier, plan, None);
                    let e = o
                        .error
                        .clone()
                        .unwrap_or_else(|| panic!("{label}: no error: {o:?}"));
                    assert!(e.contains("cannot submit"), "{label}: {e}");
                    assert!(e.contains(&o.path), "{label}: the file is named: {e}");
                    named_offset(&o, &e);
                    assert_eq!((o.passes_ok, o.injected), (0, 1), "{label}: {o:?}");
                    // Read afresh, byte-exact (checked at every range).
                    assert_eq!(o.recovered, Some(Ok(())), "{label}");
                }
            }
        }
    }
}

#[test]
fn an_eio_on_any_read_leaves_the_next_pass_byte_exact() {
    // Wherever the failing read falls (layers read or copied ahead of it
    // hold slots at that moment), the pass after the error reads afresh and
    // computes on the file's bytes. Up to the third pass's reads.
    for io in [Io::Fake, Io::FakeAtSubmit, Io::Pread, Io::Uring] {
        for tier in TIERS {
            for kind in KINDS {
                let mut failed = 0;
                for n in 1..=40 {
                    let label = format!("{io:?} {kind:?} {tier:?} EIO on read {n}");
                    let plan = FaultPlan::new().with(Trigger::Nth(n), Fault::Eio);
                    let o = bounded(io, kind, tier, plan, None);
                    if o.error.is_none() {
                        continue; // fewer reads than n in all passes
                    }
                    failed += 1;
                    assert_failed(&o, "EIO", &label);
                    assert_eq!(o.recovered, Some(Ok(())), "{label}");
                }
                assert!(
                    failed >= 6,
                    "{io:?} {kind:?} {tier:?}: only {failed} cases failed"
                );
            }
        }
    }
}
