//! Runs one configuration as a child process (`hypura run ... --json`) and
//! reads its report: a fresh process per run gives honest load times and peak
//! RSS and a cold pool. Ctrl-C sets a flag the runner polls; the running child
//! (in its own process group, so the terminal's SIGINT does not reach it) is
//! killed and its run dropped.

use std::io::Read;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::report::RunReport;

/// Makes SIGINT (Ctrl-C) and SIGTERM stop the bench instead of killing it
/// (the engine's stop request; a second signal exits at once).
pub fn install_interrupt_handler() -> Result<()> {
    crate::engine::interrupt::install_handlers()
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    crate::engine::interrupt::requested()
}

/// One finished run (successful or not).
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    /// Index into the configurations.
    pub config: usize,
    pub config_id: String,
    /// Round number; warm-up rounds come first.
    pub round: usize,
    /// Warm-up runs are kept here but left out of the summaries.
    pub warmup: bool,
    /// Position in the whole sequence of runs (0-based).
    pub seq: usize,
    pub ok: bool,
    pub wall_secs: f64,
    /// Why the run failed.
    pub error: Option<String>,
    /// `hypura run --json`'s report (the JSON object it printed).
    pub report: Option<RunReport>,
    /// MoE streaming: the hit rate of a simulated LRU expert cache of the
    /// same budget on the run's routing (generated tokens).
    pub lru_sim_hit_rate: Option<f64>,
}

/// How a run ended.
pub enum Outcome {
    Finished {
        ok: bool,
        wall_secs: f64,
        error: Option<String>,
        /// Boxed: a report is large next to `Interrupted`.
        report: Option<Box<RunReport>>,
    },
    /// Ctrl-C: the child was killed and the run is dropped.
    Interrupted,
}

/// Runs `exe args...` to the end (or `timeout`), ticking `bar` while it runs.
pub fn run_child(
    exe: &Path,
    args: &[String],
    timeout: Option<Duration>,
    bar: &ProgressBar,
) -> Result<Outcome> {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for a run")? {
            break st;
        }
        if interrupted() || timeout.is_some_and(|t| start.elapsed() > t) {
            timed_out = !interrupted();
            let _ = child.kill();
            let st = child.wait().context("waiting for a killed run")?;
            if !timed_out {
                let _ = reader.join();
                return Ok(Outcome::Interrupted);
            }
            break st;
        }
        bar.tick();
        if let Some(len) = bar.length() {
            bar.set_position((start.elapsed().as_millis() as u64).min(len.saturating_sub(1)));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall_secs = start.elapsed().as_secs_f64();
    let text = reader.join().unwrap_or_default();
    let (report, unreadable) = match last_json(&text) {
        Some(Ok(r)) => (Some(r), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let ok = status.success() && report.is_some();
    let error = if ok {
        None
    } else if timed_out {
        Some(format!(
            "timed out after {:.0} s",
            timeout.unwrap_or_default().as_secs_f64()
        ))
    } else if let (true, Some(e)) = (status.success(), unreadable) {
        Some(format!(
            "its JSON report is not this build's RunReport: {e}"
        ))
    } else {
        Some(failure_reason(status, &text))
    };
    Ok(Outcome::Finished {
        ok,
        wall_secs,
        error,
        report: if ok { report.map(Box::new) } else { None },
    })
}

/// The run's report: the last stderr line that is a JSON object, read as a
/// [`RunReport`] (`Err` when that object is not one, e.g. from another build).
pub fn last_json(stderr: &str) -> Option<serde_json::Result<RunReport>> {
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(serde_json::Value::is_object)
        })
        .map(serde_json::from_value)
}

fn failure_reason(status: std::process::ExitStatus, stderr: &str) -> String {
    let last_error = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with("error:"));
    let last_line = stderr.lines().rev().map(str::trim).find(|l| !l.is_empty());
    match (status.signal(), last_error) {
        (Some(sig), _) => {
            let hint = if sig == libc::SIGKILL {
                " (out of memory?)"
            } else {
                ""
            };
            format!("killed by signal {sig}{hint}")
        }
        (None, Some(e)) => e.trim_start_matches("error:").trim().to_string(),
        (None, None) if status.success() => "no JSON report on stderr".to_string(),
        (None, None) => format!(
            "exit status {}: {}",
            status.code().unwrap_or(-1),
            last_line.unwrap_or("no output")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON line `hypura run --json` prints for a report with `gen_tps`.
    fn report_json(gen_tps: f64) -> String {
        let mut r = RunReport::zeroed(crate::scheduler::Mode::Dense);
        r.gen_tps = gen_tps;
        serde_json::to_string(&r).unwrap()
    }

    #[test]
    fn last_json_line_wins() {
        let s = format!(
            "loading\n{}\nnoise\n{}\n",
            report_json(1.0),
            report_json(2.0)
        );
        assert_eq!(last_json(&s).unwrap().unwrap().gen_tps, 2.0);
        assert!(last_json("error: x\n{broken\n").is_none());
        // A JSON object that is not a report (another build's) is an error.
        assert!(last_json("{\"a\":2}\n").unwrap().is_err());
    }

    #[test]
    fn child_runs_and_failures_are_reported() {
        let bar = ProgressBar::hidden();
        let sh = Path::new("/bin/sh");
        let ok = run_child(
            sh,
            &["-c".into(), format!("echo '{}' >&2", report_json(3.0))],
            None,
            &bar,
        )
        .unwrap();
        match ok {
            Outcome::Finished { ok, report, .. } => {
                assert!(ok);
                assert_eq!(report.unwrap().gen_tps, 3.0);
            }
            Outcome::Interrupted => panic!("not interrupted"),
        }
        let foreign = run_child(
            sh,
            &["-c".into(), "echo '{\"gen_tps\":3}' >&2".into()],
            None,
            &bar,
        )
        .unwrap();
        match foreign {
            Outcome::Finished { ok, error, .. } => {
                assert!(!ok);
                assert!(error.unwrap().contains("not this build's RunReport"));
            }
            Outcome::Interrupted => panic!("not interrupted"),
        }
        let bad = run_child(
            sh,
            &[
                "-c".into(),
                "echo 'error: no such model' >&2; exit 1".into(),
            ],
            None,
            &bar,
        )
        .unwrap();
        match bad {
            Outcome::Finished { ok, error, .. } => {
                assert!(!ok);
                assert_eq!(error.as_deref(), Some("no such model"));
            }
            Outcome::Interrupted => panic!("not interrupted"),
        }
        let slow = run_child(
            sh,
            &["-c".into(), "sleep 5".into()],
            Some(Duration::from_millis(200)),
            &bar,
        )
        .unwrap();
        match slow {
            Outcome::Finished {
                ok,
                error,
                wall_secs,
                ..
            } => {
                assert!(!ok && wall_secs < 4.0);
                assert!(error.unwrap().starts_with("timed out"));
            }
            Outcome::Interrupted => panic!("not interrupted"),
        }
    }
}
