//! A loaded llama.cpp model: loading options, vocabulary, tokenisation and
//! chat templates.

use std::ffi::{c_void, CString};
use std::path::Path;
use std::ptr::NonNull;

use anyhow::{anyhow, bail, Context as _, Result};
use hypura_sys as sys;

use super::backend;

/// How llama.cpp reads the resident weights at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum LoadMode {
    /// llama.cpp's default (mmap where supported).
    Auto,
    /// Memory-map the file (populates the whole file).
    Mmap,
    /// Plain reads into allocated buffers.
    None,
    /// O_DIRECT reads into allocated buffers (no page cache).
    Dio,
}

impl LoadMode {
    fn to_sys(self) -> sys::llama_load_mode {
        match self {
            LoadMode::Auto => sys::LLAMA_LOAD_MODE_AUTO,
            LoadMode::Mmap => sys::LLAMA_LOAD_MODE_MMAP,
            LoadMode::None => sys::LLAMA_LOAD_MODE_NONE,
            LoadMode::Dio => sys::LLAMA_LOAD_MODE_DIRECT_IO,
        }
    }
}

/// Options for [`Model::load`].
pub struct LoadOptions<'a> {
    pub load_mode: LoadMode,
    /// ggml's CPU weight repacking (`use_extra_bufts`). Streamed tensors are
    /// never repacked, so comparisons between runs turn it off on both sides.
    pub repack: bool,
    /// Tensor-name regex → buffer type, in order (first match wins).
    pub buft_overrides: &'a [(String, sys::ggml_backend_buffer_type_t)],
    /// Called with the load progress in [0, 1].
    pub progress: Option<&'a mut dyn FnMut(f32)>,
    /// Repeating layers resident on the GPU (the last ones, then the output
    /// layer): 0 is CPU only, negative is all. Needs a GPU backend (built in,
    /// or loaded with GGML_BACKEND_DL); without one everything stays on the CPU.
    pub n_gpu_layers: i32,
    /// The devices llama.cpp splits the `n_gpu_layers` over, in order (empty:
    /// its default, every GPU). RPC devices for `--rpc`.
    pub devices: &'a [sys::ggml_backend_dev_t],
    /// Each device's share of those layers (empty: by free memory).
    pub tensor_split: &'a [f32],
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            load_mode: LoadMode::Auto,
            repack: true,
            buft_overrides: &[],
            progress: None,
            n_gpu_layers: 0,
            devices: &[],
            tensor_split: &[],
        }
    }
}

/// An owned `llama_model`.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: *const sys::llama_vocab,
}

// Neither Send nor Sync: the streaming engine rewrites the data pointers of
// the model's streamed tensors while a context computes, so a model is used
// from the thread that owns its [`super::Session`] only.

unsafe extern "C" fn progress_trampoline(p: f32, user: *mut c_void) -> bool {
    // SAFETY: `user` is the `&mut &mut dyn FnMut(f32)` passed by Model::load,
    // alive for the whole llama_model_load_from_file call.
    let f = unsafe { &mut *(user as *mut &mut dyn FnMut(f32)) };
    f(p);
    // A Ctrl-C during the load stops it (llama.cpp returns no model).
    !super::interrupt::requested()
}

impl Model {
    /// Loads `path` with llama.cpp. Validate the file with [`crate::gguf`] first:
    /// llama.cpp's own checks are less thorough and its errors less clear.
    pub fn load(path: &Path, mut opts: LoadOptions<'_>) -> Result<Model> {
        backend::init();
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| anyhow!("{}: path contains a NUL byte", path.display()))?;

        let patterns: Vec<CString> = opts
            .buft_overrides
            .iter()
            .map(|(p, _)| CString::new(p.as_str()).context("override pattern contains a NUL byte"))
            .collect::<Result<_>>()?;
        let mut overrides: Vec<sys::llama_model_tensor_buft_override> = patterns
            .iter()
            .zip(opts.buft_overrides)
            .map(|(p, (_, buft))| sys::llama_model_tensor_buft_override {
                pattern: p.as_ptr(),
                buft: *buft,
            })
            .collect();
        overrides.push(sys::llama_model_tensor_buft_override {
            pattern: std::ptr::null(),
            buft: std::ptr::null_mut(),
        });

        // SAFETY: plain constructor returning a struct by value.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.load_mode = opts.load_mode.to_sys();
        params.use_extra_bufts = opts.repack;
        params.n_gpu_layers = opts.n_gpu_layers;
        let mut devices: Vec<sys::ggml_backend_dev_t> = opts.devices.to_vec();
        if !devices.is_empty() {
            devices.push(std::ptr::null_mut());
            params.devices = devices.as_mut_ptr();
        }
        // SAFETY: a constant query.
        let max_devices = unsafe { sys::llama_max_devices() };
        if opts.tensor_split.len() > max_devices {
            bail!(
                "{} devices: llama.cpp takes at most {max_devices}",
                opts.tensor_split.len()
            );
        }
        let mut split = vec![0f32; max_devices];
        split[..opts.tensor_split.len()].copy_from_slice(opts.tensor_split);
        if !opts.tensor_split.is_empty() {
            params.tensor_split = split.as_ptr();
        }
        if opts.buft_overrides.is_empty() {
            params.tensor_buft_overrides = std::ptr::null();
        } else {
            params.tensor_buft_overrides = overrides.as_ptr();
        }
        let mut no_progress = |_: f32| {};
        let mut progress_ref: &mut dyn FnMut(f32) = match opts.progress.take() {
            Some(f) => f,
            None => &mut no_progress,
        };
        params.progress_callback = Some(progress_trampoline);
        params.progress_callback_user_data =
            &mut progress_ref as *mut &mut dyn FnMut(f32) as *mut c_void;

