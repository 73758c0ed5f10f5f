//! FFI for Hypura: the llama.cpp/ggml bindings of `llama-cpp-sys-2` (pinned
//! `=0.1.161`, re-exported whole) plus Hypura's custom ggml buffer type,
//! implemented in C in `shim/hypura_shim.c` because a ggml buffer type is a
//! vtable declared in ggml's private `ggml-backend-impl.h`.
//!
//! Everything here is raw FFI; the safe wrappers live in the engine glue.

#![allow(non_camel_case_types)]

pub use llama_cpp_sys_2::*;

use std::os::raw::{c_char, c_int, c_void};

/// Called from the buffer's `init_tensor` for every tensor placed in a Hypura
/// buffer: `(user, tensor, name, data, nbytes)`. Runs on the loading thread.
pub type hypura_tensor_cb = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        tensor: *mut ggml_tensor,
        name: *const c_char,
        data: *mut c_void,
        nbytes: usize,
    ),
>;

extern "C" {
    /// Creates a Hypura buffer type on `device` (the CPU device for host compute).
    /// Buffers reserve address space with `MAP_NORESERVE`; `set_tensor`,
    /// `memset_tensor` and `clear` are no-ops; `is_host` is true.
    pub fn hypura_buft_new(
        name: *const c_char,
        device: ggml_backend_dev_t,
        cb: hypura_tensor_cb,
        user: *mut c_void,
    ) -> ggml_backend_buffer_type_t;
    /// When non-zero, `init_tensor` hides each tensor's name (a `\x01` prefix)
    /// so llama.cpp's loader treats it as absent and never reads its bytes.
    pub fn hypura_buft_set_hide_names(buft: ggml_backend_buffer_type_t, hide: c_int);
    /// Address space reserved by the live buffers of this type, in bytes.
    pub fn hypura_buft_reserved_bytes(buft: ggml_backend_buffer_type_t) -> usize;
    /// Number of live buffers of this type.
    pub fn hypura_buft_live_buffers(buft: ggml_backend_buffer_type_t) -> usize;
    /// Whether `buft` is a Hypura buffer type.
    pub fn hypura_buft_is_ours(buft: ggml_backend_buffer_type_t) -> c_int;
    /// Frees the buffer type. Every buffer of it must have been freed first.
    pub fn hypura_buft_free(buft: ggml_backend_buffer_type_t);
    /// Whether the tensor's name is currently hidden from the loader.
    pub fn hypura_tensor_is_hidden(tensor: *const ggml_tensor) -> c_int;
    /// Sets a tensor's name (ggml_set_name).
    pub fn hypura_tensor_set_name(tensor: *mut ggml_tensor, name: *const c_char);
    /// Whether the device implements `buffer_from_host_ptr` (the function
    /// pointer is set; CUDA/HIP leave it NULL and ggml calls it unchecked).
    pub fn hypura_dev_has_host_ptr_import(dev: ggml_backend_dev_t) -> c_int;
}
