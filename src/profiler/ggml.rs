//! ggml's view of the machine: devices (through the engine's device layer), and the CPU features
//! the linked ggml was built for (`ggml_cpu_has_*`). The only FFI of the profiler.

use hypura_sys as sys;

use super::GpuProfile;

/// Every ggml device: name, kind, memory, and for a GPU the host→device
/// copy bandwidth (256 MiB copies, 64 MiB when less than 4 GiB is free, best
/// of 5, from pinned and from pageable memory).
pub(crate) fn devices() -> Vec<GpuProfile> {
    use crate::engine::device::{measure_upload, Device, Kind};
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
            GpuProfile {
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
