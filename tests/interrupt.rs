//! Ctrl-C and SIGTERM during load, prefill and generation: `hypura run`
//! exits within a second with 130 / 143, after flushing what it generated
//! and its statistics, with the streaming engine drained and joined.

mod common;

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn spawn(model: &std::path::Path, prompt: &str, extra: &[&str]) -> Child {
    common::hypura()
        .args([
            "run",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
            "--temp",
            "0",
            "-n",
            "100000",
            "--ctx",
            "4096",
            "--threads",
            "2",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends `sig`, waits for the exit, returns (exit code, seconds it took, stdout, stderr).
fn signal_and_wait(mut child: Child, sig: i32) -> (Option<i32>, f64, String, String) {
    let t = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("no exit 10 s after signal {sig}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let secs = t.elapsed().as_secs_f64();
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), secs, out, err)
}

#[test]
fn sigint_during_generation_flushes_and_exits_130() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    // Streaming (60 MiB budget): io_uring reads are in flight when the signal comes.
    let mut child = spawn(
        &m,
        "Once upon a time, in a land far away, there lived",
        &["--ram-budget", "60M"],
    );
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap(); // generation is under way
    child.stdout = Some(stdout);
    let (code, secs, out, err) = signal_and_wait(child, libc::SIGINT);
    assert_eq!(code, Some(130), "{err}");
    assert!(secs < 1.0, "took {secs:.2} s to exit");
    assert!(!out.trim().is_empty() || first.iter().any(|&b| b != 0));
    assert!(
        err.contains("generation:") && err.contains("streaming:"),
        "statistics after the stop: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sigterm_during_prefill_exits_143() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(300);
    let child = spawn(&m, &long, &["--ram-budget", "60M", "--batch", "64"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (code, secs, _, err) = signal_and_wait(child, libc::SIGTERM);
    assert_eq!(code, Some(143), "{err}");
    assert!(secs < 1.0, "took {secs:.2} s to exit");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sigint_during_load_exits_130() {
    let Some(m) = common::model(common::GEMMA3) else {
        return;
    };
    let child = spawn(&m, "hi", &[]);
    std::thread::sleep(Duration::from_millis(100));
    let (code, secs, _, err) = signal_and_wait(child, libc::SIGINT);
    assert_eq!(code, Some(130), "{err}");
    assert!(secs < 1.0, "took {secs:.2} s to exit");
    assert!(!err.contains("panicked"), "{err}");
}
