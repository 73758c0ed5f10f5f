//! ggml devices for the GPU tier: finding the GPU, its free memory, and the
//! memory the streaming engine computes on there (a device buffer, filled by
//! uploads from host staging, or host memory the device addresses directly).
//!
//! Everything goes through ggml's device API (`ggml_backend_dev_*`,
//! `ggml_backend_buft_*`, `ggml_backend_tensor_set`), so the same code drives
//! CUDA, HIP, Metal, Vulkan, and the CPU device (which the tests use to run
//! the device-pool paths on a machine without a GPU).

use std::ffi::{c_void, CStr};

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;

use super::backend;

/// How streamed tensors reach a device's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Upload {
    /// Direct when the device can wrap host memory, else staged.
    #[default]
    Auto,
    /// O_DIRECT reads into pinned host staging, then copies into a device
    /// buffer (a discrete GPU: CUDA, HIP on a discrete card).
    Staged,
    /// The pool is page-aligned host memory the device addresses itself
    /// (`ggml_backend_dev_buffer_from_host_ptr`: Metal, the CPU device):
    /// reads land where the device computes, no copy.
    Direct,
}

/// A ggml device (a handle into ggml's registry, valid for the process).
#[derive(Clone, Copy, Debug)]
pub struct Device {
    dev: sys::ggml_backend_dev_t,
}

// SAFETY: a device handle is an immutable registry entry; ggml's device calls
// used here are thread-safe queries or allocations.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

