//! The GGUF layer against real models (`models/*.gguf`, fetched by
//! `models/fetch.sh`) and writer → parser round trips.
//!
//! Missing models are skipped with a notice, unless `HYPURA_REQUIRE_MODELS=1`
//! (set in CI), which turns a missing model into a failure.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use hypura::gguf::{
    GgmlType, GgufError, GgufFile, GgufWriter, MetaArray, MetaValue, TensorRole, ValueType,
};

/// `models/NAME`, or `None` (with a notice) if it is absent and not required.
fn model(name: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    if path.is_file() {
        return Some(path);
    }
    let required = std::env::var("HYPURA_REQUIRE_MODELS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{} is missing and HYPURA_REQUIRE_MODELS=1 (run models/fetch.sh)",
        path.display()
    );
    eprintln!(
        "NOTICE: skipping, {} is absent (run models/fetch.sh)",
        path.display()
    );
    None
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Tensors tile the data section: each starts at the previous end rounded up
/// to the alignment, and the last one (padded) ends exactly at end of file.
fn assert_layout_reaches_eof(f: &GgufFile) {
    let mut sorted: Vec<_> = f.tensors.iter().collect();
    sorted.sort_by_key(|t| t.offset);
    let mut expected = f.data_offset;
    for t in &sorted {
        assert_eq!(
            t.offset, expected,
            "tensor {} is not where the previous one ends",
            t.name
        );
        assert_eq!(t.offset % f.alignment, 0);
        expected = align_up(t.offset + t.size, f.alignment);
    }
    assert_eq!(
        expected, f.file_size,
        "tensor sizes plus padding must reach the end of the file"
    );
}

/// Every tensor's size matches its shape and type.
fn assert_sizes_match_shapes(f: &GgufFile) {
    for t in &f.tensors {
        let blocks = t.n_elements() / t.ggml_type.block_size();
        assert_eq!(t.size, blocks * t.ggml_type.type_size(), "{}", t.name);
    }
}

fn u32_of(f: &GgufFile, key: &str) -> Option<u64> {
    f.get(key).and_then(MetaValue::as_u64)
}

#[test]
fn smollm2_parses() {
    let Some(path) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.tensors.len(), 272);
    assert_eq!(f.architecture(), Some("llama"));
    assert_layout_reaches_eof(&f);
    assert_sizes_match_shapes(&f);

    let p = f.arch_params();
    assert_eq!(p.arch, "llama");
    assert_eq!(p.n_layer, Some(30));
    assert_eq!(p.n_embd, Some(576));
    assert_eq!(p.n_head, Some(9));
    assert_eq!(p.n_head_kv, Some(3));
    assert_eq!(p.n_ff, Some(1536));
    assert_eq!(p.n_ctx_train, Some(8192));
    assert_eq!(p.vocab_size, Some(49152));
    assert_eq!(
        (p.n_expert, p.n_expert_used, p.n_ff_exp),
        (None, None, None)
    );
    assert_eq!(f.layer_count(), 30);

    let up = f.tensor("blk.0.ffn_up.weight").unwrap();
    assert_eq!((up.role, up.layer), (TensorRole::FfnUp, Some(0)));
    assert_eq!(up.dims, vec![576, 1536]);
    assert_eq!(up.ggml_type, GgmlType::Q4_1);
    assert!(up.role.is_dense_ffn() && !up.role.is_experts());
    assert_eq!(up.n_experts(), None);
    let embd = f.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (embd.role, embd.layer, embd.ggml_type),
        (TensorRole::TokenEmbedding, None, GgmlType::Q8_0)
    );
    assert_eq!(
        f.tensor("blk.29.attn_q.weight").map(|t| (t.role, t.layer)),
        Some((TensorRole::Attention, Some(29)))
    );
    assert_eq!(
        f.tensor("output_norm.weight").map(|t| t.role),
        Some(TensorRole::OutputNorm)
    );
    // Each layer: attn_norm, q, k, v, output, ffn_norm, gate, up, down.
    for layer in 0..30 {
        assert_eq!(
            f.tensors.iter().filter(|t| t.layer == Some(layer)).count(),
            9
        );
    }
    assert_eq!(f.tensors.iter().filter(|t| t.layer.is_none()).count(), 2);
    assert!(f.parameter_count() > 130_000_000 && f.parameter_count() < 140_000_000);

    let merges = f
        .get("tokenizer.ggml.merges")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!(merges.elem_type(), ValueType::String);
    assert_eq!(merges.len(), 48900);
    assert_eq!(u32_of(&f, "general.file_type"), Some(3));
}

