//! `llama_ref`: greedy generation through llama.cpp called directly (through
//! hypura-sys, no Hypura engine code), the reference that the GPU acceptance
//! test (scripts/gpu/run-tests.sh) compares `hypura run --gpu-layers` with.
//!
//! ```text
//! llama_ref MODEL PROMPT [--n N] [--ngl N|-1] [--ctx N] [--batch N] [--threads N]
//!           [--check HYPURA.logits] [--n-cpu-moe N]
//!
//! `--n-cpu-moe N` keeps the routed experts of the first N layers in CPU
//! memory, computed there (llama.cpp's `--n-cpu-moe`: a `tensor_buft_overrides`
//! regex to the CPU buffer type), the layout llama.cpp users run a MoE larger
//! than the GPU with.
//! ```
//!
//! Context parameters are llama.cpp's defaults except those `hypura run`
//! sets too (n_ctx, n_batch = n_ubatch, n_seq_max 1, threads); no threadpool
//! is attached. Timing is `hypura run`'s: generation tok/s = decodes of
//! generated tokens / time from the end of the prefill to the last token.
//! `--check` reads a `hypura run --logits-out` file and compares its argmax
//! per row (the greedy tokens) and its values with this run's. Prints one JSON
//! line on stdout; exit status 1 when `--check` finds a token mismatch.

use std::ffi::{c_char, c_void, CString};
use std::time::Instant;

use hypura_sys as sys;

