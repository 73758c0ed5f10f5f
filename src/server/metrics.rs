//! Server counters, and `GET /metrics` (with `--metrics`) in Prometheus'
//! text format: requests, tokens, speed, the streaming engine's storage
//! reads, stalls and expert hit rate, and the queue.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::engine::stream::StreamMetrics;

/// The routes counted by name.
pub const ROUTES: [&str; 4] = [
    "ollama_generate",
    "ollama_chat",
    "openai_chat",
    "openai_completions",
];

#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; ROUTES.len()],
    /// Requests answered with an error status (any route).
    pub errors: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected_full: AtomicU64,
    /// Generations stopped because their client went away.
    pub cancelled: AtomicU64,
    /// Generations that ended with an engine error after they started.
    pub failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Seconds, as f64 bits.
    prompt_secs: AtomicU64,
    gen_secs: AtomicU64,
    last_tps: AtomicU64,
    /// Jobs waiting in the queue (not the one running).
    pub queue_depth: AtomicUsize,
    /// 1 while a generation runs.
    pub busy: AtomicUsize,
    /// The streaming engine's counters since load (None when resident).
    pub stream: Mutex<Option<StreamMetrics>>,
}

fn add_f64(a: &AtomicU64, v: f64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
        Some((f64::from_bits(b) + v).to_bits())
    });
}

fn get_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

impl Metrics {
    pub fn request(&self, route: &str) {
        if let Some(i) = ROUTES.iter().position(|r| *r == route) {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a finished generation.
    pub fn generation(
        &self,
        prompt: usize,
        cached: usize,
        generated: usize,
        prompt_secs: f64,
        gen_secs: f64,
    ) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        add_f64(&self.prompt_secs, prompt_secs);
        add_f64(&self.gen_secs, gen_secs);
        if gen_secs > 0.0 && generated > 0 {
            self.last_tps
                .store((generated as f64 / gen_secs).to_bits(), Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, f64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let one = |v: f64| [(String::new(), v)];
        let reqs: Vec<(String, f64)> = ROUTES
            .iter()
            .zip(&self.requests)
            .map(|(r, n)| {
                (
                    format!("{{route=\"{r}\"}}"),
                    n.load(Ordering::Relaxed) as f64,
                )
            })
            .collect();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        metric(
            "hypura_requests_total",
            "counter",
            "Generation requests received, by route.",
            &reqs,
        );
        metric(
            "hypura_request_errors_total",
            "counter",
            "Requests answered with an error status.",
            &one(n(&self.errors)),
        );
        metric(
            "hypura_requests_rejected_queue_full_total",
            "counter",
            "Requests refused with 503 because the queue was full.",
            &one(n(&self.rejected_full)),
        );
        metric(
            "hypura_generations_cancelled_total",
            "counter",
            "Generations stopped because the client disconnected.",
            &one(n(&self.cancelled)),
        );
        metric(
            "hypura_generations_failed_total",
            "counter",
            "Generations ended by an engine error.",
            &one(n(&self.failed)),
        );
        metric(
            "hypura_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished generations.",
            &one(n(&self.prompt_tokens)),
        );
        metric(
            "hypura_prompt_cached_tokens_total",
            "counter",
            "Prompt tokens served from the KV cache (not evaluated).",
            &one(n(&self.cached_tokens)),
        );
        metric(
            "hypura_generated_tokens_total",
            "counter",
            "Tokens generated.",
            &one(n(&self.generated_tokens)),
        );
        metric(
            "hypura_prompt_seconds_total",
            "counter",
            "Seconds spent evaluating prompts.",
            &one(get_f64(&self.prompt_secs)),
        );
        metric(
            "hypura_generation_seconds_total",
            "counter",
            "Seconds spent generating.",
            &one(get_f64(&self.gen_secs)),
        );
        metric(
            "hypura_generation_tokens_per_second",
            "gauge",
            "Generation speed of the last finished request.",
            &one(get_f64(&self.last_tps)),
        );
        metric(
            "hypura_queue_depth",
            "gauge",
            "Requests waiting in the queue.",
            &one(self.queue_depth.load(Ordering::Relaxed) as f64),
        );
        metric(
            "hypura_busy",
            "gauge",
            "1 while a generation runs.",
            &one(self.busy.load(Ordering::Relaxed) as f64),
        );
        let st = *self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let st = st.unwrap_or_default();
        metric(
            "hypura_storage_read_bytes_total",
            "counter",
            "Bytes the streaming engine read from storage since load (0 when resident).",
            &one(st.bytes_read as f64),
        );
        metric(
            "hypura_storage_reads_total",
            "counter",
            "Reads the streaming engine issued.",
            &one(st.reads as f64),
        );
        metric(
            "hypura_stall_seconds_total",
            "counter",
            "Seconds compute waited for streamed weights.",
            &one(st.stall_ns as f64 / 1e9),
        );
        let hit = st.hit_rate().unwrap_or(f64::NAN);
        metric(
            "hypura_expert_hit_rate",
            "gauge",
            "Share of routed experts found in the pool (NaN without MoE streaming).",
            &one(hit),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("openai_chat");
        m.request("openai_chat");
        m.generation(10, 4, 5, 0.5, 1.0);
        m.generation(3, 0, 5, 0.5, 0.5);
        let t = m.render();
        assert!(
            t.contains("hypura_requests_total{route=\"openai_chat\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("hypura_generated_tokens_total 10\n"), "{t}");
        assert!(t.contains("hypura_prompt_cached_tokens_total 4\n"), "{t}");
        assert!(t.contains("hypura_generation_seconds_total 1.5\n"), "{t}");
        assert!(
            t.contains("hypura_generation_tokens_per_second 10\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE hypura_queue_depth gauge\n"), "{t}");
    }
}