#[test]
fn gemma3_parses() {
    let Some(path) = model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensors.len(), 236);
    assert_eq!(f.architecture(), Some("gemma3"));
    assert_layout_reaches_eof(&f);
    assert_sizes_match_shapes(&f);

    let p = f.arch_params();
    assert_eq!(p.n_layer, Some(18));
    assert_eq!(p.n_embd, Some(640));
    assert_eq!(p.n_head, Some(4));
    assert_eq!(p.n_head_kv, Some(1));
    assert_eq!(p.n_ff, Some(2048));
    assert_eq!(p.n_ctx_train, Some(32768));
    assert_eq!(p.vocab_size, Some(262144));

    let role = |name: &str| f.tensor(name).map(|t| (t.role, t.layer));
    assert_eq!(
        role("blk.0.post_attention_norm.weight"),
        Some((TensorRole::AttnNorm, Some(0)))
    );
    assert_eq!(
        role("blk.3.post_ffw_norm.weight"),
        Some((TensorRole::FfnNorm, Some(3)))
    );
    assert_eq!(
        role("blk.17.attn_q_norm.weight"),
        Some((TensorRole::Attention, Some(17)))
    );
    assert_eq!(
        role("blk.17.ffn_down.weight"),
        Some((TensorRole::FfnDown, Some(17)))
    );
    assert_eq!(
        role("output.weight"),
        None,
        "gemma3 ties the output to the embedding"
    );
    let types: std::collections::BTreeSet<_> = f.tensors.iter().map(|t| t.ggml_type).collect();
    assert!(
        types.contains(&GgmlType::Q4_K)
            && types.contains(&GgmlType::Q6_K)
            && types.contains(&GgmlType::F32)
    );
    let scores = f
        .get("tokenizer.ggml.scores")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!((scores.elem_type(), scores.len()), (ValueType::F32, 262144));
}

/// One value of every scalar type and an array of every element type.
fn all_value_kinds() -> Vec<(String, MetaValue)> {
    let v: Vec<(&str, MetaValue)> = vec![
        ("t.u8", MetaValue::U8(200)),
        ("t.i8", MetaValue::I8(-100)),
        ("t.u16", MetaValue::U16(60000)),
        ("t.i16", MetaValue::I16(-30000)),
        ("t.u32", MetaValue::U32(4_000_000_000)),
        ("t.i32", MetaValue::I32(-2_000_000_000)),
        ("t.f32", MetaValue::F32(1.5e-5)),
        ("t.bool", MetaValue::Bool(true)),
        ("t.string", MetaValue::String("héllo\nwörld".to_string())),
        ("t.empty_string", MetaValue::String(String::new())),
        ("t.u64", MetaValue::U64(u64::MAX)),
        ("t.i64", MetaValue::I64(i64::MIN)),
        ("t.f64", MetaValue::F64(-2.5e300)),
        ("a.u8", MetaValue::Array(MetaArray::U8(vec![0, 1, 255]))),
        ("a.i8", MetaValue::Array(MetaArray::I8(vec![-128, 127]))),
        ("a.u16", MetaValue::Array(MetaArray::U16(vec![1, 65535]))),
        ("a.i16", MetaValue::Array(MetaArray::I16(vec![-1, 1]))),
        ("a.u32", MetaValue::Array(MetaArray::U32(vec![7, 9, 8]))),
        ("a.i32", MetaValue::Array(MetaArray::I32(vec![-7, 9]))),
        ("a.f32", MetaValue::Array(MetaArray::F32(vec![0.25, -1.0]))),
        (
            "a.bool",
            MetaValue::Array(MetaArray::Bool(vec![true, false, true])),
        ),
        (
            "a.string",
            MetaValue::Array(MetaArray::String(vec![
                "a".into(),
                String::new(),
                "ü b".into(),
            ])),
        ),
        ("a.u64", MetaValue::Array(MetaArray::U64(vec![u64::MAX]))),
        ("a.i64", MetaValue::Array(MetaArray::I64(vec![i64::MIN, 0]))),
        ("a.f64", MetaValue::Array(MetaArray::F64(vec![1e-300]))),
        ("a.empty", MetaValue::Array(MetaArray::F32(vec![]))),
    ];
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Byte `i` of tensor `t`'s test pattern.
fn pattern(t: usize, i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(t as u64 * 7) % 251) as u8
}