unsafe extern "C" fn quiet_log(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if std::env::var_os("LLAMA_REF_LOG").is_some() || level == sys::GGML_LOG_LEVEL_ERROR {
        // SAFETY: llama.cpp passes a NUL-terminated string valid for the call.
        let s = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
        eprint!("{s}");
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn read_logits(path: &str) -> (usize, Vec<Vec<f32>>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(
        b.len() >= 24 && &b[..8] == b"HYPLOGIT",
        "{path}: not a HYPLOGIT file"
    );
    let vocab = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let rows = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
    let body = &b[24..];
    assert_eq!(body.len(), rows * vocab * 4, "{path}: truncated");
    let all: Vec<f32> = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (vocab, all.chunks(vocab).map(|r| r.to_vec()).collect())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: llama_ref MODEL PROMPT [--n N] [--ngl N] [--ctx N] [--batch N] [--threads N] [--check FILE]");
        std::process::exit(2);
    }
    let (model_path, prompt) = (&args[1], &args[2]);
    let mut n_gen = 64usize;
    let mut ngl = -1i32;
    let mut n_ctx = 4096u32;
    let mut n_batch = 512u32;
    let mut threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as i32;
    let mut check: Option<String> = None;
    let mut n_cpu_moe = 0usize;
    let mut i = 3;
    while i + 1 < args.len() {
        let v = &args[i + 1];
        match args[i].as_str() {
            "--n" => n_gen = v.parse().unwrap(),
            "--ngl" => ngl = v.parse().unwrap(),
            "--ctx" => n_ctx = v.parse().unwrap(),
            "--batch" => n_batch = v.parse().unwrap(),
            "--threads" => threads = v.parse().unwrap(),
            "--check" => check = Some(v.clone()),
            "--n-cpu-moe" => n_cpu_moe = v.parse().unwrap(),
            o => panic!("unknown option {o}"),
        }
        i += 2;
    }

    // SAFETY: plain llama.cpp C API use, single-threaded, every pointer
    // checked or owned for the duration of the calls that take it.
    unsafe {
        sys::llama_log_set(Some(quiet_log), std::ptr::null_mut());
        sys::ggml_log_set(Some(quiet_log), std::ptr::null_mut());
        sys::ggml_backend_load_all();
        sys::llama_backend_init();
        let mut devs = Vec::new();
        for d in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(d);
            devs.push(
                std::ffi::CStr::from_ptr(sys::ggml_backend_dev_name(dev))
                    .to_string_lossy()
                    .into_owned(),
            );
        }

        let t_load = Instant::now();
        let mut mp = sys::llama_model_default_params();
        mp.n_gpu_layers = ngl;
        // llama.cpp's --n-cpu-moe: blk.<i>.ffn_(up|down|gate|gate_up)_exps of
        // the first N layers in the CPU buffer type.
        let patterns: Vec<CString> = (0..n_cpu_moe)
            .map(|i| CString::new(format!("blk\\.{i}\\.ffn_(up|down|gate|gate_up)_exps")).unwrap())
            .collect();
        let cpu_dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
        let cpu_buft = sys::ggml_backend_dev_buffer_type(cpu_dev);
        let mut overrides: Vec<sys::llama_model_tensor_buft_override> = patterns
            .iter()
            .map(|p| sys::llama_model_tensor_buft_override {
                pattern: p.as_ptr(),
                buft: cpu_buft,
            })
            .collect();
        overrides.push(sys::llama_model_tensor_buft_override {
            pattern: std::ptr::null(),
            buft: std::ptr::null_mut(),
        });
        if n_cpu_moe > 0 {
            mp.tensor_buft_overrides = overrides.as_ptr();
        }
        let cpath = CString::new(model_path.as_str()).unwrap();
        let model = sys::llama_model_load_from_file(cpath.as_ptr(), mp);
        assert!(!model.is_null(), "could not load {model_path}");
        let vocab = sys::llama_model_get_vocab(model);
        let n_vocab = sys::llama_vocab_n_tokens(vocab) as usize;
        let n_ctx = n_ctx.min(sys::llama_model_n_ctx_train(model).max(1) as u32);

        let mut cp = sys::llama_context_default_params();
        cp.n_ctx = n_ctx;
        cp.n_batch = n_batch;
        cp.n_ubatch = n_batch;
        cp.n_seq_max = 1;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        cp.no_perf = true;
        let ctx = sys::llama_init_from_model(model, cp);
        assert!(!ctx.is_null(), "could not create a context");
        let load_secs = t_load.elapsed().as_secs_f64();

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
        assert!(n > 0, "tokenize failed ({n})");
        toks.truncate(n as usize);

        let t0 = Instant::now();
        for chunk in toks.chunks(n_batch as usize) {
            let mut c = chunk.to_vec();
            let rc = sys::llama_decode(
                ctx,
                sys::llama_batch_get_one(c.as_mut_ptr(), c.len() as i32),
            );
            assert_eq!(rc, 0, "prompt decode failed");
        }
        let prompt_secs = t0.elapsed().as_secs_f64();

        let mut out = Vec::new();
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let mut decodes = 0usize;
        let keep_rows = check.is_some();
        let t1 = Instant::now();
        let mut decode_secs = 0f64;
        for i in 0..n_gen {
            let p = sys::llama_get_logits_ith(ctx, -1);
            let logits = std::slice::from_raw_parts(p, n_vocab);
            if keep_rows {
                rows.push(logits.to_vec());
            }
            let tok = argmax(logits) as i32;
            if sys::llama_vocab_is_eog(vocab, tok) {
                break;
            }
            out.push(tok);
            if i + 1 < n_gen {
                let mut one = [tok];
                let td = Instant::now();
                let rc = sys::llama_decode(ctx, sys::llama_batch_get_one(one.as_mut_ptr(), 1));
                decode_secs += td.elapsed().as_secs_f64();
                assert_eq!(rc, 0, "decode failed");
                decodes += 1;
            }
        }
        let gen_secs = t1.elapsed().as_secs_f64();
        let gen_tps = decodes.max(1).min(out.len().max(1)) as f64 / gen_secs;

        let mut check_json = String::new();
        let mut ok = true;
        if let Some(path) = &check {
            let (v, theirs) = read_logits(path);
            assert_eq!(v, n_vocab, "vocabulary sizes differ");
            let n = theirs.len().min(rows.len());
            let mut first_mismatch: Option<usize> = None;
            let mut max_abs = 0f32;
            for r in 0..n {
                if first_mismatch.is_none() && argmax(&theirs[r]) != argmax(&rows[r]) {
                    first_mismatch = Some(r);
                }
                for (a, b) in theirs[r].iter().zip(&rows[r]) {
                    max_abs = max_abs.max((a - b).abs());
                }
            }
            ok = first_mismatch.is_none() && theirs.len() == rows.len();
            check_json = format!(
                ",\"check\":{{\"rows_ref\":{},\"rows_hypura\":{},\"tokens_match\":{},\"first_mismatch\":{},\"max_abs_logit_diff\":{}}}",
                rows.len(),
                theirs.len(),
                ok,
                first_mismatch.map_or("null".to_string(), |m| m.to_string()),
                max_abs
            );
        }
        println!(
            "{{\"devices\":{:?},\"ngl\":{},\"decode_ms_per_token\":{:.4},\"load_secs\":{:.3},\"prompt_tokens\":{},\"prompt_tps\":{:.2},\"gen_tokens\":{},\"gen_tps\":{:.3},\"tokens\":{:?}{}}}",
            devs,
            ngl,
            decode_secs * 1e3 / decodes.max(1) as f64,
            load_secs,
            toks.len(),
            toks.len() as f64 / prompt_secs,
            out.len(),
            gen_tps,
            out,
            check_json
        );
        sys::llama_free(ctx);
        sys::llama_model_free(model);
        if !ok {
            std::process::exit(1);
        }
    }
}