fn c_str(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings owned by the device.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl Device {
    /// Every device ggml has (backends loaded on first use).
    pub fn all() -> Vec<Device> {
        backend::init();
        // SAFETY: registry queries after backend init.
        let n = unsafe { sys::ggml_backend_dev_count() };
        (0..n)
            // SAFETY: i < ggml_backend_dev_count().
            .map(|i| unsafe { sys::ggml_backend_dev_get(i) })
            .filter(|d| !d.is_null())
            .map(|dev| Device { dev })
            .collect()
    }

    /// The device to stream to: the one named `name` (any kind, the CPU
    /// included: that runs the device paths without a GPU), else the first
    /// GPU (discrete or integrated). `None` when there is none.
    pub fn find(name: Option<&str>) -> Result<Option<Device>> {
        let all = Device::all();
        if let Some(name) = name {
            let d = all
                .iter()
                .copied()
                .find(|d| d.name().eq_ignore_ascii_case(name));
            return match d {
                Some(d) => Ok(Some(d)),
                None => {
                    let names: Vec<String> = all.iter().map(Device::name).collect();
                    bail!(
                        "no ggml device named '{name}' (devices: {})",
                        names.join(", ")
                    )
                }
            };
        }
        Ok(all
            .into_iter()
            .find(|d| matches!(d.kind(), Kind::Gpu | Kind::Igpu)))
    }

    pub fn name(&self) -> String {
        // SAFETY: live registry entry.
        c_str(unsafe { sys::ggml_backend_dev_name(self.dev) })
    }

    pub fn description(&self) -> String {
        // SAFETY: live registry entry.
        c_str(unsafe { sys::ggml_backend_dev_description(self.dev) })
    }

    pub fn kind(&self) -> Kind {
        // SAFETY: live registry entry.
        match unsafe { sys::ggml_backend_dev_type(self.dev) } {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => Kind::Cpu,
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => Kind::Gpu,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => Kind::Igpu,
            _ => Kind::Other,
        }
    }

    /// (free, total) bytes, as the backend reports them now.
    pub fn memory(&self) -> (u64, u64) {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: live device; out-pointers are locals.
        unsafe { sys::ggml_backend_dev_memory(self.dev, &mut free, &mut total) };
        (free as u64, total as u64)
    }

    /// Whether the device can compute on host memory imported as one of its
    /// buffers: its caps flag (Metal, the CPU device), else — ggml-vulkan
    /// implements the import (VK_EXT_external_memory_host) while its caps
    /// say no — a real import of a small anonymous mapping, probed once per
    /// device. Never called where the backend has no import (CUDA, HIP:
    /// ggml calls the missing function pointer unchecked).
    pub fn wraps_host_memory(&self) -> bool {
        // SAFETY: live device; props is a plain out-struct.
        let mut props: sys::ggml_backend_dev_props = unsafe { std::mem::zeroed() };
        unsafe { sys::ggml_backend_dev_get_props(self.dev, &mut props) };
        props.caps.buffer_from_host_ptr || self.import_probe().0
    }

    /// Whether an imported buffer's addresses are the host addresses (the
    /// CPU device, Metal: tensors may point anywhere into wrapped memory),
    /// or the device has addresses of its own (ggml-vulkan: every buffer's
    /// base is 0x1000; a tensor's `data` is base + its offset, its buffer
    /// the one import holding it).
    pub fn imports_at_host_addresses(&self) -> bool {
        // SAFETY: live device; props is a plain out-struct.
        let mut props: sys::ggml_backend_dev_props = unsafe { std::mem::zeroed() };
        unsafe { sys::ggml_backend_dev_get_props(self.dev, &mut props) };
        // Hidden, for tests: the CPU device takes the per-slot path Vulkan
        // takes (imports named per slot, device addresses translated).
        if std::env::var_os("HYPURA_DIRECT_SLOTS").is_some() {
            return false;
        }
        props.caps.buffer_from_host_ptr || self.import_probe().1
    }

    /// (imports, at host addresses), probed once per device.
    fn import_probe(&self) -> (bool, bool) {
        static PROBED: std::sync::Mutex<Vec<(usize, (bool, bool))>> =
            std::sync::Mutex::new(Vec::new());
        let mut probed = PROBED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(_, r)) = probed.iter().find(|(d, _)| *d == self.dev as usize) {
            return r;
        }
        let r = self.probe_import();
        probed.push((self.dev as usize, r));
        r
    }

    /// Imports 64 KiB of fresh anonymous private memory (page-aligned, the
    /// kind RADV and lavapipe accept) and frees it again.
    fn probe_import(&self) -> (bool, bool) {
        // SAFETY: live device; the shim only reads its interface table.
        if unsafe { sys::hypura_dev_has_host_ptr_import(self.dev) } == 0 {
            return (false, false);
        }
        const LEN: usize = 64 << 10;
        let Ok(map) = HostPages::new(LEN) else {
            return (false, false);
        };
        // SAFETY: `map` is LEN bytes of our own mapped memory, alive until the
        // buffer wrapping it is freed just below.
        let buf = unsafe {
            sys::ggml_backend_dev_buffer_from_host_ptr(self.dev, map.ptr.cast(), LEN, LEN)
        };
        if buf.is_null() {
            return (false, false);
        }
        // SAFETY: the buffer we just got, used by nobody else.
        let base = unsafe { sys::ggml_backend_buffer_get_base(buf) } as *mut u8;
        unsafe { sys::ggml_backend_buffer_free(buf) };
        tracing::debug!(
            "{}: imports host memory (buffer base {base:p})",
            self.name()
        );
        (true, base == map.ptr)
    }

    /// The upload path `want` resolves to on this device.
    pub fn upload_path(&self, want: Upload) -> Result<Upload> {
        Ok(match want {
            Upload::Auto if self.wraps_host_memory() => Upload::Direct,
            Upload::Auto => Upload::Staged,
            Upload::Direct if !self.wraps_host_memory() => {
                bail!("device {} cannot compute on host memory (no buffer_from_host_ptr): use --gpu-upload staged", self.name())
            }
            u => u,
        })
    }

    pub fn raw(&self) -> sys::ggml_backend_dev_t {
        self.dev
    }

    /// A device handle from ggml's registry (`ggml_backend_dev_get`).
    pub fn from_raw(dev: sys::ggml_backend_dev_t) -> Device {
        assert!(!dev.is_null());
        Device { dev }
    }

    /// The device's own buffer type (where it computes).
    pub fn buft(&self) -> sys::ggml_backend_buffer_type_t {
        // SAFETY: live device.
        unsafe { sys::ggml_backend_dev_buffer_type(self.dev) }
    }

    /// Pinned host memory for fast uploads, if the backend has it.
    pub fn host_buft(&self) -> Option<sys::ggml_backend_buffer_type_t> {
        // SAFETY: live device; null means none.
        let b = unsafe { sys::ggml_backend_dev_host_buffer_type(self.dev) };
        (!b.is_null()).then_some(b)
    }

    /// Host memory to stage copies to this device in: its pinned host buffer
    /// type; the CPU device's own memory for the CPU device (tests); none
    /// when the backend has no pinned memory.
    pub fn staging_buft(&self) -> Option<sys::ggml_backend_buffer_type_t> {
        match (self.host_buft(), self.kind()) {
            (Some(hb), _) => Some(hb),
            (None, Kind::Cpu) => Some(self.buft()),
            (None, _) => None,
        }
    }

    /// Kind as a short label (cpu, gpu, igpu, other).
    pub fn kind_label(&self) -> &'static str {
        match self.kind() {
            Kind::Cpu => "cpu",
            Kind::Gpu => "gpu",
            Kind::Igpu => "igpu",
            Kind::Other => "other",
        }
    }

    /// Bytes the device needs for `tensor` (quantized rows may be padded:
    /// CUDA pads to 512 columns and its kernels read the padding).
    ///
    /// # Safety
    /// `tensor` must point to a live ggml tensor.
    pub unsafe fn alloc_size(&self, tensor: *const sys::ggml_tensor) -> usize {
        // SAFETY: live buffer type; the tensor per the caller.
        unsafe { sys::ggml_backend_buft_get_alloc_size(self.buft(), tensor) }
    }

    pub fn alignment(&self) -> usize {
        // SAFETY: live buffer type.
        unsafe { sys::ggml_backend_buft_get_alignment(self.buft()) }.max(1)
    }

    /// The CPU device's buffer type (resident FFN layers computed on the CPU
    /// while the rest of the layer is on the GPU).
    pub fn cpu_buft() -> Result<sys::ggml_backend_buffer_type_t> {
        backend::init();
        // SAFETY: registry query after init.
        let cpu = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
        if cpu.is_null() {
            bail!("ggml has no CPU device");
        }
        // SAFETY: live device.
        Ok(unsafe { sys::ggml_backend_dev_buffer_type(cpu) })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cpu,
    Gpu,
    Igpu,
    Other,
}

