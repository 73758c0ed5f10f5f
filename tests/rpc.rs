//! Layers on other machines through ggml's RPC backend, over loopback: two
//! `hypura rpc-server` processes (CPU device) hold whole layers, this
//! process keeps the first ones (resident or streamed). The remote CPU
//! backends run the same kernels as the local one on the same machine, and
//! weights are not repacked on either side (`--no-repack`), so the logits
//! must be byte-identical to a local run, not only the greedy tokens.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{gen, hypura, model, report, run, QWEN15, SMOLLM2};

/// A running `hypura rpc-server`, killed on drop.
struct Server {
    child: Child,
    endpoint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn server() -> Server {
    let port = free_port();
    let child = hypura()
        .args(["rpc-server", "--port", &port.to_string(), "--threads", "1"])
        .args(["--device", "CPU"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    while TcpStream::connect(&endpoint).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "rpc-server on {endpoint} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, endpoint }
}

fn two_servers() -> (Server, Server, String) {
    let (a, b) = (server(), server());
    let list = format!("{},{}", a.endpoint, b.endpoint);
    (a, b, list)
}

fn same_logits(want: &Path, got: &Path, what: &str) {
    let (a, b) = (std::fs::read(want).unwrap(), std::fs::read(got).unwrap());
    assert!(a.len() > 24, "{what}: no logits");
    assert!(a == b, "{what}: logits differ from the local run");
}

/// `run` with `--rpc ep`: exit code 1 and one stderr line naming `ep`.
fn run_fails_in_one_line(m: &Path, ep: &str) -> String {
    let o = hypura()
        .args(["run", m.to_str().unwrap(), "--prompt", "hi"])
        .args(["--max-tokens", "2", "--rpc", ep])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains(ep), "{err}");
    lines[0].to_string()
}

#[test]
fn a_server_that_is_down_is_one_line_naming_it() {
    let Some(m) = model(SMOLLM2) else { return };
    let ep = format!("127.0.0.1:{}", free_port());
    let line = run_fails_in_one_line(&m, &ep);
    assert!(line.starts_with("error: "), "{line}");
    // Bad lists are refused before any connection.
    for bad in ["nohost", "h:0", "127.0.0.1:1,127.0.0.1:1"] {
        let o = hypura()
            .args(["inspect", m.to_str().unwrap(), "--rpc", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{bad}: {err}");
        assert!(err.starts_with("error: --rpc"), "{bad}: {err}");
    }
}

/// A fake server on an ephemeral port: reads the client's handshake and
/// answers it with `answer` (nothing: closes at once), once per connection.
fn fake_server(answer: Vec<u8>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            if answer.is_empty() {
                continue;
            }
            let mut hello = [0u8; 9 + 24];
            if c.read_exact(&mut hello).is_ok() {
                let _ = std::io::Write::write_all(&mut c, &answer);
            }
        }
    });
    ep
}

/// A ggml RPC handshake answer of protocol `major.minor.patch`.
fn hello(major: u8, minor: u8, patch: u8) -> Vec<u8> {
    let mut v = 28u64.to_le_bytes().to_vec();
    v.extend_from_slice(&[major, minor, patch, 0]);
    v.extend_from_slice(&[0; 24]);
    v
}

#[test]
fn a_server_of_another_protocol_version_is_one_line_naming_both() {
    let Some(m) = model(SMOLLM2) else { return };
    let cases = [
        (hello(6, 3, 1), vec!["6.3.1", "7.0.0", "protocol"]),
        (hello(7, 9, 0), vec!["7.9.0", "7.0.0"]),
        (Vec::new(), vec!["closed the connection", "7.0.0"]),
        (b"HTTP/1.1 400".to_vec(), vec!["protocol version", "7.0.0"]),
    ];
    for (answer, want) in cases {
        let ep = fake_server(answer);
        let t = Instant::now();
        let line = run_fails_in_one_line(&m, &ep);
        assert!(line.starts_with("error: RPC server "), "{line}");
        for w in want {
            assert!(line.contains(w), "{w:?} missing: {line}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(9),
            "took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn smollm2_split_over_two_servers_matches_the_local_run() {
    let Some(m) = model(SMOLLM2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let want = dir.path().join("local.logits");
    run(&m, &want, &["--mode", "resident"]);
    let (_a, _b, list) = two_servers();

    // A three-way split, resident here.
    let got = dir.path().join("split.logits");
    let r = report(&run(&m, &got, &["--rpc", &list, "--tensor-split", "1,1,1"]));
    let n_layer = 30;
    assert_eq!(r["remote_layers"], 21, "{r}");
    assert!(r["rpc_split"].as_str().unwrap().contains("RPC1"), "{r}");
    assert_eq!(r["mode"], "resident", "{r}");
    same_logits(&want, &got, "1,1,1");

    // The local share streams from disk (a budget smaller than its layers).
    let got = dir.path().join("stream.logits");
    let r = report(&run(
        &m,
        &got,
        &[
            "--rpc",
            &list,
            "--tensor-split",
            "2,1,1",
            "--ram-budget",
            "40M",
        ],
    ));
    assert_eq!(r["mode"], "dense", "{r}");
    assert!(r["read_bytes_per_token"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["remote_layers"].as_u64().unwrap() < n_layer, "{r}");
    same_logits(&want, &got, "2,1,1 streaming");

    // Without --tensor-split the servers' free memory (this machine's RAM)
    // dwarfs a small local budget: nearly every layer goes remote.
    let got = dir.path().join("auto.logits");
    let r = report(&run(&m, &got, &["--rpc", &list, "--ram-budget", "60M"]));
    assert!(r["remote_layers"].as_u64().unwrap() >= 25, "{r}");
    same_logits(&want, &got, "by free memory");

    // inspect shows the devices and the split.
    let o = hypura()
        .args(["inspect", m.to_str().unwrap(), "--rpc", &list])
        .args(["--tensor-split", "1,1,1"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("RPC devices") && out.contains("RPC0") && out.contains("+ output"),
        "{out}"
    );
}

#[test]
fn a_synthetic_dense_model_split_and_streamed_matches_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("dense.gguf");
    gen(
        &m,
        &[
            "--arch",
            "llama",
            "--layers",
            "9",
            "--embd",
            "512",
            "--ff",
            "1408",
            "--heads",
            "8",
            "--heads-kv",
            "2",
            "--type",
            "q4_0",
            "--seed",
            "41",
        ],
    );
    let want = dir.path().join("local.logits");
    run(&m, &want, &["--mode", "resident"]);
    let (_a, _b, list) = two_servers();
    let got = dir.path().join("split.logits");
    let r = report(&run(
        &m,
        &got,
        &[
            "--rpc",
            &list,
            "--tensor-split",
            "4,3,3",
            "--ram-budget",
            "6M",
            "--lookahead",
            "1",
        ],
    ));
    assert_eq!(r["mode"], "dense", "{r}");
    assert!(r["streamed_layers"].as_u64().unwrap() > 0, "{r}");
    same_logits(&want, &got, "synthetic 4,3,3");
}

#[test]
fn killing_a_server_mid_run_ends_the_run_with_a_clear_error() {
    // Random weights: end-of-generation is one token of the vocabulary, so
    // the run goes on until the server is gone.
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("dense.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "6", "--embd", "256", "--seed", "43",
        ],
    );
    let (a, mut b, list) = two_servers();
    let mut child = hypura()
        .args([
            "run",
            m.to_str().unwrap(),
            "--prompt",
            "Tell me a long story.",
        ])
        .args(["--max-tokens", "100000", "--ctx", "4096", "--temp", "1"])
        .args(["--rpc", &list, "--tensor-split", "1,1,1", "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for generated text, then kill one server.
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    let n = stdout.read(&mut buf).unwrap();
    assert!(n > 0, "no output before the kill");
    let _ = b.child.kill();
    let _ = b.child.wait();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the run did not end within 20 s of losing a server");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(last.starts_with("error: ") && last.contains("RPC"), "{err}");
    drop(a);
}

fn in_cgroup(limit: &str, args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/in-cgroup.sh");
    Command::new("bash")
        .arg(script)
        .arg(limit)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_hypura"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn servers_outside_a_small_cgroup_cut_the_bytes_read_per_token() {
    let Some(m) = model(QWEN15) else { return };
    if !common::cgroups_usable("memory") {
        return;
    }
    let (_a, _b, list) = two_servers();
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &Path, rpc: Option<&str>| -> Vec<String> {
        let mut v: Vec<String> = [
            "run",
            m.to_str().unwrap(),
            "--prompt",
            "def fibonacci(n):",
            "--max-tokens",
            "8",
            "--temp",
            "0",
            "--no-repack",
            "--json",
            "--logits-out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(r) = rpc {
            v.extend(["--rpc".to_string(), r.to_string()]);
        }
        v
    };
    let alone = dir.path().join("alone.logits");
    let a: Vec<String> = args(&alone, None);
    let o = in_cgroup("700M", &a.iter().map(String::as_str).collect::<Vec<_>>());
    let err_a = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "alone: {err_a}");
    let ra = common::json_report(&err_a);
    let helped = dir.path().join("rpc.logits");
    let b: Vec<String> = args(&helped, Some(&list));
    let o = in_cgroup("700M", &b.iter().map(String::as_str).collect::<Vec<_>>());
    let err_b = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "with servers: {err_b}");
    let rb = common::json_report(&err_b);
    let read = |r: &serde_json::Value| r["read_bytes_per_token"].as_f64().unwrap_or(0.0);
    assert!(rb["remote_layers"].as_u64().unwrap() > 0, "{rb}");
    assert!(
        read(&rb) < read(&ra),
        "bytes read per token: {} with servers, {} alone",
        read(&rb),
        read(&ra)
    );
    same_logits(&alone, &helped, "700M cgroup");
    eprintln!(
        "700M cgroup: read/token alone {:.0}, with 2 servers {:.0}; tok/s {:.2} vs {:.2}",
        read(&ra),
        read(&rb),
        ra["gen_tps"].as_f64().unwrap(),
        rb["gen_tps"].as_f64().unwrap()
    );
}
