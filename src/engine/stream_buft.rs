//! Hypura's custom ggml buffer type (see `hypura-sys/shim/hypura_shim.c`):
//! tensors placed in it reserve address space only, and every one is reported
//! here as llama.cpp initialises it, so the streaming engine knows each
//! streamed tensor's `ggml_tensor` and can re-point its data into pool slots.

use std::ffi::{c_void, CStr, CString};
use std::os::raw::c_char;
use std::sync::Mutex;

use anyhow::{anyhow, Result};
use hypura_sys as sys;

use super::backend;

/// A tensor that llama.cpp placed in a Hypura buffer.
#[derive(Debug, Clone)]
pub struct ReportedTensor {
    pub name: String,
    pub tensor: *mut sys::ggml_tensor,
    /// Where ggml put it inside the reserved buffer (never committed).
    pub data: *mut c_void,
    pub nbytes: usize,
}

// SAFETY: the pointers are only dereferenced by the engine under its own
// synchronisation; the struct itself is plain data.
unsafe impl Send for ReportedTensor {}

/// An owned Hypura buffer type. Boxed so the callback's user pointer is stable.
pub struct StreamBufferType {
    buft: sys::ggml_backend_buffer_type_t,
    reported: Mutex<Vec<ReportedTensor>>,
}

// SAFETY: the buffer type is only mutated by ggml during model load; the
// reported list is behind a Mutex.
unsafe impl Send for StreamBufferType {}
unsafe impl Sync for StreamBufferType {}

unsafe extern "C" fn on_tensor(
    user: *mut c_void,
    tensor: *mut sys::ggml_tensor,
    name: *const c_char,
    data: *mut c_void,
    nbytes: usize,
) {
    // SAFETY: `user` is the boxed StreamBufferType registered in `new`, alive
    // as long as the buffer type; `name` is the tensor's NUL-terminated name.
    let this = unsafe { &*(user as *const StreamBufferType) };
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let mut list = this.reported.lock().unwrap_or_else(|e| e.into_inner());
    list.push(ReportedTensor {
        name,
        tensor,
        data,
        nbytes,
    });
}

impl StreamBufferType {
    /// A buffer type whose tensors the CPU backend computes on (`is_host`).
    pub fn new_host() -> Result<Box<Self>> {
        backend::init();
        // SAFETY: querying the device registry after backend init.
        let cpu = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
        if cpu.is_null() {
            return Err(anyhow!("ggml has no CPU device"));
        }
        let mut this = Box::new(StreamBufferType {
            buft: std::ptr::null_mut(),
            reported: Mutex::new(Vec::new()),
        });
        let name = CString::new("Hypura_Stream").expect("static name");
        let user = &*this as *const StreamBufferType as *mut c_void;
        // SAFETY: `user` points into the Box, which outlives the buffer type
        // (freed in Drop before the Box). The name is copied by the shim.
        let buft = unsafe { sys::hypura_buft_new(name.as_ptr(), cpu, Some(on_tensor), user) };
        if buft.is_null() {
            return Err(anyhow!("could not create the Hypura buffer type"));
        }
        this.buft = buft;
        Ok(this)
    }

    pub fn as_raw(&self) -> sys::ggml_backend_buffer_type_t {
        self.buft
    }

    /// Hide the names of tensors as they are placed, so that llama.cpp's loader
    /// skips reading them; call [`restore_names`](Self::restore_names) after load.
    pub fn set_hide_names(&self, hide: bool) {
        // SAFETY: live buffer type.
        unsafe { sys::hypura_buft_set_hide_names(self.buft, hide as i32) }
    }

    /// Puts back the names hidden during load.
    pub fn restore_names(&self) -> Result<()> {
        let list = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for t in list.iter() {
            // SAFETY: reported tensors belong to the loaded model, alive while
            // the model is; the name is copied into the tensor.
            unsafe {
                if sys::hypura_tensor_is_hidden(t.tensor) != 0 {
                    let c = CString::new(t.name.as_str())?;
                    sys::hypura_tensor_set_name(t.tensor, c.as_ptr());
                }
            }
        }
        Ok(())
    }

    /// Every tensor placed in this buffer type so far, in placement order.
    pub fn reported(&self) -> Vec<ReportedTensor> {
        self.reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Address space reserved by live buffers of this type.
    pub fn reserved_bytes(&self) -> usize {
        // SAFETY: live buffer type.
        unsafe { sys::hypura_buft_reserved_bytes(self.buft) }
    }
}

impl Drop for StreamBufferType {
    fn drop(&mut self) {
        // SAFETY: buffers of this type belong to models, which callers drop
        // before the buffer type (the engine owns both in that order). If a
        // buffer is still alive we leak the type rather than free it under it.
        unsafe {
            if sys::hypura_buft_live_buffers(self.buft) == 0 {
                sys::hypura_buft_free(self.buft);
            }
        }
    }
}
