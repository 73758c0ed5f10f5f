//! Pieces of the token loop ([`super::Session::generate`]): its timings and
//! the UTF-8 reassembly of token bytes.

/// Timings of one generation, for the statistics line.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct GenStats {
    /// Prompt tokens evaluated (the KV cache's reused prefix not counted).
    pub prompt_tokens: usize,
    /// Prompt tokens served from the KV cache (prefix reuse).
    pub prompt_reused: usize,
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
        self.prompt_reused += o.prompt_reused;
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
