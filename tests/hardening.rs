//! Inputs that must never panic or abort: every count from a file or a flag
//! is checked against what it can mean, and every metadata value llama.cpp
//! would abort the process on (`GGML_ASSERT`, SIGABRT) is refused by
//! Hypura's own GGUF layer first. Each failure is one `error:` line naming
//! the file (and the key or tensor), exit code 1, for `inspect` and `run`.

use std::path::{Path, PathBuf};
use std::process::Output;

use hypura::gguf::synth::{generate, SynthArch, SynthConfig};
use hypura::gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};

mod common;
use common::hypura;

/// A small synthetic model of `arch` in `dir`.
fn synth(dir: &Path, arch: SynthArch) -> PathBuf {
    let path = dir.join(format!("{arch:?}.gguf").to_lowercase());
    let mut cfg = SynthConfig::new(arch);
    cfg.n_embd = 128;
    cfg.n_ff = 256;
    cfg.n_ff_exp = 128;
    cfg.n_vocab = 512;
    generate(&cfg, &path, &mut |_, _| {}).unwrap();
    path
}

/// A tensor as [`rewrite`] edits it.
type Tensor = (String, GgmlType, Vec<u64>);

/// Writes `src` again as `name` in the same directory, with its metadata
/// and tensor infos edited; tensor data is copied by position (cut or
/// zero-padded to the new size).
fn rewrite(
    src: &Path,
    name: &str,
    meta: impl FnOnce(&mut Vec<(String, MetaValue)>),
    tensors: impl FnOnce(&mut Vec<Tensor>),
) -> PathBuf {
    let g = GgufFile::open(src).unwrap();
    let data = std::fs::read(src).unwrap();
    let mut kvs = g.metadata.clone();
    meta(&mut kvs);
    let mut ts: Vec<Tensor> = g
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.ggml_type, t.dims.clone()))
        .collect();
    tensors(&mut ts);
    let dst = src.with_file_name(name);
    let mut w = GgufWriter::new(&dst);
    for (k, v) in kvs {
        w.add_kv(&k, v).unwrap();
    }
    for (n, t, d) in &ts {
        w.add_tensor(n, *t, d).unwrap();
    }
    let mut i = 0;
    w.write(|spec, out| {
        let mut bytes = g.tensors.get(i).map_or(&[][..], |t| {
            &data[t.offset as usize..(t.offset + t.size) as usize]
        });
        i += 1;
        bytes = &bytes[..bytes.len().min(spec.size as usize)];
        out.write_all(bytes)?;
        out.write_all(&vec![0u8; spec.size as usize - bytes.len()])
    })
    .unwrap();
    dst
}

/// Sets metadata `key` (added if absent).
fn set(kvs: &mut Vec<(String, MetaValue)>, key: &str, v: impl Into<MetaValue>) {
    let v = v.into();
    match kvs.iter_mut().find(|(k, _)| k == key) {
        Some(kv) => kv.1 = v,
        None => kvs.push((key.to_string(), v)),
    }
}

/// `hypura run` of `p` with `extra`; 2 tokens and 1 thread unless `extra`
/// says otherwise.
fn run_args<'a>(p: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", p, "--prompt", "hello", "--temp", "0"];
    if !extra.contains(&"-n") {
        a.extend(["-n", "2"]);
    }
    if !extra.contains(&"--threads") {
        a.extend(["--threads", "1"]);
    }
    a.extend_from_slice(extra);
    a
}

fn exec(args: &[&str]) -> Output {
    hypura().args(args).output().expect("hypura runs")
}

/// Exit code 1 (no signal), exactly one stderr line `error: ...` holding
/// every needle; returns the line.
fn clean_failure(args: &[&str], needles: &[&str]) -> String {
    let o = exec(args);
    let err = String::from_utf8_lossy(&o.stderr);
    let shown = format!("`hypura {}`: {:?}\n{err}", args.join(" "), o.status);
    assert_eq!(o.status.code(), Some(1), "{shown}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one stderr line expected; {shown}");
    assert!(lines[0].starts_with("error: "), "{shown}");
    assert!(lines[0].len() < 1000, "a long error line; {shown}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing; {shown}");
    }
    lines[0].to_string()
}

