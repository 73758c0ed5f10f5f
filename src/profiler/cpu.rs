//! CPU model, core counts and the SIMD features ggml can use.

use super::CpuProfile;

pub(crate) fn probe(ggml_simd: Vec<String>) -> CpuProfile {
    let logical = logical_cores();
    CpuProfile {
        model: model(),
        physical_cores: physical_cores().unwrap_or(logical).max(1),
        logical_cores: logical,
        usable_cores: std::thread::available_parallelism().map_or(logical, |n| n.get()),
        simd: simd_features(),
        ggml_simd,
    }
}

#[cfg(target_os = "linux")]
fn cpuinfo() -> String {
    std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()
}

/// `key : value` lines of /proc/cpuinfo with this key.
#[cfg(target_os = "linux")]
fn cpuinfo_values<'a>(text: &'a str, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    text.lines().filter_map(move |l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

#[cfg(target_os = "linux")]
pub(crate) fn model() -> String {
    let text = cpuinfo();
    for key in ["model name", "Processor", "Hardware", "cpu model"] {
        if let Some(v) = cpuinfo_values(&text, key).find(|v| !v.is_empty()) {
            return v.to_string();
        }
    }
    if let Ok(m) = std::fs::read_to_string("/sys/firmware/devicetree/base/model") {
        let m = m.trim_matches(|c: char| c == '\0' || c.is_whitespace());
        if !m.is_empty() {
            return m.to_string();
        }
    }
    format!("unknown {} CPU", std::env::consts::ARCH)
}

#[cfg(target_os = "macos")]
fn sysctl(name: &str) -> Option<String> {
    let out = std::process::Command::new("sysctl")
        .arg("-n")
        .arg(name)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(target_os = "macos")]
pub(crate) fn model() -> String {
    sysctl("machdep.cpu.brand_string")
        .unwrap_or_else(|| format!("unknown {} CPU", std::env::consts::ARCH))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub(crate) fn model() -> String {
    format!("unknown {} CPU", std::env::consts::ARCH)
}

fn logical_cores() -> usize {
    #[cfg(target_os = "macos")]
    if let Some(n) = sysctl("hw.logicalcpu").and_then(|s| s.parse().ok()) {
        return n;
    }
    #[cfg(target_os = "linux")]
    {
        let n = cpuinfo_values(&cpuinfo(), "processor").count();
        if n > 0 {
            return n;
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(target_os = "linux")]
fn physical_cores() -> Option<usize> {
    // (package, core) pairs from sysfs; /proc/cpuinfo as a second source.
    let mut cores = std::collections::BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name
                .strip_prefix("cpu")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                continue;
            }
            let topo = e.path().join("topology");
            let read = |f: &str| {
                std::fs::read_to_string(topo.join(f))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            if let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) {
                cores.insert((pkg, core));
            }
        }
    }
    if !cores.is_empty() {
        return Some(cores.len());
    }
    let text = cpuinfo();
    let mut pkg = String::new();
    for l in text.lines() {
        if let Some((k, v)) = l.split_once(':') {
            match k.trim() {
                "physical id" => pkg = v.trim().to_string(),
                "core id" => {
                    cores.insert((pkg.clone(), v.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(target_os = "macos")]
fn physical_cores() -> Option<usize> {
    sysctl("hw.physicalcpu").and_then(|s| s.parse().ok())
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn physical_cores() -> Option<usize> {
    None
}

/// SIMD features ggml has kernels for, as this CPU reports them.
fn simd_features() -> Vec<String> {
    let mut out = Vec::new();
    #[cfg(all(target_os = "linux", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        let text = cpuinfo();
        let flags: std::collections::BTreeSet<&str> = cpuinfo_values(&text, "flags")
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        const X86: &[(&str, &str)] = &[
            ("pni", "SSE3"),
            ("ssse3", "SSSE3"),
            ("avx", "AVX"),
            ("f16c", "F16C"),
            ("fma", "FMA"),
            ("bmi2", "BMI2"),
            ("avx2", "AVX2"),
            ("avx_vnni", "AVX_VNNI"),
            ("avx512f", "AVX512F"),
            ("avx512bw", "AVX512BW"),
            ("avx512vl", "AVX512VL"),
            ("avx512_vbmi", "AVX512_VBMI"),
            ("avx512_vnni", "AVX512_VNNI"),
            ("avx512_bf16", "AVX512_BF16"),
            ("amx_tile", "AMX_TILE"),
            ("amx_int8", "AMX_INT8"),
            ("amx_bf16", "AMX_BF16"),
        ];
        out.extend(
            X86.iter()
                .filter(|(f, _)| flags.contains(f))
                .map(|(_, n)| n.to_string()),
        );
    }
    #[cfg(all(not(target_os = "linux"), target_arch = "x86_64"))]
    {
        macro_rules! x86 {
            ($($f:tt => $n:expr),*) => { $( if std::arch::is_x86_feature_detected!($f) { out.push($n.to_string()); } )* };
        }
        x86!("sse3" => "SSE3", "ssse3" => "SSSE3", "avx" => "AVX", "f16c" => "F16C", "fma" => "FMA",
             "bmi2" => "BMI2", "avx2" => "AVX2", "avx512f" => "AVX512F", "avx512bw" => "AVX512BW",
             "avx512vl" => "AVX512VL", "avx512vbmi" => "AVX512_VBMI", "avx512vnni" => "AVX512_VNNI",
             "avx512bf16" => "AVX512_BF16");
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! arm {
            ($($f:tt => $n:expr),*) => { $( if std::arch::is_aarch64_feature_detected!($f) { out.push($n.to_string()); } )* };
        }
        arm!("neon" => "NEON", "fp16" => "FP16_VA", "dotprod" => "DOTPROD", "i8mm" => "MATMUL_INT8",
             "sve" => "SVE", "sve2" => "SVE2");
    }
    out
}
