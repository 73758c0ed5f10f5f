//! One-time llama.cpp initialisation and routing of its log into `tracing`.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use std::sync::{Mutex, Once};

use hypura_sys as sys;

static INIT: Once = Once::new();
/// The last error llama.cpp logged: attached to our own error messages so that
/// a failed load says why without dumping llama.cpp's log on the terminal.
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());
/// Longest llama.cpp error kept for a message, in characters.
const MAX_ERROR_CHARS: usize = 300;

/// Initialises llama.cpp's backends once per process (idempotent).
pub fn init() {
    INIT.call_once(|| {
        // SAFETY: called once, before any other llama.cpp call of this process;
        // the callback is a plain function valid for the program's lifetime.
        unsafe {
            sys::llama_log_set(Some(log_callback), std::ptr::null_mut());
            sys::ggml_log_set(Some(log_callback), std::ptr::null_mut());
            sys::ggml_backend_load_all();
            sys::llama_backend_init();
        }
    });
}

/// Takes (and clears) the last error llama.cpp logged.
pub fn take_last_error() -> Option<String> {
    let mut guard = LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    let msg = std::mem::take(&mut *guard);
    (!msg.is_empty()).then_some(msg)
}

unsafe extern "C" fn log_callback(
    level: sys::ggml_log_level,
    text: *const c_char,
    _user: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for this call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let line = text.trim_end();
    if line.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => {
            tracing::debug!(target: "llama", "{line}");
            let mut guard = LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner());
            let msg = line
                .trim_start_matches(|c: char| c.is_alphanumeric() || c == '_')
                .trim_start_matches(':')
                .trim();
            // It may quote the model file (a key, a token): one short line.
            *guard = msg
                .chars()
                .take(MAX_ERROR_CHARS)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            if msg.chars().nth(MAX_ERROR_CHARS).is_some() {
                guard.push_str("...");
            }
        }
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama", "{line}"),
        sys::GGML_LOG_LEVEL_INFO => tracing::info!(target: "llama", "{line}"),
        _ => tracing::debug!(target: "llama", "{line}"),
    }
}
