//! Token embeddings read by rows (CPU streaming plans).
//!
//! The input embedding matrix is `n_vocab` rows of `n_embd` values, and a
//! token reads one row of it (`get_rows`): keeping it resident spends RAM on
//! rows that are never touched. Qwen2.5-1.5B's is 125 MiB of a 700 MiB
//! cgroup; read by rows, a token costs one 4 KiB read (864 bytes of Q4_K
//! row), and the 125 MiB pin about five more FFN layers, which reads ~127 MB
//! less per token.
//!
//! Sketch (per decoded token): one row, at most two pages, ~0.2 ms at QD 1
//! against hundreds of milliseconds of layer reads; a 512-token prompt
//! batch reads at most 512 × (pages per row) pages, submitted together.
//! Rows stay in a cache of [`cache_bytes`] (address space the size of the
//! tensor, pages committed when a row is read) that is emptied when a batch
//! would overflow it.
//!
//! Only when the output matrix is a tensor of its own: a tied output reads
//! every row of the embeddings every token, so they stay resident.

use super::*;

/// The most tokens of one batch the cache is sized for (llama.cpp's default
/// `n_batch`; a larger batch empties the cache first and may use more).
pub const ROWS_PER_BATCH: u64 = 512;
/// The least the row cache holds.
pub const MIN_CACHE: u64 = 8 << 20;
/// Below this much saved RAM the embeddings stay resident.
pub const MIN_SAVING: u64 = 16 << 20;

/// The token embeddings, read by rows on demand.
#[derive(Clone, Debug, Serialize)]
pub struct EmbdRows {
    pub name: String,
    /// Absolute offset of the tensor's data in the file.
    pub file_offset: u64,
    pub size: u64,
    pub n_rows: u64,
    pub row_bytes: u64,
    /// RAM the row cache may hold (counted in the plan's budget).
    pub cache_bytes: u64,
}

/// RAM for the row cache of rows of `row_bytes`: a batch's rows (each may
/// straddle one page more than its length needs), at least [`MIN_CACHE`],
/// at most the tensor's aligned bytes.
pub fn cache_bytes(row_bytes: u64, tensor_pages_bytes: u64) -> u64 {
    let page = crate::io::ALIGN as u64;
    let per_row = (row_bytes.div_ceil(page) + 1) * page;
    (ROWS_PER_BATCH * per_row)
        .max(MIN_CACHE)
        .min(tensor_pages_bytes)
}

/// The token embeddings of `g`, if a CPU streaming plan should read them by
/// rows: a 2-D token embedding matrix, an output matrix of its own, and at
/// least [`MIN_SAVING`] saved.
pub fn embd_rows(g: &GgufFile) -> Option<EmbdRows> {
    if !g.tensors.iter().any(|t| t.role == TensorRole::Output) {
        return None;
    }
    let mut embd = g
        .tensors
        .iter()
        .filter(|t| t.role == TensorRole::TokenEmbedding);
    let t = embd.next()?;
    if embd.next().is_some() || t.dims.len() != 2 {
        return None;
    }
    let n_rows = t.dims[1];
    if n_rows == 0 || t.size == 0 || !t.size.is_multiple_of(n_rows) {
        return None;
    }
    let row_bytes = t.size / n_rows;
    let pages = slot_len_for(t.offset, usize::try_from(t.size).ok()?) as u64;
    let cache = cache_bytes(row_bytes, pages);
    if t.size < cache.saturating_add(MIN_SAVING) {
        return None;
    }
    Some(EmbdRows {
        name: t.name.clone(),
        file_offset: t.offset,
        size: t.size,
        n_rows,
        row_bytes,
        cache_bytes: cache,
    })
}

