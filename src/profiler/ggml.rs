//! The CPU features the linked ggml was built for (`ggml_cpu_has_*`). The only FFI of the
//! profiler; its devices are measured by the engine (`engine::device::measure_all`) and handed in.

use hypura_sys as sys;

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