fn round_trip(alignment: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("rt{alignment}.gguf"));
    let mut w = GgufWriter::new(&path);
    if alignment != 32 {
        w.set_alignment(alignment).unwrap();
    }
    for (k, v) in all_value_kinds() {
        w.add_kv(&k, v).unwrap();
    }
    let shapes: [(&str, GgmlType, &[u64]); 5] = [
        ("token_embd.weight", GgmlType::Q8_0, &[64, 10]),
        ("blk.0.attn_norm.weight", GgmlType::F32, &[64]),
        ("blk.0.ffn_gate_exps.weight", GgmlType::Q4_K, &[256, 3, 4]),
        (
            "blk.0.ffn_down_exps.weight",
            GgmlType::Q6_K,
            &[256, 2, 1, 4],
        ),
        ("blk.1.ffn_up.weight", GgmlType::F16, &[3, 5]),
    ];
    for (name, t, dims) in shapes {
        w.add_tensor(name, t, dims).unwrap();
    }
    let expected_size = w.file_size().unwrap();
    let mut index = 0usize;
    let written = w
        .write(|spec, out| {
            let bytes: Vec<u8> = (0..spec.size).map(|i| pattern(index, i)).collect();
            index += 1;
            out.write_all(&bytes)
        })
        .unwrap();
    assert_eq!(written, expected_size);

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.file_size, written);
    assert_eq!(f.alignment, alignment);
    assert_eq!(f.data_offset % alignment, 0);
    let mut expected_meta = all_value_kinds();
    if alignment != 32 {
        expected_meta.insert(
            0,
            (
                "general.alignment".to_string(),
                MetaValue::U32(alignment as u32),
            ),
        );
    }
    assert_eq!(f.metadata, expected_meta);
    assert_layout_reaches_eof(&f);
    assert_sizes_match_shapes(&f);
    for (i, (name, t, dims)) in shapes.iter().enumerate() {
        let info = f.tensor(name).unwrap();
        assert_eq!((info.ggml_type, info.dims.as_slice()), (*t, *dims));
        assert_eq!(info.size, t.tensor_size(dims).unwrap());
        let mut data = vec![0u8; info.size as usize];
        let mut file = std::fs::File::open(&path).unwrap();
        file.seek(SeekFrom::Start(info.offset)).unwrap();
        file.read_exact(&mut data).unwrap();
        assert!(
            data.iter()
                .enumerate()
                .all(|(j, &b)| b == pattern(i, j as u64)),
            "data of {name}"
        );
    }
}

#[test]
fn writer_round_trip_alignment_32() {
    round_trip(32);
}

#[test]
fn writer_round_trip_alignment_4096() {
    round_trip(4096);
}

#[test]
fn expert_ranges_are_contiguous_slices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("experts.gguf");
    let mut w = GgufWriter::new(&path);
    w.add_tensor("blk.2.ffn_up_exps.weight", GgmlType::Q8_0, &[64, 32, 8])
        .unwrap();
    w.add_tensor("blk.2.ffn_gate_inp.weight", GgmlType::F32, &[64, 8])
        .unwrap();
    w.write(|spec, out| out.write_all(&vec![1u8; spec.size as usize]))
        .unwrap();
    let f = GgufFile::open(&path).unwrap();
    let t = f.tensor("blk.2.ffn_up_exps.weight").unwrap();
    assert_eq!(
        (t.role, t.layer, t.n_experts()),
        (TensorRole::FfnUpExps, Some(2), Some(8))
    );
    let per_expert = 2 * 34 * 32; // (64 / 32) blocks of 34 bytes, 32 rows
    for e in 0..8 {
        assert_eq!(
            t.expert_range(e),
            Some((t.offset + e * per_expert, per_expert))
        );
    }
    assert_eq!(t.expert_range(8), None);
    let router = f.tensor("blk.2.ffn_gate_inp.weight").unwrap();
    assert_eq!(
        (router.role, router.n_experts(), router.expert_range(0)),
        (TensorRole::Router, None, None)
    );
}

