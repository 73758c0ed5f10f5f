//! `hypura gen`: synthetic models parse with our reader, are deterministic per
//! seed, and load and run in llama.cpp (`hypura run`).

use std::path::{Path, PathBuf};

mod common;

use hypura::gguf::synth::{self, SynthArch, SynthConfig, SUPPORTED_TYPES};
use hypura::gguf::{GgufFile, MetaValue, TensorRole};

/// Runs the real binary; panics with its output unless it succeeds.
fn hypura(args: &[&str]) -> String {
    let out = common::hypura()
        .args(args)
        .output()
        .expect("failed to start the hypura binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`hypura {}` failed:\n{stderr}",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `hypura gen --arch ARCH --out DIR/NAME EXTRA...`; returns the path.
fn gen(dir: &Path, name: &str, arch: &str, extra: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().expect("temp paths are UTF-8");
    let mut args = vec!["gen", "--arch", arch, "--out", p];
    args.extend_from_slice(extra);
    let stdout = hypura(&args);
    assert!(stdout.contains("wrote"), "{stdout}");
    path
}

/// Asserts llama.cpp loads `path` and generates a few tokens greedily.
fn assert_runs(path: &Path) {
    let p = path.to_str().expect("temp paths are UTF-8");
    hypura(&[
        "run",
        p,
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        "--temp",
        "0",
    ]);
}

/// Tensors tile the data section exactly up to the end of the file.
fn assert_layout_reaches_eof(f: &GgufFile) {
    let mut sorted: Vec<_> = f.tensors.iter().collect();
    sorted.sort_by_key(|t| t.offset);
    let mut expected = f.data_offset;
    for t in sorted {
        assert_eq!(t.offset, expected, "{}", t.name);
        expected = (t.offset + t.size).div_ceil(f.alignment) * f.alignment;
    }
    assert_eq!(expected, f.file_size);
}

/// 64-bit FNV-1a of the file: a digest with no dependencies.
fn digest(path: &Path) -> u64 {
    std::fs::read(path)
        .expect("read generated file")
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

fn count_role(f: &GgufFile, role: TensorRole) -> usize {
    f.tensors.iter().filter(|t| t.role == role).count()
}

#[test]
fn dense_llama_parses_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = gen(
        dir.path(),
        "dense.gguf",
        "llama",
        &[
            "--layers", "3", "--embd", "256", "--ff", "512", "--vocab", "600",
        ],
    );
    let f = GgufFile::open(&path).unwrap();
    assert_layout_reaches_eof(&f);
    let p = f.arch_params();
    assert_eq!(p.arch, "llama");
    assert_eq!(
        (p.n_layer, p.n_embd, p.n_ff, p.vocab_size),
        (Some(3), Some(256), Some(512), Some(600))
    );
    assert_eq!(
        (p.n_head, p.n_head_kv, p.n_expert),
        (Some(4), Some(2), None)
    );
    assert_eq!(f.tensors.len(), 3 + 3 * 9);
    assert_eq!(count_role(&f, TensorRole::FfnUp), 3);
    assert_eq!(count_role(&f, TensorRole::Output), 1);
    let up = f.tensor("blk.2.ffn_up.weight").unwrap();
    assert_eq!(
        (up.dims.as_slice(), up.layer),
        ([256u64, 512].as_slice(), Some(2))
    );
    assert_eq!(
        f.get("tokenizer.ggml.model").and_then(MetaValue::as_str),
        Some("llama")
    );
    assert_eq!(
        planned(SynthArch::Llama, |c| (c.n_layer, c.n_ff, c.n_vocab) =
            (3, 512, 600)),
        f.file_size
    );
    assert_runs(&path);
}

/// The planned size of a default config changed by `edit`.
fn planned(arch: SynthArch, edit: impl FnOnce(&mut SynthConfig)) -> u64 {
    let mut c = SynthConfig::new(arch);
    edit(&mut c);
    synth::planned_size(&c).unwrap()
}

/// Generates an MoE model and checks its expert tensors.
fn check_moe(arch: &str, experts: u64, used: &str) {
    let dir = tempfile::tempdir().unwrap();
    let e = experts.to_string();
    let path = gen(
        dir.path(),
        "moe.gguf",
        arch,
        &[
            "--layers",
            "2",
            "--experts",
            &e,
            "--experts-used",
            used,
            "--ff-exp",
            "256",
            "--type",
            "q4_k",
        ],
    );
    let f = GgufFile::open(&path).unwrap();
    assert_layout_reaches_eof(&f);
    let p = f.arch_params();
    assert_eq!(
        (p.n_expert, p.n_expert_used.map(|u| u.to_string())),
        (Some(experts as u32), Some(used.to_string()))
    );
    for role in [
        TensorRole::FfnGateExps,
        TensorRole::FfnUpExps,
        TensorRole::FfnDownExps,
        TensorRole::Router,
    ] {
        assert_eq!(count_role(&f, role), 2, "{role}");
    }
    assert_eq!(count_role(&f, TensorRole::FfnUp), 0);
    let down = f.tensor("blk.1.ffn_down_exps.weight").unwrap();
    assert_eq!(down.dims, vec![256, 256, experts]);
    assert_eq!(down.n_experts(), Some(experts));
    let (start, len) = down.expert_range(experts - 1).unwrap();
    assert_eq!(start + len, down.offset + down.size);
    let router = f.tensor("blk.0.ffn_gate_inp.weight").unwrap();
    assert_eq!(
        (router.dims.as_slice(), router.ggml_type.name()),
        ([256, experts].as_slice(), "f32")
    );
    if arch == "qwen3moe" {
        assert_eq!(
            count_role(&f, TensorRole::Attention),
            2 * 6,
            "q, k, v, output, q_norm, k_norm"
        );
        assert_eq!(p.n_ff_exp, Some(256));
    }
    assert_runs(&path);
}

#[test]
fn qwen3moe_8_experts_top_2() {
    check_moe("qwen3moe", 8, "2");
}

#[test]
fn qwen3moe_64_experts_top_8() {
    check_moe("qwen3moe", 64, "8");
}

#[test]
fn mixtral_8_experts_top_2() {
    check_moe("mixtral", 8, "2");
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--layers", "2", "--seed", "7", "--type", "q4_k"];
    let a = digest(&gen(dir.path(), "a.gguf", "qwen3moe", &args));
    let b = digest(&gen(dir.path(), "b.gguf", "qwen3moe", &args));
    let c = digest(&gen(
        dir.path(),
        "c.gguf",
        "qwen3moe",
        &["--layers", "2", "--seed", "8", "--type", "q4_k"],
    ));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn every_supported_type_loads() {
    let dir = tempfile::tempdir().unwrap();
    for t in SUPPORTED_TYPES {
        let path = gen(
            dir.path(),
            &format!("{t}.gguf"),
            "llama",
            &["--layers", "2", "--type", t.name()],
        );
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(
            f.tensor("blk.0.attn_q.weight").map(|x| x.ggml_type),
            Some(t)
        );
        assert_runs(&path);
    }
}

#[test]
fn alignment_4096_and_target_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = gen(
        dir.path(),
        "a.gguf",
        "mixtral",
        &["--alignment", "4096", "--target-size", "12M"],
    );
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment, 4096);
    assert!(f.tensors.iter().all(|t| t.offset % 4096 == 0));
    assert_layout_reaches_eof(&f);
    assert!(f.file_size <= 12 << 20, "{} bytes", f.file_size);
    let layers = f.arch_params().n_layer.unwrap();
    let next = planned(SynthArch::Mixtral, |c| {
        (c.alignment, c.n_layer) = (4096, layers + 1)
    });
    assert!(next > 12 << 20, "{} layers would still fit", layers + 1);
    assert_runs(&path);
}

#[test]
fn invalid_shapes_are_rejected_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.gguf");
    for extra in [
        &["--embd", "100", "--heads", "3"][..],
        &["--vocab", "10"],
        &["--type", "q3_k"],
        &["--experts", "4"],
    ] {
        let mut args = vec!["gen", "--arch", "llama", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = common::hypura().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.starts_with("error: invalid synthetic model"),
            "{extra:?}: {stderr}"
        );
        assert!(!out.exists() && !dir.path().join("bad.gguf.partial").exists());
    }
}

/// The generator's output is pinned: a change here means every synthetic
/// model (and any result recorded against one) changes too. Update the digest
/// only for an intentional format change.
#[test]
fn output_is_pinned_for_a_fixed_seed() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--layers",
        "1",
        "--embd",
        "64",
        "--heads",
        "2",
        "--heads-kv",
        "1",
        "--experts",
        "4",
        "--ff-exp",
        "64",
        "--vocab",
        "300",
        "--seed",
        "42",
    ];
    let path = gen(dir.path(), "gold.gguf", "qwen3moe", &args);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 116_704);
    assert_eq!(digest(&path), 0x7249_a7df_af87_5539);
}
