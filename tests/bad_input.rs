//! Malformed inputs must fail cleanly: non-zero exit, exactly one `error:` line
//! on stderr naming the problem, never a panic or a backtrace — for both
//! `hypura inspect FILE` and `hypura run FILE --prompt hi`.
//!
//! The files are made with the crate's own `GgufWriter`, then truncated or
//! patched at known byte offsets.

use std::path::{Path, PathBuf};
use std::process::Command;

use hypura::gguf::{GgmlType, GgufFile, GgufWriter};

/// Byte offsets in the fixed GGUF header.
const TENSOR_COUNT_AT: u64 = 8;
const KV_COUNT_AT: u64 = 16;
const HEADER_END: u64 = 24;

/// The name of the first tensor of every test file.
const FIRST_TENSOR: &str = "blk.0.ffn_up.weight";

/// Runs the real binary with `args`; returns (success, stderr).
fn hypura(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hypura"))
        .args(args)
        .env_remove("HYPURA_LOG")
        .env_remove("RUST_LOG")
        .output()
        .expect("failed to start the hypura binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that `hypura ARGS` fails with one clean error line containing every needle.
fn assert_clean_failure(args: &[&str], needles: &[&str]) {
    let (ok, stderr) = hypura(args);
    let shown = format!("`hypura {}` stderr:\n{stderr}", args.join(" "));
    assert!(!ok, "expected a non-zero exit; {shown}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one stderr line; {shown}");
    assert!(
        lines[0].starts_with("error:"),
        "expected the line to start with `error:`; {shown}"
    );
    let lower = stderr.to_lowercase();
    assert!(!lower.contains("panicked"), "panic; {shown}");
    assert!(!lower.contains("backtrace"), "backtrace text; {shown}");
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "expected {needle:?}; {shown}"
        );
    }
}

/// Both subcommands must reject `path` with a message containing the needles
/// (and the path itself).
fn assert_rejected(path: &Path, needles: &[&str]) {
    let p = path.to_str().expect("temp paths are UTF-8");
    let mut all = needles.to_vec();
    all.push(p);
    assert_clean_failure(&["inspect", p], &all);
    assert_clean_failure(&["run", p, "--prompt", "hi"], &all);
}

/// A valid file with metadata and two tensors; returns its path.
fn write_valid(dir: &Path, with_kvs: bool) -> PathBuf {
    let path = dir.join(if with_kvs { "model.gguf" } else { "bare.gguf" });
    let mut w = GgufWriter::new(&path);
    if with_kvs {
        w.add_kv("general.architecture", "llama").unwrap();
        w.add_kv("general.name", "bad-input fixture").unwrap();
        w.add_kv("llama.block_count", 1u32).unwrap();
        w.add_kv(
            "tokenizer.ggml.tokens",
            vec!["<unk>", "<s>", "</s>", "hello", "world"],
        )
        .unwrap();
    }
    w.add_tensor(FIRST_TENSOR, GgmlType::F32, &[64, 4]).unwrap();
    w.add_tensor("output_norm.weight", GgmlType::F32, &[64])
        .unwrap();
    w.write(|spec, out| out.write_all(&vec![0x3c; spec.size as usize]))
        .unwrap();
    GgufFile::open(&path).expect("the unpatched fixture must parse");
    path
}

/// Overwrites bytes at `at`.
fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    let at = at as usize;
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

/// Cuts the file to `len` bytes.
fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Field offsets of the first tensor info in a file without metadata:
/// (n_dims, type, offset).
fn first_info_fields() -> (u64, u64, u64) {
    let n_dims_at = HEADER_END + 8 + FIRST_TENSOR.len() as u64;
    let type_at = n_dims_at + 4 + 2 * 8;
    (n_dims_at, type_at, type_at + 4)
}

#[test]
fn path_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    assert_rejected(&dir.path().join("missing.gguf"), &["does not exist"]);
}

#[test]
fn path_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    assert_rejected(dir.path(), &["directory"]);
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gguf");
    std::fs::write(&path, b"").unwrap();
    assert_rejected(&path, &["empty"]);
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elf.gguf");
    let mut data = b"\x7fELF\x02\x01\x01\x00".to_vec();
    data.resize(4096, 0);
    std::fs::write(&path, data).unwrap();
    assert_rejected(&path, &["not a GGUF file", "0x464c457f"]);
}

#[test]
fn truncated_in_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), true);
    truncate(&path, 12);
    assert_rejected(&path, &["truncated in the header"]);
}

#[test]
fn truncated_in_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), true);
    // Inside the first key ("general.architecture").
    truncate(&path, HEADER_END + 8 + 5);
    assert_rejected(&path, &["truncated in the metadata"]);
}

#[test]
fn truncated_in_tensor_infos() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), false);
    let (_, type_at, _) = first_info_fields();
    // Inside the first tensor info, after its dims.
    truncate(&path, type_at + 2);
    assert_rejected(&path, &["truncated in tensor infos"]);
}

#[test]
fn truncated_in_tensor_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), true);
    let first = GgufFile::open(&path)
        .unwrap()
        .tensor(FIRST_TENSOR)
        .unwrap()
        .offset;
    truncate(&path, first + 100);
    assert_rejected(&path, &["truncated in tensor data", FIRST_TENSOR]);
}

#[test]
fn tensor_offset_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), false);
    let (_, _, offset_at) = first_info_fields();
    patch(&path, offset_at, &(1u64 << 30).to_le_bytes());
    assert_rejected(&path, &["past the end", FIRST_TENSOR]);
}

#[test]
fn absurd_tensor_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), true);
    patch(&path, TENSOR_COUNT_AT, &u64::MAX.to_le_bytes());
    assert_rejected(&path, &["tensor count 18446744073709551615 is absurd"]);
}

#[test]
fn absurd_kv_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), true);
    patch(&path, KV_COUNT_AT, &(1u64 << 40).to_le_bytes());
    assert_rejected(&path, &["key/value count", "is absurd"]);
}

#[test]
fn absurd_string_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), true);
    // The length prefix of the first metadata key.
    patch(&path, HEADER_END, &(u64::MAX / 3).to_le_bytes());
    assert_rejected(&path, &["length", "is absurd"]);
}

#[test]
fn bad_dimension_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), false);
    let (n_dims_at, _, _) = first_info_fields();
    patch(&path, n_dims_at, &7u32.to_le_bytes());
    assert_rejected(&path, &["7 dimensions", FIRST_TENSOR]);
}

#[test]
fn unknown_ggml_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), false);
    let (_, type_at, _) = first_info_fields();
    patch(&path, type_at, &99u32.to_le_bytes());
    assert_rejected(&path, &["unknown ggml type 99", FIRST_TENSOR]);
}