#[test]
fn arch_params_take_the_max_of_per_layer_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arrays.gguf");
    let mut w = GgufWriter::new(&path);
    w.add_kv("general.architecture", "toy").unwrap();
    w.add_kv("toy.attention.head_count", vec![8i32, 16, 4])
        .unwrap();
    w.add_kv("toy.attention.head_count_kv", vec![2u32, 4, 1])
        .unwrap();
    w.add_kv("toy.feed_forward_length", 1024u64).unwrap();
    w.add_kv("toy.expert_count", 64u32).unwrap();
    w.add_kv("toy.expert_used_count", 8u32).unwrap();
    w.add_kv("toy.expert_feed_forward_length", 768u32).unwrap();
    w.add_kv("toy.vocab_size", 5000u32).unwrap();
    w.write(|_, _| Ok(())).unwrap();
    let p = GgufFile::open(&path).unwrap().arch_params();
    assert_eq!(p.arch, "toy");
    assert_eq!(
        (p.n_head, p.n_head_kv, p.n_ff),
        (Some(16), Some(4), Some(1024))
    );
    assert_eq!(
        (p.n_expert, p.n_expert_used, p.n_ff_exp),
        (Some(64), Some(8), Some(768))
    );
    assert_eq!(
        (p.n_layer, p.n_embd, p.vocab_size),
        (None, None, Some(5000))
    );
}

/// A file with one tensor, patched by `edit` before parsing.
fn open_patched(edit: impl FnOnce(&mut Vec<u8>)) -> Result<GgufFile, GgufError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.gguf");
    let mut w = GgufWriter::new(&path);
    w.add_tensor("a.weight", GgmlType::F32, &[8]).unwrap();
    w.add_tensor("b.weight", GgmlType::F32, &[8]).unwrap();
    w.write(|spec, out| out.write_all(&vec![0u8; spec.size as usize]))
        .unwrap();
    let mut data = std::fs::read(&path).unwrap();
    edit(&mut data);
    std::fs::write(&path, &data).unwrap();
    GgufFile::open(&path)
}

/// Byte offset of tensor info field `field_from_name_end` of tensor "a" or "b".
fn info_at(first: bool, field_from_name_end: usize) -> usize {
    // header 24, then per tensor: len 8 + name 8 + n_dims 4 + dim 8 + type 4 + offset 8 = 40.
    24 + if first { 0 } else { 40 } + 8 + "a.weight".len() + field_from_name_end
}

#[test]
fn rejects_duplicate_misaligned_overlapping_and_bad_versions() {
    let msg = |r: Result<GgufFile, GgufError>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let dup = msg(open_patched(|d| d[info_at(false, 0) - 8] = b'a'));
    assert!(dup.contains("duplicate tensor name 'a.weight'"), "{dup}");
    let misaligned = msg(open_patched(|d| d[info_at(false, 16)] = 33));
    assert!(
        misaligned.contains("not a multiple of the alignment"),
        "{misaligned}"
    );
    let overlap = msg(open_patched(|d| d[info_at(false, 16)] = 0));
    assert!(overlap.contains("overlap"), "{overlap}");
    let version = msg(open_patched(|d| d[4] = 1));
    assert!(version.contains("unsupported GGUF version 1"), "{version}");
    let zero_dim = msg(open_patched(|d| d[info_at(true, 4)] = 0));
    assert!(zero_dim.contains("dimension 0 is 0"), "{zero_dim}");
    assert!(open_patched(|_| {}).is_ok());
}

#[test]
fn writer_enforces_exact_tensor_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new(dir.path().join("short.gguf"));
    w.add_tensor("x.weight", GgmlType::F32, &[16]).unwrap();
    let short = w
        .write(|_, out| out.write_all(&[0u8; 10]))
        .unwrap_err()
        .to_string();
    assert!(short.contains("wrote 10 of the 64 bytes"), "{short}");
    let long = w
        .write(|_, out| out.write_all(&[0u8; 65]))
        .unwrap_err()
        .to_string();
    assert!(long.contains("past the end of the tensor"), "{long}");
    assert!(
        w.add_tensor("x.weight", GgmlType::F32, &[16]).is_err(),
        "duplicate name"
    );
    assert!(
        w.add_tensor("y.weight", GgmlType::Q4_K, &[100]).is_err(),
        "partial block"
    );
    assert!(
        w.add_tensor("z.weight", GgmlType::F32, &[1, 1, 1, 1, 1])
            .is_err(),
        "5 dims"
    );
    assert!(GgufWriter::new("x").set_alignment(48).is_err());
}
