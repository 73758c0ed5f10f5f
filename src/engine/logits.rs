//! The `--logits-out` file: the full f32 logits of every generated position.
//!
//! Layout (little-endian): magic `HYPLOGIT` (8 bytes), `u32` version (1),
//! `u32` vocabulary size, `u64` row count, then `count × vocab` f32 values,
//! row-major (row i = the logits the i-th generated token was sampled from).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const MAGIC: &[u8; 8] = b"HYPLOGIT";
const VERSION: u32 = 1;
const COUNT_OFFSET: u64 = 16;

/// Streams logits rows to a file; the row count is patched in by [`finish`](Self::finish).
pub struct LogitsWriter {
    out: BufWriter<File>,
    path: PathBuf,
    vocab: u32,
    count: u64,
}

impl LogitsWriter {
    pub fn create(path: &Path, vocab: usize) -> Result<Self> {
        let vocab = u32::try_from(vocab).context("vocabulary too large")?;
        let file = File::create(path)
            .with_context(|| format!("{}: cannot create logits file", path.display()))?;
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&vocab.to_le_bytes())?;
        out.write_all(&0u64.to_le_bytes())?;
        Ok(LogitsWriter {
            out,
            path: path.to_owned(),
            vocab,
            count: 0,
        })
    }

    pub fn push(&mut self, row: &[f32]) -> Result<()> {
        if row.len() != self.vocab as usize {
            bail!(
                "logits row has {} values, expected {}",
                row.len(),
                self.vocab
            );
        }
        for v in row {
            self.out.write_all(&v.to_le_bytes())?;
        }
        self.count += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        let ctx = || format!("{}: cannot write logits file", self.path.display());
        self.out.flush().with_context(ctx)?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(COUNT_OFFSET)).with_context(ctx)?;
        file.write_all(&self.count.to_le_bytes())
            .with_context(ctx)?;
        file.sync_all().with_context(ctx)?;
        Ok(())
    }
}

/// A logits file read back whole (tests and benchmarks compare runs with it).
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub vocab: usize,
    pub rows: Vec<Vec<f32>>,
}

impl Logits {
    pub fn read(path: &Path) -> Result<Logits> {
        let ctx = || format!("{}: not a readable logits file", path.display());
        let mut r = BufReader::new(File::open(path).with_context(ctx)?);
        let mut head = [0u8; 24];
        r.read_exact(&mut head).with_context(ctx)?;
        if &head[..8] != MAGIC {
            bail!("{}: bad magic, not a Hypura logits file", path.display());
        }
        let version = u32::from_le_bytes(head[8..12].try_into()?);
        if version != VERSION {
            bail!(
                "{}: logits file version {version}, expected {VERSION}",
                path.display()
            );
        }
        let vocab = u32::from_le_bytes(head[12..16].try_into()?) as usize;
        let count = u64::from_le_bytes(head[16..24].try_into()?) as usize;
        let mut rows = Vec::with_capacity(count.min(1 << 16));
        let mut buf = vec![0u8; vocab * 4];
        for _ in 0..count {
            r.read_exact(&mut buf).with_context(ctx)?;
            rows.push(
                buf.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            );
        }
        Ok(Logits { vocab, rows })
    }

    /// The greedy token of every row.
    pub fn argmax_tokens(&self) -> Vec<i32> {
        self.rows
            .iter()
            .map(|r| super::sampling::argmax(r) as i32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.bin");
        let mut w = LogitsWriter::create(&p, 3).unwrap();
        w.push(&[1.0, -2.5, f32::MIN_POSITIVE]).unwrap();
        w.push(&[0.0, 7.0, -0.0]).unwrap();
        assert!(w.push(&[1.0]).is_err());
        w.finish().unwrap();
        let l = Logits::read(&p).unwrap();
        assert_eq!(l.vocab, 3);
        assert_eq!(l.rows.len(), 2);
        assert_eq!(l.rows[0][2].to_bits(), f32::MIN_POSITIVE.to_bits());
        assert_eq!(l.argmax_tokens(), vec![0, 1]);
    }
}