/// Page-aligned anonymous private memory (the probe's import target),
/// unmapped on drop.
struct HostPages {
    ptr: *mut u8,
    len: usize,
}

impl HostPages {
    fn new(len: usize) -> Result<HostPages> {
        use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
        let nz = std::num::NonZeroUsize::new(len).context("empty mapping")?;
        // SAFETY: a fresh anonymous private mapping at an address of the
        // kernel's choosing; it overlaps nothing.
        let p = unsafe {
            mmap_anonymous(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        Ok(HostPages {
            ptr: p.as_ptr().cast(),
            len,
        })
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        if let Some(p) = std::ptr::NonNull::new(self.ptr.cast::<c_void>()) {
            // SAFETY: our own mapping of `len` bytes; nothing refers to it now.
            let _ = unsafe { nix::sys::mman::munmap(p, self.len) };
        }
    }
}

/// A ggml backend buffer owned by the engine (freed on drop), marked as
/// holding weights so ggml's scheduler runs the ops that use them on its device.
pub struct Buffer {
    buf: sys::ggml_backend_buffer_t,
    base: *mut u8,
    len: usize,
}

// SAFETY: the handle is used by the engine's threads under its own protocol
// (a region is written by one thread, then handed over); ggml's buffer calls
// used here take no global locks on shared state of ours.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    /// Allocates `len` bytes of `buft` (device memory, or pinned host memory
    /// for a host buffer type).
    ///
    /// # Safety
    /// `buft` must be a live buffer type (one of a registered device's).
    pub unsafe fn alloc(
        buft: sys::ggml_backend_buffer_type_t,
        len: usize,
        what: &str,
    ) -> Result<Buffer> {
        // SAFETY: live buffer type per the caller; ggml returns null on failure.
        let buf = unsafe { sys::ggml_backend_buft_alloc_buffer(buft, len.max(1)) };
        if buf.is_null() {
            let why = backend::take_last_error()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            bail!(
                "cannot allocate {} for the {what}{why}",
                crate::scheduler::format_bytes(len as u64)
            );
        }
        Buffer::own(buf, len)
    }

    /// Wraps host memory `[ptr, ptr+len)` as a buffer of `dev` (no copy).
    ///
    /// # Safety
    /// The memory must stay mapped for the buffer's lifetime.
    pub unsafe fn from_host(
        dev: &Device,
        ptr: *mut u8,
        len: usize,
        max_tensor: usize,
    ) -> Result<Buffer> {
        // Hidden, for tests: the device refuses every pool import (the probe
        // still succeeds), so the fallback to staged copies runs.
        let refused = std::env::var_os("HYPURA_REFUSE_IMPORT").is_some();
        // SAFETY: caller guarantees the range; ggml returns null on failure;
        // only called for devices whose probe (or caps) says they import.
        let buf = match refused {
            true => std::ptr::null_mut(),
            false => unsafe {
                sys::ggml_backend_dev_buffer_from_host_ptr(dev.raw(), ptr.cast(), len, max_tensor)
            },
        };
        if buf.is_null() {
            bail!(
                "device {} refused to wrap {} of host memory",
                dev.name(),
                crate::scheduler::format_bytes(len as u64)
            );
        }
        Buffer::own(buf, len)
    }

    fn own(buf: sys::ggml_backend_buffer_t, len: usize) -> Result<Buffer> {
        // SAFETY: a buffer we just got; base is its start address (device or host).
        let base = unsafe {
            sys::ggml_backend_buffer_set_usage(buf, sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
            sys::ggml_backend_buffer_get_base(buf)
        } as *mut u8;
        if base.is_null() {
            // SAFETY: ours, not shared yet.
            unsafe { sys::ggml_backend_buffer_free(buf) };
            bail!("ggml returned a buffer without memory");
        }
        Ok(Buffer { buf, base, len })
    }

    pub fn raw(&self) -> sys::ggml_backend_buffer_t {
        self.buf
    }
    pub fn base(&self) -> *mut u8 {
        self.base
    }
    /// The first `align`-aligned address of the buffer (host buffers that
    /// O_DIRECT reads land in are allocated `align` bytes larger).
    pub fn aligned_base(&self, align: usize) -> *mut u8 {
        self.base.wrapping_add(self.base.align_offset(align))
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills the whole buffer with `value`.
    pub fn clear(&self, value: u8) {
        // SAFETY: our live buffer.
        unsafe { sys::ggml_backend_buffer_clear(self.buf, value) }
    }

    /// A 1-D I8 tensor covering `[off, off+len)` of the buffer, so that
    /// ggml's tensor copy functions can address raw ranges.
    fn carrier(&self, off: usize, len: usize) -> sys::ggml_tensor {
        assert!(
            off + len <= self.len,
            "range {off}+{len} outside a buffer of {}",
            self.len
        );
        // SAFETY: ggml_tensor is plain data; all-zero is a valid empty tensor.
        let mut t: sys::ggml_tensor = unsafe { std::mem::zeroed() };
        t.type_ = sys::GGML_TYPE_I8;
        t.ne = [len as i64, 1, 1, 1];
        t.nb = [1, len, len, len];
        t.buffer = self.buf;
        // SAFETY: off + len <= len of the buffer (asserted).
        t.data = unsafe { self.base.add(off) }.cast();
        t
    }

    /// Copies `len` bytes from host memory `src` to `off` in the buffer and
    /// returns once they are there (CUDA: an async copy on the calling
    /// thread's stream, then a sync of that stream only; compute on other
    /// streams goes on).
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes; nothing may compute on the
    /// destination range meanwhile.
    pub unsafe fn upload(&self, off: usize, src: *const u8, len: usize) {
        if len == 0 {
            return;
        }
        let mut t = self.carrier(off, len);
        // SAFETY: the carrier describes [off, off+len) of this buffer; src per caller.
        unsafe { sys::ggml_backend_tensor_set(&mut t, src as *const c_void, 0, len) }
    }

    /// Sets `len` bytes at `off` to `value`.
    pub fn fill(&self, off: usize, value: u8, len: usize) {
        if len == 0 {
            return;
        }
        let mut t = self.carrier(off, len);
        // SAFETY: the carrier describes a range inside this buffer.
        unsafe { sys::ggml_backend_tensor_memset(&mut t, value, 0, len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: ours; the engine re-points or stops using tensors first.
        unsafe { sys::ggml_backend_buffer_free(self.buf) }
    }
}

/// Host→device copy bandwidth (GB/s) from pinned memory (if the backend has
/// it) and from ordinary pageable memory: `bytes` copied `rounds` times, best
/// round. `None` for a device that computes on host memory.
pub fn measure_upload(dev: &Device, bytes: usize, rounds: usize) -> Result<(Option<f64>, f64)> {
    // SAFETY: the device's own buffer type.
    let dst = unsafe { Buffer::alloc(dev.buft(), bytes, "upload bandwidth test") }
        .context("device buffer")?;
    let time = |src: *const u8| -> f64 {
        let mut best = f64::MAX;
        for _ in 0..rounds.max(1) {
            let t0 = std::time::Instant::now();
            // SAFETY: src holds `bytes` readable bytes; dst is ours and idle.
            unsafe { dst.upload(0, src, bytes) };
            best = best.min(t0.elapsed().as_secs_f64());
        }
        bytes as f64 / best / 1e9
    };
    let pinned = match dev.host_buft() {
        // SAFETY: the device's host buffer type.
        Some(hb) => match unsafe { Buffer::alloc(hb, bytes, "pinned staging test") } {
            Ok(src) => {
                // SAFETY: host buffer of `bytes` bytes, ours.
                unsafe { std::ptr::write_bytes(src.base(), 1, bytes) };
                Some(time(src.base()))
            }
            Err(_) => None,
        },
        None => None,
    };
    let pageable = vec![1u8; bytes];
    let pg = time(pageable.as_ptr());
    Ok((pinned, pg))
}

/// Every ggml device as the machine profile records it: name, kind, memory,
/// and for a GPU the host→device copy bandwidth (256 MiB copies, 64 MiB when
/// less than 4 GiB is free, best of 5, from pinned and from pageable memory).
/// `hypura profile` hands this to [`crate::profiler`], which does not reach
/// into the engine.
pub fn measure_all() -> Vec<crate::profiler::GpuProfile> {
    Device::all()
        .into_iter()
        .map(|d| {
            let (free, total) = d.memory();
            let (mut pinned, mut pageable) = (None, None);
            if matches!(d.kind(), Kind::Gpu | Kind::Igpu) {
                let bytes = if free > 4 << 30 { 256 << 20 } else { 64 << 20 };
                match measure_upload(&d, bytes, 5) {
                    Ok((p, g)) => {
                        pinned = p;
                        pageable = Some(g);
                    }
                    Err(e) => tracing::warn!(
                        "{}: cannot measure host-to-device bandwidth: {e:#}",
                        d.name()
                    ),
                }
            }
            crate::profiler::GpuProfile {
                name: d.name(),
                description: d.description(),
                kind: d.kind_label().to_string(),
                total_bytes: total,
                free_bytes: free,
                h2d_pinned_gbps: pinned,
                h2d_pageable_gbps: pageable,
            }
        })
        .collect()
}