        backend::take_last_error();
        // SAFETY: `cpath`, `overrides` (and the patterns it points to),
        // `devices` (NULL-terminated), `split` (llama_max_devices() floats)
        // and the progress closure outlive the call (llama.cpp copies the
        // split); params is fully initialised.
        let raw = unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), params) };
        let _ = &mut progress_ref; // the closure must live until here
        let ptr = NonNull::new(raw).ok_or_else(|| {
            if super::interrupt::requested() {
                return anyhow!("{}: loading interrupted", path.display());
            }
            let why = backend::take_last_error()
                .unwrap_or_else(|| "unknown error (run with HYPURA_LOG=info)".into());
            anyhow!(
                "{}: llama.cpp could not load the model: {why}",
                path.display()
            )
        })?;
        // SAFETY: ptr is a valid model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        Ok(Model { ptr, vocab })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    pub(crate) fn vocab_ptr(&self) -> *const sys::llama_vocab {
        self.vocab
    }

    /// Whether tokenising with `add_special` puts a BOS token first.
    pub fn adds_bos(&self) -> bool {
        // SAFETY: live vocab.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab) }
    }

    /// The text of a special token (`<s>`, `<|im_end|>`, ...), empty for none.
    pub fn token_text(&self, token: i32) -> String {
        if token < 0 || token as usize >= self.n_vocab() {
            return String::new();
        }
        // SAFETY: live vocab, token in range; the result is a NUL-terminated
        // string owned by the vocabulary (or NULL).
        let p = unsafe { sys::llama_vocab_get_text(self.vocab, token) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: non-null NUL-terminated string, valid while the model lives.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    }

    /// The BOS and EOS tokens' texts (chat templates use them).
    pub fn bos_eos_text(&self) -> (String, String) {
        // SAFETY: live vocab.
        let (b, e) = unsafe {
            (
                sys::llama_vocab_bos(self.vocab),
                sys::llama_vocab_eos(self.vocab),
            )
        };
        (self.token_text(b), self.token_text(e))
    }

    /// Sliding-window attention size (0: none).
    pub fn n_swa(&self) -> u32 {
        // SAFETY: live model.
        unsafe { sys::llama_model_n_swa(self.ptr.as_ptr()) }.max(0) as u32
    }

    /// Vocabulary size (the length of a logits row).
    pub fn n_vocab(&self) -> usize {
        // SAFETY: vocab belongs to the live model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab) }.max(0) as usize
    }

    /// Training context length.
    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: live model.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) }.max(0) as u32
    }

    /// Whether `token` ends generation (EOS, EOT, ...).
    pub fn is_eog(&self, token: i32) -> bool {
        // SAFETY: live vocab; any token id is accepted.
        unsafe { sys::llama_vocab_is_eog(self.vocab, token) }
    }

    /// Tokenises `text`. `add_special` adds BOS (if the model wants it);
    /// `parse_special` turns special-token text (chat markup) into tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>> {
        let len = i32::try_from(text.len()).context("text too long to tokenize")?;
        let mut tokens = vec![0i32; text.len() + 2];
        for _ in 0..2 {
            // SAFETY: `text` is valid for `len` bytes, `tokens` for its length.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab,
                    text.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            if n == i32::MIN {
                bail!("tokenization overflowed");
            }
            tokens.resize((-n) as usize, 0);
        }
        bail!("tokenization failed")
    }

    /// The bytes of a token's text (special tokens render as nothing).
    pub fn token_bytes(&self, token: i32, out: &mut Vec<u8>) {
        let mut buf = [0u8; 256];
        // SAFETY: buf is valid for its length.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.vocab,
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                false,
            )
        };
        if n >= 0 {
            out.extend_from_slice(&buf[..n as usize]);
            return;
        }
        let mut big = vec![0u8; (-n) as usize];
        // SAFETY: big is valid for its length.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.vocab,
                token,
                big.as_mut_ptr().cast(),
                big.len() as i32,
                0,
                false,
            )
        };
        if n > 0 {
            out.extend_from_slice(&big[..n as usize]);
        }
    }

    /// The model's built-in chat template, if any.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: live model; NULL name asks for the default template.
        let p = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null NUL-terminated string owned by the model.
        Some(
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// Formats a conversation with `template` (`llama_chat_apply_template`).
    pub fn apply_chat_template(
        &self,
        template: &str,
        messages: &[(String, String)],
        add_assistant: bool,
    ) -> Result<String> {
        let tmpl = CString::new(template).context("chat template contains a NUL byte")?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|(r, c)| Ok((CString::new(r.as_str())?, CString::new(c.as_str())?)))
            .collect::<Result<_, std::ffi::NulError>>()
            .context("chat message contains a NUL byte")?;
        let msgs: Vec<sys::llama_chat_message> = owned
            .iter()
            .map(|(r, c)| sys::llama_chat_message {
                role: r.as_ptr(),
                content: c.as_ptr(),
            })
            .collect();
        let mut buf = vec![
            0u8;
            1024 + messages
                .iter()
                .map(|(r, c)| r.len() + c.len())
                .sum::<usize>()
                * 2
        ];
        for _ in 0..2 {
            // SAFETY: all pointers are valid for the call; buf for its length.
            let n = unsafe {
                sys::llama_chat_apply_template(
                    tmpl.as_ptr(),
                    msgs.as_ptr(),
                    msgs.len(),
                    add_assistant,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                )
            };
            if n < 0 {
                bail!("this model's chat template is not supported by llama.cpp");
            }
            if (n as usize) <= buf.len() {
                buf.truncate(n as usize);
                return String::from_utf8(buf).context("chat template produced invalid UTF-8");
            }
            buf.resize(n as usize, 0);
        }
        bail!("chat template formatting failed")
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the model; contexts borrow it and are dropped first.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}