/// `inspect` and `run` both refuse `path` with the needles and the path.
fn refused(path: &Path, needles: &[&str]) {
    let p = path.to_str().unwrap();
    let mut all = needles.to_vec();
    all.push(p);
    clean_failure(&["inspect", p], &all);
    clean_failure(&run_args(p, &[]), &all);
}

#[test]
fn layer_indices_past_the_block_count_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), SynthArch::Llama);
    for (file, layer) in [("huge.gguf", "4294967295"), ("next.gguf", "4")] {
        let name = format!("blk.{layer}.ffn_up.weight");
        let p = rewrite(
            &m,
            file,
            |_| {},
            |ts| {
                let t = ts
                    .iter_mut()
                    .find(|t| t.0 == "blk.0.ffn_up.weight")
                    .unwrap();
                t.0 = name.clone();
            },
        );
        refused(&p, &[&name, "llama.block_count is 4"]);
    }
    // Without a block count, a layer past llama.cpp's 512 is refused too.
    let p = rewrite(
        &m,
        "nocount.gguf",
        |kvs| kvs.retain(|(k, _)| k != "llama.block_count"),
        |ts| ts[1].0 = "blk.512.attn_norm.weight".into(),
    );
    clean_failure(&["inspect", p.to_str().unwrap()], &["at most 512 layers"]);
}

/// (file name, edit, needles) for a metadata edit of a synthetic model.
type MetaCase = (
    &'static str,
    fn(&mut Vec<(String, MetaValue)>),
    &'static [&'static str],
);

