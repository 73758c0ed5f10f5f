//! A spawned `hypura serve` on 127.0.0.1 with an ephemeral port, and a small
//! HTTP client for the serve tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    agent: ureq::Agent,
}

impl Server {
    /// Starts `hypura serve MODEL --port 0 EXTRA...` (`--threads 2` unless
    /// EXTRA names threads) and waits for its `listening on` line.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let threads: &[&str] = match extra.contains(&"--threads") {
            true => &[],
            false => &["--threads", "2"],
        };
        let mut child = crate::common::hypura()
            .arg("serve")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(threads)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hypura serve");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let base = loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "hypura serve exited before listening: {:?}",
                child.wait()
            );
            if let Some(rest) = line.trim().strip_prefix("listening on ") {
                break rest.to_string();
            }
        };
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        let agent = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(300))
            .build();
        Server { child, base, agent }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        answer(self.agent.get(&self.url(path)).call())
    }

    /// POST a body: (status, body).
    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        answer(
            self.agent
                .post(&self.url(path))
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    }

    /// POST JSON expecting 200 and a JSON answer.
    pub fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, text) = self.post(path, &body.to_string());
        assert_eq!(status, 200, "{path} {body}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    }

    pub fn get_json(&self, path: &str) -> Value {
        let (status, text) = self.get(path);
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// POST and read a streamed answer: its lines, without blank ones.
    pub fn post_lines(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self
            .agent
            .post(&self.url(path))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap_or_else(|e| panic!("{path} {body}: {e}"));
        BufReader::new(r.into_reader())
            .lines()
            .map(Result::unwrap)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The server's resident set size (VmRSS), bytes.
    pub fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    /// SIGTERM, then wait; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..300 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

/// SSE `data:` payloads of a streamed OpenAI answer, `[DONE]` last.
pub fn sse_data(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            l.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data line: {l}"))
                .to_string()
        })
        .collect()
}
