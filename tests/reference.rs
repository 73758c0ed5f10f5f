//! `hypura run` against llama.cpp called directly through llama-cpp-sys-2
//! with default loading (no Hypura code on the reference side): the greedy
//! tokens of 32 steps are equal and the first step's logits are bit-identical.

mod common;

use std::ffi::CString;
use std::path::Path;

use hypura::engine::logits::Logits;
use hypura_sys as sys;

const THREADS: i32 = 2;
const N_CTX: u32 = 4096;
const STEPS: usize = 32;
const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
];

struct Reference {
    tokens: Vec<i32>,
    first_logits: Vec<f32>,
}

/// Greedy generation with plain llama.cpp calls (default model params).
fn reference_run(path: &Path, prompt: &str) -> Reference {
    unsafe extern "C" fn quiet(
        _: sys::ggml_log_level,
        _: *const std::os::raw::c_char,
        _: *mut std::os::raw::c_void,
    ) {
    }
    unsafe {
        sys::llama_log_set(Some(quiet), std::ptr::null_mut());
        sys::ggml_log_set(Some(quiet), std::ptr::null_mut());
        sys::ggml_backend_load_all();
        sys::llama_backend_init();
        let cpath = CString::new(path.to_str().unwrap()).unwrap();
        let mut mp = sys::llama_model_default_params();
        mp.n_gpu_layers = 0;
        let model = sys::llama_model_load_from_file(cpath.as_ptr(), mp);
        assert!(!model.is_null(), "reference load failed");
        let vocab = sys::llama_model_get_vocab(model);
        let n_vocab = sys::llama_vocab_n_tokens(vocab) as usize;
        let mut cp = sys::llama_context_default_params();
        cp.n_ctx = N_CTX;
        cp.n_batch = 512;
        cp.n_ubatch = 512;
        cp.n_threads = THREADS;
        cp.n_threads_batch = THREADS;
        let ctx = sys::llama_init_from_model(model, cp);
        assert!(!ctx.is_null());

        let mut toks = vec![0i32; prompt.len() + 8];
        let n = sys::llama_tokenize(
            vocab,
            prompt.as_ptr().cast(),
            prompt.len() as i32,
            toks.as_mut_ptr(),
            toks.len() as i32,
            true,
            false,
        );
        assert!(n > 0);
        toks.truncate(n as usize);
        assert_eq!(
            sys::llama_decode(ctx, sys::llama_batch_get_one(toks.as_mut_ptr(), n)),
            0
        );

        let mut out = Vec::new();
        let mut first_logits = Vec::new();
        for step in 0..STEPS {
            let l = std::slice::from_raw_parts(sys::llama_get_logits_ith(ctx, -1), n_vocab);
            if step == 0 {
                first_logits = l.to_vec();
            }
            let mut best = 0usize;
            for i in 1..n_vocab {
                if l[i] > l[best] {
                    best = i;
                }
            }
            let mut tok = best as i32;
            if sys::llama_vocab_is_eog(vocab, tok) {
                break;
            }
            out.push(tok);
            if step + 1 < STEPS {
                assert_eq!(
                    sys::llama_decode(ctx, sys::llama_batch_get_one(&mut tok, 1)),
                    0
                );
            }
        }
        sys::llama_free(ctx);
        sys::llama_model_free(model);
        Reference {
            tokens: out,
            first_logits,
        }
    }
}

fn hypura_run(path: &Path, prompt: &str, out: &Path) -> Logits {
    let o = common::hypura()
        .args([
            "run",
            path.to_str().unwrap(),
            "--prompt",
            prompt,
            "--temp",
            "0",
        ])
        .args([
            "--max-tokens",
            &STEPS.to_string(),
            "--threads",
            &THREADS.to_string(),
            "--ctx",
            &N_CTX.to_string(),
        ])
        .arg("--logits-out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "hypura run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Logits::read(out).unwrap()
}

fn check_model(file: &str) {
    let Some(path) = common::model(file) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let reference = reference_run(&path, prompt);
        let got = hypura_run(&path, prompt, &dir.path().join(format!("{i}.logits")));
        // Rows are the positions sampled from; a stop at EOG leaves one more
        // row than tokens (the EOG row itself).
        let mut tokens = got.argmax_tokens();
        tokens.truncate(reference.tokens.len());
        assert_eq!(
            tokens, reference.tokens,
            "{file}: greedy tokens differ for prompt {i}"
        );
        assert!(
            !reference.tokens.is_empty(),
            "{file}: reference generated nothing for prompt {i}"
        );
        let first = &got.rows[0];
        assert_eq!(first.len(), reference.first_logits.len());
        let same = first
            .iter()
            .zip(&reference.first_logits)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{file}: first-step logits are not bit-identical for prompt {i}"
        );
    }
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_model(common::SMOLLM2);
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_model(common::GEMMA3);
}
