//! The statistics a generation reports: `hypura run` prints them (human or
//! `--json`), `hypura bench` reads them back from its child runs. One typed
//! struct on both sides, so a renamed field breaks the build, not the bench.

use crate::scheduler::{format_bytes, Mode};

/// The statistics printed at the end of a run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub mode: Mode,
    pub threads: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub load_secs: f64,
    /// Prompt tokens evaluated (those served from the KV cache not counted).
    pub prompt_tokens: usize,
    /// Prompt tokens served from the KV cache (a chat's earlier turns).
    #[serde(default)]
    pub prompt_reused_tokens: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub prompt_tps: f64,
    pub gen_tokens: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub gen_tps: f64,
    /// Milliseconds per generated token inside llama.cpp's decode; the rest
    /// of a token's time is Hypura's loop (sampling, output).
    #[serde(deserialize_with = "f64_or_nan")]
    pub decode_ms_per_token: f64,
    pub ram_budget_bytes: u64,
    pub resident_bytes: u64,
    pub streamed_bytes: u64,
    pub pool_bytes: u64,
    /// Token embeddings read by rows from disk instead of resident: their bytes.
    #[serde(default)]
    pub embd_rows_bytes: Option<u64>,
    pub lookahead: usize,
    pub pinned_layers: usize,
    pub streamed_layers: usize,
    /// Bytes read from disk per generated token.
    pub read_bytes_per_token: Option<f64>,
    /// Milliseconds the compute waited on I/O per generated token.
    pub stall_ms_per_token: Option<f64>,
    /// Cross-token expert cache hit rate.
    pub expert_hit_rate: Option<f64>,
    /// Pre-gating: the fraction of predicted experts the router picked, and
    /// of the experts read ahead on a prediction.
    pub expert_prediction_precision: Option<f64>,
    pub expert_readahead_used: Option<f64>,
    /// Fraction of the bytes read that landed in pages moved from evicted
    /// experts instead of fresh ones.
    pub expert_pages_recycled: Option<f64>,
    /// Average disk throughput during generation (GB/s).
    pub disk_gbps: Option<f64>,
    pub io_backend: Option<String>,
    pub predicted_tps: Option<f64>,
    pub ceiling_tps: Option<f64>,
    pub peak_rss_bytes: u64,
    /// Bytes the process read from storage while loading (`/proc/self/io`),
    /// page-cache hits excluded: about the resident bytes when streaming.
    pub load_read_bytes: Option<u64>,
    /// Layers on the GPU (llama.cpp's n_gpu_layers; -1: all).
    pub gpu_layers: i32,
    /// The GPU device of the plan, its resident weights and its pool.
    pub gpu_device: Option<String>,
    pub gpu_resident_bytes: Option<u64>,
    pub gpu_pool_bytes: Option<u64>,
    /// Bytes copied host→device per generated token (staged GPU tier).
    pub upload_bytes_per_token: Option<f64>,
    /// Selections served by an expert already in its GPU slot, per token.
    pub gpu_expert_hits_per_token: Option<f64>,
    /// Layers on other machines (`--rpc`), the output layer counted as one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_layers: Option<u32>,
    /// Where the layers are with `--rpc` (this machine, then each device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_split: Option<String>,
}