#[test]
fn hyper_parameters_llama_cpp_aborts_on_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let llama = synth(dir.path(), SynthArch::Llama);
    let moe = synth(dir.path(), SynthArch::Qwen3Moe);
    let dense: &[MetaCase] = &[
        (
            "bc0.gguf",
            |k| set(k, "llama.block_count", 0u32),
            &["llama.block_count 0 is out of range (1 to 512)"],
        ),
        (
            "bc513.gguf",
            |k| set(k, "llama.block_count", 513u32),
            &["llama.block_count 513"],
        ),
        (
            "bcstr.gguf",
            |k| set(k, "llama.block_count", "four"),
            &["llama.block_count must be a non-negative integer"],
        ),
        (
            "kv3.gguf",
            |k| set(k, "llama.attention.head_count_kv", 3u32),
            &["head_count_kv 3 must divide", "head_count 4"],
        ),
        (
            "kv0.gguf",
            |k| set(k, "llama.attention.head_count_kv", 0u32),
            &["head_count_kv 0 must divide"],
        ),
        (
            "kvlayer.gguf",
            |k| set(k, "llama.attention.head_count_kv", vec![2u32, 2, 3, 2]),
            &["head_count_kv 3", "(layer 2)"],
        ),
        (
            "kvlen.gguf",
            |k| set(k, "llama.attention.head_count_kv", vec![2u32, 2]),
            &["2 entries, one per layer needs 4"],
        ),
        (
            "h0.gguf",
            |k| set(k, "llama.attention.head_count", 0u32),
            &["llama.attention.head_count is 0"],
        ),
        (
            "epsnan.gguf",
            |k| set(k, "llama.attention.layer_norm_rms_epsilon", f32::NAN),
            &["layer_norm_rms_epsilon NaN must be a finite number"],
        ),
        (
            "epsneg.gguf",
            |k| set(k, "llama.attention.layer_norm_rms_epsilon", -1f32),
            &["layer_norm_rms_epsilon -1"],
        ),
        (
            "rope.gguf",
            |k| set(k, "llama.rope.scaling.type", "sideways"),
            &["llama.rope.scaling.type 'sideways' is not one of none, linear, yarn, longrope"],
        ),
        (
            "ropedim.gguf",
            |k| set(k, "llama.rope.dimension_count", 33u32),
            &["rope.dimension_count 33 must be even"],
        ),
        (
            "nextn.gguf",
            |k| set(k, "llama.nextn_predict_layers", 5u32),
            &["nextn_predict_layers 5 is more than llama.block_count 4"],
        ),
        (
            "embd.gguf",
            |k| set(k, "llama.embedding_length", 64u32),
            &[
                "tensor 'token_embd.weight' has shape [128, 512]",
                "needs [64, 512]",
            ],
        ),
        (
            "ff.gguf",
            |k| set(k, "llama.feed_forward_length", 512u32),
            &[
                "tensor 'blk.0.ffn_gate.weight' has shape [128, 256]",
                "[128, 512]",
            ],
        ),
        (
            "heads.gguf",
            |k| set(k, "llama.attention.head_count", 8u32),
            &[
                "tensor 'blk.0.attn_k.weight' has shape [128, 64]",
                "needs [128, 32]",
            ],
        ),
        (
            "nottext.gguf",
            |k| set(k, "general.architecture", 7u32),
            &["general.architecture must be a string"],
        ),
        (
            "notoks.gguf",
            |k| set(k, "tokenizer.ggml.tokens", MetaArray::String(Vec::new())),
            &["tokenizer.ggml.tokens has 0 tokens"],
        ),
        (
            "oneless.gguf",
            |k| {
                let Some((_, MetaValue::Array(MetaArray::String(t)))) =
                    k.iter_mut().find(|(n, _)| n == "tokenizer.ggml.tokens")
                else {
                    panic!()
                };
                t.pop();
            },
            &[
                "tensor 'token_embd.weight' has shape [128, 512]",
                "needs [128, 511]",
            ],
        ),
        (
            "duptok.gguf",
            |k| {
                let Some((_, MetaValue::Array(MetaArray::String(t)))) =
                    k.iter_mut().find(|(n, _)| n == "tokenizer.ggml.tokens")
                else {
                    panic!()
                };
                t[300] = t[299].clone();
            },
            &["tokenizer.ggml.tokens has token", "twice (ids 299 and 300)"],
        ),
        (
            "shortscores.gguf",
            |k| set(k, "tokenizer.ggml.scores", vec![0f32; 10]),
            &["tokenizer.ggml.scores has 10 entries, fewer than the 512 tokens"],
        ),
    ];
    for (name, edit, needles) in dense {
        refused(&rewrite(&llama, name, edit, |_| {}), needles);
    }
    let experts: &[MetaCase] = &[
        (
            "used9.gguf",
            |k| set(k, "qwen3moe.expert_used_count", 9u32),
            &["qwen3moe.expert_used_count 9 is more than qwen3moe.expert_count 8"],
        ),
        (
            "used0.gguf",
            |k| set(k, "qwen3moe.expert_used_count", 0u32),
            &["qwen3moe.expert_used_count is 0, but qwen3moe.expert_count is 8"],
        ),
        (
            "count0.gguf",
            |k| set(k, "qwen3moe.expert_count", 0u32),
            &["expert_used_count 2 is more than qwen3moe.expert_count 0"],
        ),
        (
            "count2k.gguf",
            |k| set(k, "qwen3moe.expert_count", 2000u32),
            &["qwen3moe.expert_count 2000 is more than 1024"],
        ),
        (
            "nocount.gguf",
            |k| k.retain(|(n, _)| !n.starts_with("qwen3moe.expert_")),
            &["tensor 'blk.0.ffn_gate_exps.weight' holds routed experts, but qwen3moe.expert_count is 0 or absent"],
        ),
        (
            "groups.gguf",
            |k| set(k, "qwen3moe.expert_group_count", 3u32),
            &["qwen3moe.expert_count 8 is not a multiple of qwen3moe.expert_group_count 3"],
        ),
        (
            "gused.gguf",
            |k| {
                set(k, "qwen3moe.expert_group_count", 4u32);
                set(k, "qwen3moe.expert_group_used_count", 4u32);
            },
            &["expert_group_used_count 4 must be 1 to 3"],
        ),
        (
            "ffexp.gguf",
            |k| set(k, "qwen3moe.expert_feed_forward_length", 64u32),
            &[
                "tensor 'blk.0.ffn_gate_exps.weight' has shape [128, 128, 8]",
                "[128, 64, 8]",
            ],
        ),
    ];
    for (name, edit, needles) in experts {
        refused(&rewrite(&moe, name, edit, |_| {}), needles);
    }
    // Tensor types the graph cannot compute with.
    let p = rewrite(&llama, "normf16.gguf", |_| {}, |ts| ts[1].1 = GgmlType::F16);
    refused(
        &p,
        &["tensor 'blk.0.attn_norm.weight' is a vector (a norm or a bias) of type f16; vectors must be f32"],
    );
    let p = rewrite(
        &llama,
        "i32bias.gguf",
        |_| {},
        |ts| {
            ts.push(("blk.0.attn_q.bias".into(), GgmlType::I32, vec![128]));
        },
    );
    refused(
        &p,
        &["tensor 'blk.0.attn_q.bias' is a vector (a norm or a bias) of type i32"],
    );
    let p = rewrite(
        &llama,
        "i32.gguf",
        |_| {},
        |ts| {
            let t = ts
                .iter_mut()
                .find(|t| t.0 == "blk.1.attn_q.weight")
                .unwrap();
            t.1 = GgmlType::I32;
        },
    );
    refused(
        &p,
        &["tensor 'blk.1.attn_q.weight' has type i32, which ggml cannot compute with"],
    );
}