/// RAM of the non-streamed tensors `base` when `rows` are read by rows:
/// the embeddings out, their row cache in.
pub fn ram_without(base: u64, rows: Option<&EmbdRows>) -> u64 {
    rows.map_or(base, |r| {
        base.saturating_sub(r.size).saturating_add(r.cache_bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgmlType;

    const MIB: u64 = 1 << 20;
    const FFN_T: u64 = 8 * MIB;
    /// 65,536 rows of 1,024 Q8_0 values (1,088 bytes).
    const EMBD: u64 = 65_536 * 1_088;

    /// 16 layers of 2 MiB attention and 3 × 8 MiB FFN; the embeddings 2-D
    /// (or 1-D: not splittable into rows), an output matrix unless `tied`.
    fn model(two_d: bool, tied: bool) -> GgufFile {
        let mut tensors = Vec::new();
        let mut off = 4096u64;
        let mut push = |name: String, dims: Vec<u64>, size: u64, role, layer| {
            tensors.push(TensorInfo {
                name,
                ggml_type: GgmlType::Q8_0,
                dims,
                offset: off,
                size,
                role,
                layer,
            });
            off += size;
        };
        let dims = if two_d {
            vec![1024, 65_536]
        } else {
            vec![EMBD]
        };
        push(
            "token_embd.weight".into(),
            dims,
            EMBD,
            TensorRole::TokenEmbedding,
            None,
        );
        for l in 0..16 {
            let attn = format!("blk.{l}.attn_qkv.weight");
            push(attn, vec![2 * MIB], 2 * MIB, TensorRole::Attention, Some(l));
            for (n, role) in [
                ("gate", TensorRole::FfnGate),
                ("up", TensorRole::FfnUp),
                ("down", TensorRole::FfnDown),
            ] {
                let name = format!("blk.{l}.ffn_{n}.weight");
                push(name, vec![FFN_T], FFN_T, role, Some(l));
            }
        }
        if !tied {
            push(
                "output.weight".into(),
                vec![EMBD],
                EMBD,
                TensorRole::Output,
                None,
            );
        }
        GgufFile {
            path: "rows.gguf".into(),
            version: 3,
            alignment: 32,
            data_offset: 4096,
            file_size: off,
            metadata: Vec::new(),
            tensors,
        }
    }

    fn plan(g: &GgufFile, budget: u64) -> Plan {
        Plan::new(&PlanInput {
            gguf: g,
            ram_budget: budget,
            mode: None,
            lookahead: Some(1),
            disk_gbps: None,
            mem_gbps: None,
            gpu: None,
        })
        .unwrap()
    }

    #[test]
    fn rows_free_the_embeddings_for_pinned_layers() {
        let budget = 300 * MIB;
        let rows = plan(&model(true, false), budget);
        let whole = plan(&model(false, false), budget);
        assert_eq!((rows.mode, whole.mode), (Mode::Dense, Mode::Dense));
        let r = rows.embd_rows.as_ref().expect("embeddings read by rows");
        assert_eq!((r.n_rows, r.row_bytes, r.size), (65_536, 1_088, EMBD));
        assert!(whole.embd_rows.is_none());
        // Out of the resident set; the row cache is in the budget.
        let non_ffn = 2 * EMBD + 16 * 2 * MIB;
        let pinned = |p: &Plan| p.pinned_layers.len() as u64 * 3 * FFN_T;
        assert_eq!(rows.resident_bytes, non_ffn - EMBD + pinned(&rows));
        assert_eq!(whole.resident_bytes, non_ffn + pinned(&whole));
        assert!(rows.resident_bytes + rows.pool_bytes + r.cache_bytes <= budget);
        // 300 MiB − 168 non-FFN − 48 of pool leaves 84 MiB: 3 layers of 24
        // pinned; by rows, 68 MiB of embeddings out and 8 of cache in: 6.
        assert_eq!(
            rows.pinned_layers.len(),
            whole.pinned_layers.len() + 3,
            "{:?} vs {:?}",
            rows.pinned_layers,
            whole.pinned_layers
        );
        assert!(rows.bytes_per_token < whole.bytes_per_token);
        // A tied output reads every row every token: resident.
        assert!(plan(&model(true, true), budget).embd_rows.is_none());
    }

    #[test]
    fn the_cache_holds_a_batch_of_rows_within_the_tensor() {
        // Qwen2.5-1.5B: 864-byte rows, two pages each at worst.
        assert_eq!(cache_bytes(864, 125 << 20), 8 << 20);
        // 16 KiB rows (8192 f16): 5 pages each, 512 of them.
        assert_eq!(cache_bytes(16384, 1 << 30), 512 * 5 * 4096);
        // Never more than the tensor.
        assert_eq!(cache_bytes(864, 1 << 20), 1 << 20);
    }
}
