//! The model file changing under a streaming run:
//! - truncated: the next read fails; the run stops with an error naming the
//!   file and the offset, exits 1, and what it printed is a prefix of the
//!   uninterrupted run's text (no garbage tokens after the fault);
//! - replaced (another file renamed over its path): the run keeps reading
//!   the file it opened (the open descriptor) and prints the same text as an
//!   uninterrupted run.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKENS: &str = "160";

fn args(model: &Path) -> Vec<String> {
    [
        "run",
        model.to_str().unwrap(),
        "--prompt",
        "The history of the city begins",
        "--max-tokens",
        TOKENS,
        "--temp",
        "0",
        "--threads",
        "1",
        "--ram-budget",
        "60M",
        "--mode",
        "dense",
    ]
    .map(String::from)
    .to_vec()
}

/// Spawns a run and returns it with its stdout as it is collected.
fn spawn(model: &Path) -> (Child, Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let mut child = common::hypura()
        .args(args(model))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = Arc::clone(&buf);
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 256];
        while let Ok(n) = out.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (child, buf, reader)
}

/// Waits until the run has printed some generated text (past the prompt).
fn wait_for_output(buf: &Mutex<Vec<u8>>, child: &mut Child) {
    let t = Instant::now();
    while buf.lock().unwrap().len() < 24 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t.elapsed() < Duration::from_secs(60), "no output");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish(mut child: Child, reader: std::thread::JoinHandle<()>) -> (Option<i32>, String) {
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "the run hangs");
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

fn reference(model: &Path) -> Vec<u8> {
    let o = common::hypura().args(args(model)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

#[test]
fn a_file_truncated_mid_run_stops_it_cleanly() {
    let Some(src) = common::model(common::SMOLLM2) else {
        return;
    };
    let (_dir, model) = common::copy_model(&src);
    let want = reference(&model);

    let (mut child, buf, reader) = spawn(&model);
    wait_for_output(&buf, &mut child);
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (code, err) = finish(child, reader);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(model.to_str().unwrap()) && err.contains("offset"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let got = buf.lock().unwrap().clone();
    assert!(
        want.starts_with(&got),
        "printed text is not a prefix of the uninterrupted run's:\n{}\n---\n{}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}

#[test]
fn a_file_renamed_over_mid_run_is_not_seen() {
    let Some(src) = common::model(common::SMOLLM2) else {
        return;
    };
    let (dir, model) = common::copy_model(&src);
    let want = reference(&model);

    let (mut child, buf, reader) = spawn(&model);
    wait_for_output(&buf, &mut child);
    // Same size, other bytes: a replacement the run must not read from.
    let other = dir.path().join("other.gguf");
    let len = std::fs::metadata(&model).unwrap().len() as usize;
    std::fs::write(&other, vec![0x5au8; len]).unwrap();
    std::fs::rename(&other, &model).unwrap();
    let (code, err) = finish(child, reader);
    assert_eq!(code, Some(0), "{err}");
    let got = buf.lock().unwrap().clone();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}