/// Overwrites the value of u32 metadata `key` in place (the file's layout
/// stays as it is, as a disk or transfer error would leave it).
fn patch_u32(path: &Path, key: &str, v: u32) {
    let mut data = std::fs::read(path).unwrap();
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = data
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("key present")
        + needle.len();
    assert_eq!(data[at..at + 4], 4u32.to_le_bytes(), "{key} is a u32");
    data[at + 4..at + 8].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, data).unwrap();
}

#[test]
fn the_real_model_with_a_mutated_block_count_is_an_error_not_sigabrt() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("smol.gguf");
    for (v, needle) in [
        (0, "llama.block_count 0 is out of range"),
        (4096, "llama.block_count 4096"),
    ] {
        std::fs::copy(&m, &p).unwrap();
        patch_u32(&p, "llama.block_count", v);
        refused(&p, &[needle]);
    }
}

#[test]
fn a_mutated_key_length_gives_a_short_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), SynthArch::Llama);
    let mut data = std::fs::read(&m).unwrap();
    // The first key's length prefix (after magic, version and the two counts):
    // 512 KiB, so the key swallows the metadata after it.
    data[24..32].copy_from_slice(&(512u64 << 10).to_le_bytes());
    let p = dir.path().join("longkey.gguf");
    std::fs::write(&p, &data).unwrap();
    let line = clean_failure(
        &["inspect", p.to_str().unwrap()],
        &["metadata key #0", "is absurd"],
    );
    assert!(line.len() < 300, "{line}");
    // 60 KiB fits under the key limit: the key is read, and quoted short.
    data[24..32].copy_from_slice(&(60u64 << 10).to_le_bytes());
    std::fs::write(&p, &data).unwrap();
    let line = clean_failure(&["inspect", p.to_str().unwrap()], &["bytes, ", "shown)"]);
    assert!(line.len() < 400, "{line}");
}

