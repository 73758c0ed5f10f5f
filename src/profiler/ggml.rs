//! ggml's view of the machine: devices through `ggml_backend_dev_*`, and the CPU features
//! the linked ggml was built for (`ggml_cpu_has_*`). The only FFI of the profiler.

use std::ffi::CStr;
use std::os::raw::c_char;

use hypura_sys as sys;

use super::GpuProfile;

/// Loads ggml's backends once per process, through the engine's one init.
fn load_backends() {
    crate::engine::backend::init();
}

fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings owned by the device, valid for the
    // process's life; null was excluded above.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Every ggml device: name, kind, memory.
pub(crate) fn devices() -> Vec<GpuProfile> {
    load_backends();
    // SAFETY: the registry is initialised on first use; the count is a plain query.
    let n = unsafe { sys::ggml_backend_dev_count() };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: i < ggml_backend_dev_count().
        let dev = unsafe { sys::ggml_backend_dev_get(i) };
        if dev.is_null() {
            continue;
        }
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: `dev` is a registered device; the out-pointers are valid locals.
        let (name, desc, ty) = unsafe {
            sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
            (
                sys::ggml_backend_dev_name(dev),
                sys::ggml_backend_dev_description(dev),
                sys::ggml_backend_dev_type(dev),
            )
        };
        let kind = match ty {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => "cpu",
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => "gpu",
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => "igpu",
            sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => "accel",
            _ => "other",
        };
        // Host→device bandwidth of a GPU: 256 MiB copies (64 MiB when less
        // than 4 GiB is free), best of 5, from pinned and from pageable memory.
        let (mut pinned, mut pageable) = (None, None);
        if kind == "gpu" || kind == "igpu" {
            let bytes = if free > 4 << 30 { 256 << 20 } else { 64 << 20 };
            match crate::engine::device::measure_upload(&crate::engine::device::Device::from_raw(dev), bytes, 5) {
                Ok((p, g)) => {
                    pinned = p;
                    pageable = Some(g);
                }
                Err(e) => tracing::warn!("{}: cannot measure host-to-device bandwidth: {e:#}", c_string(name)),
            }
        }
        out.push(GpuProfile {
            name: c_string(name),
            description: c_string(desc),
            kind: kind.to_string(),
            total_bytes: total as u64,
            free_bytes: free as u64,
            h2d_pinned_gbps: pinned,
            h2d_pageable_gbps: pageable,
        });
    }
    out
}

/// Features the linked ggml CPU backend was compiled with.
pub(crate) fn cpu_features() -> Vec<String> {
    type Has = unsafe extern "C" fn() -> std::os::raw::c_int;
    let table: &[(&str, Has)] = &[
        ("SSE3", sys::ggml_cpu_has_sse3),
        ("SSSE3", sys::ggml_cpu_has_ssse3),
        ("AVX", sys::ggml_cpu_has_avx),
        ("AVX_VNNI", sys::ggml_cpu_has_avx_vnni),
        ("AVX2", sys::ggml_cpu_has_avx2),
        ("BMI2", sys::ggml_cpu_has_bmi2),
        ("F16C", sys::ggml_cpu_has_f16c),
        ("FMA", sys::ggml_cpu_has_fma),
        ("AVX512F", sys::ggml_cpu_has_avx512),
        ("AVX512_VBMI", sys::ggml_cpu_has_avx512_vbmi),
        ("AVX512_VNNI", sys::ggml_cpu_has_avx512_vnni),
        ("AVX512_BF16", sys::ggml_cpu_has_avx512_bf16),
        ("AMX_INT8", sys::ggml_cpu_has_amx_int8),
        ("NEON", sys::ggml_cpu_has_neon),
        ("FP16_VA", sys::ggml_cpu_has_fp16_va),
        ("DOTPROD", sys::ggml_cpu_has_dotprod),
        ("MATMUL_INT8", sys::ggml_cpu_has_matmul_int8),
        ("SVE", sys::ggml_cpu_has_sve),
        ("SME", sys::ggml_cpu_has_sme),
    ];
    table
        .iter()
        // SAFETY: argument-less queries of compile-time flags.
        .filter(|(_, f)| unsafe { f() } != 0)
        .map(|(n, _)| n.to_string())
        .collect()
}
