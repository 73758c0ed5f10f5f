//! A synthetic SentencePiece (`llama`) vocabulary: `<unk>`, `<s>`, `</s>`,
//! the 256 byte tokens `<0x00>`..`<0xFF>` (so any text tokenizes and any
//! output detokenizes), then made-up word pieces.

use std::collections::HashSet;

use crate::gguf::{GgufError, GgufWriter, MetaArray};

/// llama.cpp token types (`llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_BYTE: i32 = 6;

/// Ids of the special tokens.
pub const UNK_ID: u32 = 0;
/// Beginning of sequence.
pub const BOS_ID: u32 = 1;
/// End of sequence.
pub const EOS_ID: u32 = 2;

/// The SentencePiece word-boundary marker.
const SPACE: char = '\u{2581}';

/// Specials and byte tokens: the smallest vocabulary, plus one word piece.
pub const MIN_VOCAB: u32 = 3 + 256 + 1;

/// Tokens with their scores and types, index = token id.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// Token texts (unique).
    pub tokens: Vec<String>,
    /// SentencePiece scores (higher merges first).
    pub scores: Vec<f32>,
    /// llama.cpp token types.
    pub types: Vec<i32>,
}

impl Vocab {
    /// A vocabulary of exactly `n` tokens (`n >= MIN_VOCAB`, checked by the caller).
    pub fn spm(n: u32) -> Vocab {
        let n = n as usize;
        let mut v = Vocab {
            tokens: Vec::with_capacity(n),
            scores: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
        };
        v.push("<unk>".to_string(), 0.0, TYPE_UNKNOWN);
        v.push("<s>".to_string(), 0.0, TYPE_CONTROL);
        v.push("</s>".to_string(), 0.0, TYPE_CONTROL);
        for b in 0..=255u8 {
            v.push(format!("<0x{b:02X}>"), 0.0, TYPE_BYTE);
        }
        let mut seen: HashSet<String> = v.tokens.iter().cloned().collect();
        for (rank, piece) in word_pieces()
            .filter(|p| seen.insert(p.clone()))
            .take(n.saturating_sub(v.tokens.len()))
            .enumerate()
        {
            v.push(piece, -(rank as f32), TYPE_NORMAL);
        }
        v
    }

    fn push(&mut self, token: String, score: f32, ty: i32) {
        self.tokens.push(token);
        self.scores.push(score);
        self.types.push(ty);
    }

    /// Adds the `tokenizer.ggml.*` keys llama.cpp's SPM loader reads.
    pub fn add_to(self, w: &mut GgufWriter) -> Result<(), GgufError> {
        w.add_kv("tokenizer.ggml.model", "llama")?;
        w.add_kv("tokenizer.ggml.pre", "default")?;
        w.add_kv("tokenizer.ggml.tokens", MetaArray::String(self.tokens))?;
        w.add_kv("tokenizer.ggml.scores", MetaArray::F32(self.scores))?;
        w.add_kv("tokenizer.ggml.token_type", MetaArray::I32(self.types))?;
        w.add_kv("tokenizer.ggml.bos_token_id", BOS_ID)?;
        w.add_kv("tokenizer.ggml.eos_token_id", EOS_ID)?;
        w.add_kv("tokenizer.ggml.unknown_token_id", UNK_ID)?;
        w.add_kv("tokenizer.ggml.add_bos_token", true)?;
        w.add_kv("tokenizer.ggml.add_eos_token", false)
    }
}

/// `▁`, printable ASCII, then `▁a`, `▁b`, ..., `▁aa`, `aa`, ... forever.
fn word_pieces() -> impl Iterator<Item = String> {
    let singles = std::iter::once(SPACE.to_string())
        .chain((0x21u8..=0x7e).map(|b| char::from(b).to_string()));
    let words = (0u64..).flat_map(|i| {
        let w = letters(i);
        [format!("{SPACE}{w}"), w]
    });
    singles.chain(words)
}

/// Bijective base-26: 0 → `a`, 25 → `z`, 26 → `aa`, ...
fn letters(mut i: u64) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_has_exact_size_unique_tokens_and_byte_tokens() {
        for n in [MIN_VOCAB, 1000, 32000] {
            let v = Vocab::spm(n);
            assert_eq!(v.tokens.len(), n as usize);
            assert_eq!(v.scores.len(), n as usize);
            assert_eq!(v.types.len(), n as usize);
            let unique: HashSet<_> = v.tokens.iter().collect();
            assert_eq!(unique.len(), n as usize);
            assert_eq!(v.tokens[3 + 10], "<0x0A>");
            assert_eq!(v.types[3 + 10], TYPE_BYTE);
        }
        assert_eq!(letters(0), "a");
        assert_eq!(letters(25), "z");
        assert_eq!(letters(26), "aa");
        assert_eq!(letters(27), "ab");
    }
}