#[test]
fn max_tokens_of_u64_max_stops_at_the_context() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let o = exec(&run_args(
        m.to_str().unwrap(),
        &[
            "-n",
            "18446744073709551615",
            "--ctx",
            "64",
            "--json",
            "--threads",
            "2",
        ],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let r = common::report(&err);
    let (prompt, gen) = (
        r["prompt_tokens"].as_u64().unwrap(),
        r["gen_tokens"].as_u64().unwrap(),
    );
    // llama.cpp rounds the context up to a multiple of 256 tokens.
    assert!(
        gen >= 1 && prompt + gen <= 256,
        "prompt {prompt} + generated {gen} > the context of --ctx 64 (256)"
    );
}

#[test]
fn flags_at_their_extremes_are_refused_or_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), SynthArch::Llama);
    let p = m.to_str().unwrap();
    let refused_flags: &[(&[&str], &str)] = &[
        (
            &["--lookahead", "4294967295"],
            "--lookahead 4294967295 is more than the model's 4 layers",
        ),
        (
            &["--lookahead", "18446744073709551615", "--mode", "dense"],
            "is more than the model's 4 layers",
        ),
        (&["--threads", "0"], "--threads must be at least 1"),
        (
            &["--threads", "513"],
            "--threads 513 is too large (at most 512",
        ),
        (&["--threads", "18446744073709551615"], "too large"),
        (&["--ctx", "0"], "--ctx must be at least 1"),
        (&["--ctx", "4294967295"], "--ctx 4294967295 is too large"),
        (&["--ctx", "1073741824"], "needs a KV cache of about"),
        (&["--batch", "0"], "--batch must be at least 1"),
        (&["-n", "0"], "--max-tokens must be at least 1"),
    ];
    for (flags, needle) in refused_flags {
        let t0 = std::time::Instant::now();
        clean_failure(&run_args(p, flags), &[needle]);
        assert!(
            t0.elapsed().as_secs() < 30,
            "{flags:?} took {:?}",
            t0.elapsed()
        );
    }
    let out = dir.path().join("bench-out");
    let out = out.to_str().unwrap();
    for (flag, v, needle) in [
        (
            "--prompt-tokens",
            "18446744073709551615",
            "--prompt-tokens 18446744073709551615 is too large (at most 32768)",
        ),
        (
            "--gen-tokens",
            "18446744073709551615",
            "--gen-tokens 18446744073709551615 is too large",
        ),
        (
            "--repeat",
            "18446744073709551615",
            "--repeat 18446744073709551615 is too large",
        ),
        (
            "--warmup",
            "18446744073709551615",
            "--warmup 18446744073709551615 is too large",
        ),
    ] {
        clean_failure(&["bench", p, "--out", out, flag, v], &[needle]);
    }
    // Bounded: a batch above the context is the context; more threads than
    // CPUs are the CPUs (with a warning), lookahead up to the layer count.
    // A penalty window past the context is the context (llama.cpp allocates
    // it up front: 2^31 tokens took 8 GiB and a minute and a half).
    for flags in [
        &["--batch", "4294967295"][..],
        &["--threads", "512"],
        &["--lookahead", "4", "--mode", "dense", "--ram-budget", "2M"],
        &["--repeat-last-n", "2147483647", "--repeat-penalty", "1.1"],
    ] {
        let t0 = std::time::Instant::now();
        let o = exec(&run_args(p, &[flags, &["--json"]].concat()));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{flags:?}: {err}");
        let rss = common::report(&err)["peak_rss_bytes"].as_u64().unwrap();
        assert!(rss < 1 << 30, "{flags:?}: peak RSS {rss}");
        assert!(
            t0.elapsed().as_secs() < 30,
            "{flags:?} took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn an_io_thread_that_cannot_start_is_an_error() {
    use hypura::io::{open_reader, Backend, IoOptions};
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), SynthArch::Llama);
    let uring = "cannot start the io_uring driver thread";
    let pread = "cannot start pread worker";
    for (backend, needles) in [
        (Backend::Uring, &[uring, "io_uring unavailable"][..]),
        // Where the kernel refuses io_uring, auto falls back to the pool.
        (Backend::Auto, &[uring, pread]),
        (Backend::Pread, &[pread]),
    ] {
        let mut o = IoOptions {
            backend,
            direct: false,
            ..IoOptions::default()
        };
        o.simulate.thread_spawn_fails = true;
        let e = open_reader(&m, &o)
            .err()
            .expect("a reader without its thread");
        let shown = e.to_string();
        assert!(
            needles.iter().any(|n| shown.contains(n)),
            "{backend:?}: {shown}"
        );
        // The same options without the failure work.
        o.simulate.thread_spawn_fails = false;
        if backend != Backend::Uring || shown.contains(uring) {
            open_reader(&m, &o).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
        }
    }
}