/// serde_json writes a non-finite `f64` as `null`; it reads back as NaN
/// (which the bench's statistics leave out), not as an error.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl RunReport {
    pub fn human(&self) -> String {
        let mut s = format!(
            "load: {:.2} s | prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.2} tok/s | threads: {}\nmode: {:?} | resident {} | streamed {} | pool {} | lookahead {} | peak RSS {}",
            self.load_secs,
            self.prompt_tokens,
            self.prompt_tps,
            self.gen_tokens,
            self.gen_tps,
            self.threads,
            self.mode,
            format_bytes(self.resident_bytes),
            format_bytes(self.streamed_bytes),
            format_bytes(self.pool_bytes),
            self.lookahead,
            format_bytes(self.peak_rss_bytes),
        );
        if self.prompt_reused_tokens > 0 {
            s += &format!(
                " | prompt tokens from the KV cache {}",
                self.prompt_reused_tokens
            );
        }
        if self.gpu_layers != 0 {
            let n = if self.gpu_layers < 0 {
                "all".to_string()
            } else {
                self.gpu_layers.to_string()
            };
            s += &format!(" | gpu layers {n}");
        }
        if let (Some(d), Some(r), Some(p)) = (
            &self.gpu_device,
            self.gpu_resident_bytes,
            self.gpu_pool_bytes,
        ) {
            s += &format!(
                "\ngpu: {d} | resident {} | pool {}",
                format_bytes(r),
                format_bytes(p)
            );
            if let Some(u) = self.upload_bytes_per_token {
                s += &format!(" | copied {}/token", format_bytes(u as u64));
            }
        }
        if let Some(r) = &self.rpc_split {
            s += &format!("\nrpc: {r}");
        }
        if let (Some(b), Some(st)) = (self.read_bytes_per_token, self.stall_ms_per_token) {
            s += &format!(
                "\nstreaming: {}/token read, stall {st:.1} ms/token",
                format_bytes(b as u64)
            );
            if let Some(g) = self.disk_gbps {
                s += &format!(", disk {g:.2} GB/s");
            }
            if let Some(h) = self.expert_hit_rate {
                s += &format!(", expert cache hits {:.1}%", h * 100.0);
            }
            if let Some(p) = self.expert_prediction_precision {
                s += &format!(", pre-gate precision {:.1}%", p * 100.0);
            }
            if let Some(u) = self.expert_readahead_used {
                s += &format!(", read-ahead used {:.1}%", u * 100.0);
            }
            if let Some(r) = self.expert_pages_recycled {
                s += &format!(", pages recycled {:.0}%", r * 100.0);
            }
            if let Some(b) = &self.io_backend {
                s += &format!(" ({b})");
            }
        }
        s
    }
}

#[cfg(test)]
impl RunReport {
    /// A report with `mode` and every figure zero or absent, for tests to fill in.
    pub(crate) fn zeroed(mode: Mode) -> RunReport {
        RunReport {
            mode,
            threads: 0,
            load_secs: 0.0,
            prompt_tokens: 0,
            prompt_reused_tokens: 0,
            prompt_tps: 0.0,
            gen_tokens: 0,
            gen_tps: 0.0,
            decode_ms_per_token: 0.0,
            ram_budget_bytes: 0,
            resident_bytes: 0,
            streamed_bytes: 0,
            pool_bytes: 0,
            embd_rows_bytes: None,
            lookahead: 0,
            pinned_layers: 0,
            streamed_layers: 0,
            read_bytes_per_token: None,
            stall_ms_per_token: None,
            expert_hit_rate: None,
            expert_prediction_precision: None,
            expert_readahead_used: None,
            expert_pages_recycled: None,
            disk_gbps: None,
            io_backend: None,
            predicted_tps: None,
            ceiling_tps: None,
            peak_rss_bytes: 0,
            load_read_bytes: None,
            gpu_layers: 0,
            gpu_device: None,
            gpu_resident_bytes: None,
            gpu_pool_bytes: None,
            upload_bytes_per_token: None,
            remote_layers: None,
            rpc_split: None,
            gpu_expert_hits_per_token: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_null_figures_read_as_nan() {
        let mut r = RunReport::zeroed(Mode::GpuExperts);
        r.gen_tps = 12.5;
        r.io_backend = Some("io_uring".into());
        let text = serde_json::to_string(&r).unwrap();
        let back: RunReport = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        r.prompt_tps = f64::INFINITY;
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"prompt_tps\":null"), "{text}");
        let back: RunReport = serde_json::from_str(&text).unwrap();
        assert!(back.prompt_tps.is_nan() && back.gen_tps == 12.5);
        assert!(serde_json::from_str::<RunReport>(r#"{"gen_tps":3}"#).is_err());
    }
}
