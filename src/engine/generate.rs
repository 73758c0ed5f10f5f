//! The token loop shared by prompt mode and chat: prefill, then sample and
//! decode one token at a time, streaming text as it is produced.

use std::time::Instant;

use anyhow::Result;

use super::context::Context;
use super::logits::LogitsWriter;
use super::sampler::Sampler;

/// Timings of one generation, for the statistics line.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub gen_tokens: usize,
    /// Decodes of generated tokens (the last token is decoded only in chat).
    pub gen_decodes: usize,
    pub gen_secs: f64,
    /// Of `gen_secs`, the time inside llama.cpp's decode (the rest is
    /// sampling, detokenising and output).
    pub gen_decode_secs: f64,
}

impl GenStats {
    pub fn prompt_tps(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_secs)
    }
    pub fn gen_tps(&self) -> f64 {
        rate(
            self.gen_decodes.max(1).min(self.gen_tokens.max(1)),
            self.gen_secs,
        )
    }
    pub fn add(&mut self, o: &GenStats) {
        self.prompt_tokens += o.prompt_tokens;
        self.prompt_secs += o.prompt_secs;
        self.gen_tokens += o.gen_tokens;
        self.gen_decodes += o.gen_decodes;
        self.gen_secs += o.gen_secs;
        self.gen_decode_secs += o.gen_decode_secs;
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// What one call of [`generate`] does.
pub struct GenRequest<'a> {
    /// Tokens to prefill (appended after what the context already holds).
    pub prompt: &'a [i32],
    pub max_tokens: usize,
    /// Also decode the last sampled token (chat keeps the reply in the cache).
    pub decode_last: bool,
    /// Called once the prompt is prefilled (metrics snapshots).
    pub on_prefill: Option<&'a mut dyn FnMut()>,
}

/// Runs prefill and generation. `on_text` receives valid UTF-8 text as soon
/// as it is complete; `logits_out` receives the logits row of every position
/// a token is sampled from. Stops at end-of-generation tokens (not printed).
pub fn generate(
    ctx: &mut Context<'_>,
    sampler: &mut Sampler,
    req: GenRequest<'_>,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
    mut logits_out: Option<&mut LogitsWriter>,
) -> Result<(Vec<i32>, GenStats)> {
    let model = ctx.model();
    let mut stats = GenStats {
        prompt_tokens: req.prompt.len(),
        ..GenStats::default()
    };
    let t0 = Instant::now();
    ctx.decode(req.prompt)?;
    stats.prompt_secs = t0.elapsed().as_secs_f64();
    if let Some(f) = req.on_prefill {
        f();
    }

    let mut out = Vec::with_capacity(req.max_tokens);
    let mut text = Utf8Stream::default();
    let mut piece = Vec::with_capacity(64);
    let t1 = Instant::now();
    for i in 0..req.max_tokens {
        let logits = ctx.logits();
        if let Some(w) = logits_out.as_deref_mut() {
            w.push(logits)?;
        }
        let tok = sampler.sample(logits);
        if model.is_eog(tok) {
            break;
        }
        out.push(tok);
        piece.clear();
        model.token_bytes(tok, &mut piece);
        if let Some(s) = text.push(&piece) {
            on_text(&s)?;
        }
        let last = i + 1 == req.max_tokens;
        if !last || req.decode_last {
            let td = Instant::now();
            ctx.decode(&[tok])?;
            stats.gen_decode_secs += td.elapsed().as_secs_f64();
            stats.gen_decodes += 1;
        }
    }
    if let Some(s) = text.flush() {
        on_text(&s)?;
    }
    stats.gen_tokens = out.len();
    stats.gen_secs = t1.elapsed().as_secs_f64();
    Ok((out, stats))
}

/// Turns a byte stream into text, holding back an incomplete UTF-8 sequence
/// until the rest of it arrives (tokens may split a character).
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that is now complete, if any.
    pub fn push(&mut self, bytes: &[u8]) -> Option<String> {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // An invalid byte (not merely incomplete): emit it replaced.
            Err(_) => self.pending.len(),
        };
        if valid == 0 {
            return None;
        }
        let rest = self.pending.split_off(valid);
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        Some(s)
    }

    /// Whatever is left at the end, replaced if incomplete.
    pub fn flush(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Stream;

    #[test]
    fn split_characters_are_held_back() {
        let mut s = Utf8Stream::default();
        let e = "é€".as_bytes();
        assert_eq!(s.push(&e[..1]), None);
        assert_eq!(s.push(&e[1..3]).as_deref(), Some("é"));
        assert_eq!(s.push(&e[3..]).as_deref(), Some("€"));
        assert_eq!(s.push(&[0xE2]), None);
        assert_eq!(s.flush().as_deref(), Some("\u{FFFD}"));
    }
}