#[test]
fn mutated_files_through_the_binary_exit_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut seeds = vec![
        synth(dir.path(), SynthArch::Llama),
        synth(dir.path(), SynthArch::Qwen3Moe),
    ];
    seeds.extend(common::model(common::SMOLLM2));
    let cases = 24;
    let (mut ok, mut failed) = (0, 0);
    for case in 0..cases {
        let src = &seeds[case % seeds.len()];
        let header = GgufFile::open(src).unwrap().data_offset as usize;
        let mut data = std::fs::read(src).unwrap();
        let mut rng = hypura::util::rng::Rng::for_stream(0x4841_5244, case as u64);
        for _ in 0..1 + rng.next_u64() % 3 {
            let at = (rng.next_u64() % header as u64) as usize & !3;
            match rng.next_u64() % 3 {
                0 => data[at] ^= 1 << (rng.next_u64() % 8),
                1 => data[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes()),
                _ => data[at..at + 4].copy_from_slice(&0u32.to_le_bytes()),
            }
        }
        let p = dir.path().join(format!("mutated-{case}.gguf"));
        std::fs::write(&p, &data).unwrap();
        let ps = p.to_str().unwrap();
        for args in [vec!["inspect", ps], run_args(ps, &[])] {
            let o = exec(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            match o.status.code() {
                Some(0) => ok += 1,
                Some(1) => {
                    failed += 1;
                    assert!(
                        lines.len() == 1
                            && lines[0].starts_with("error: ")
                            && lines[0].contains(ps),
                        "case {case} {args:?}: {err}"
                    );
                }
                _ => panic!("case {case} {args:?}: {:?} (a signal?)\n{err}", o.status),
            }
        }
        std::fs::remove_file(&p).unwrap();
    }
    eprintln!("{cases} mutated files, inspect and run: {ok} succeeded, {failed} failed cleanly");
}

/// An EIO injected into a streamed read mid-generation (the hidden
/// `HYPURA_FAULT`, see `io::fault`): exit code 1, an error naming the file
/// and the offset, and what was printed is a prefix of the fault-free text
/// (no token after the fault).
#[test]
fn a_read_fault_mid_run_stops_it_cleanly() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let p = m.to_str().unwrap();
    let mut args = vec![
        "run",
        p,
        "--prompt",
        "The capital of France is",
        "--temp",
        "0",
    ];
    args.extend([
        "-n",
        "24",
        "--ram-budget",
        "60M",
        "--ctx",
        "512",
        "--threads",
        "1",
    ]);
    let good = exec(&args);
    assert!(good.status.success(), "{good:?}");
    let o = hypura()
        .args(&args)
        .env("HYPURA_FAULT", "eio@300")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).expect(&err);
    assert!(
        line.contains("EIO") && line.contains(p) && line.contains("at offset "),
        "{line}"
    );
    let (out, good_out) = (o.stdout, good.stdout);
    assert!(
        out.len() < good_out.len() && good_out.starts_with(&out),
        "{out:?}"
    );
}
