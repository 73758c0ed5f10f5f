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

// ggml's RPC backend (`ggml-rpc.h`; ggml is built with GGML_RPC=ON, see
// .cargo/config.toml). Not in llama-cpp-sys-2's bindings, which cover
// llama.h and the ggml headers it includes.
extern "C" {
    /// Connects to a `rpc-server` at `endpoint` ("host:port") and returns a
    /// registry of its devices (cached per endpoint), or NULL when it has
    /// none. ggml aborts the process (its abort callback first) when the
    /// server cannot be reached or the handshake fails.
    pub fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> ggml_backend_reg_t;
    /// Serves `devices` over ggml RPC on `endpoint` until the process ends
    /// (one client at a time); returns only when it cannot start.
    pub fn ggml_backend_rpc_start_server(
        endpoint: *const c_char,
        cache_dir: *const c_char,
        n_threads: usize,
        n_devices: usize,
        devices: *mut ggml_backend_dev_t,
    );
    /// Free and total memory of device `device` of the server at `endpoint`.
    pub fn ggml_backend_rpc_get_device_memory(
        endpoint: *const c_char,
        device: u32,
        free: *mut usize,
        total: *mut usize,
    );
}

/// The RPC protocol version this ggml speaks (`RPC_PROTO_*_VERSION`).
pub const RPC_PROTO_VERSION: (u32, u32, u32) = (7, 0, 0);
/// Most servers ggml's RPC backend takes (`GGML_RPC_MAX_SERVERS`).
pub const RPC_MAX_SERVERS: usize = 16;
/// The handshake command's byte (`RPC_CMD_HELLO`: "must be always 14" in
/// ggml-rpc.cpp, so every protocol version starts with it).
pub const RPC_CMD_HELLO: u8 = 14;
/// The connection-capability bytes of the handshake messages
/// (`RPC_CONN_CAPS_SIZE` in ggml-rpc's transport.h): the request is these
/// bytes, the response major, minor, patch, one padding byte and these.
pub const RPC_CONN_CAPS_SIZE: usize = 24;
