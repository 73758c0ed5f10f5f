//! The human-readable profile.

use std::fmt::Write;

use super::MachineProfile;

fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn size(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

/// The profile as aligned text tables.
pub fn render_table(p: &MachineProfile) -> String {
    let mut s = String::new();
    let row = |s: &mut String, k: &str, v: String| {
        let _ = writeln!(s, "  {k:<22} {v}");
    };
    let c = &p.cpu;
    let _ = writeln!(s, "CPU");
    row(&mut s, "model", c.model.clone());
    row(
        &mut s,
        "cores",
        format!(
            "{} physical, {} logical, {} usable",
            c.physical_cores, c.logical_cores, c.usable_cores
        ),
    );
    row(
        &mut s,
        "SIMD (CPU)",
        if c.simd.is_empty() {
            "-".into()
        } else {
            c.simd.join(" ")
        },
    );
    row(
        &mut s,
        "SIMD (ggml build)",
        if c.ggml_simd.is_empty() {
            "-".into()
        } else {
            c.ggml_simd.join(" ")
        },
    );

    let m = &p.memory;
    let _ = writeln!(s, "\nMemory");
    row(&mut s, "total", gib(m.total_bytes));
    row(&mut s, "available", gib(m.available_bytes));
    row(
        &mut s,
        "cgroup limit",
        m.cgroup_limit_bytes.map_or("none".into(), gib),
    );
    row(&mut s, "effective limit", gib(m.effective_limit_bytes));
    row(
        &mut s,
        "read bandwidth",
        format!("{:.1} GB/s ({} threads)", m.read_gbps, m.bandwidth_threads),
    );
    row(&mut s, "copy bandwidth", format!("{:.1} GB/s", m.copy_gbps));

    let st = &p.storage;
    let _ = writeln!(s, "\nStorage ({})", st.path);
    row(
        &mut s,
        "file read",
        format!("{} ({})", st.file, gib(st.file_bytes)),
    );
    row(
        &mut s,
        "engine",
        format!(
            "{}, {}{}",
            st.backend,
            if st.direct {
                "O_DIRECT"
            } else {
                "buffered (page cache not bypassed)"
            },
            if st.fixed_buffers {
                ", fixed buffers"
            } else {
                ""
            }
        ),
    );
    for f in &st.fallbacks {
        row(&mut s, "fallback", f.clone());
    }
    let blocks: Vec<usize> = {
        let mut b: Vec<usize> = st.seq.iter().map(|r| r.block_size).collect();
        b.sort_unstable();
        b.dedup();
        b
    };
    let qds: Vec<usize> = {
        let mut q: Vec<usize> = st.seq.iter().map(|r| r.queue_depth).collect();
        q.sort_unstable();
        q.dedup();
        q
    };
    let _ = write!(s, "  {:<22}", "sequential GB/s");
    for b in &blocks {
        let _ = write!(s, "{:>10}", size(*b));
    }
    let _ = writeln!(s);
    for q in &qds {
        let _ = write!(s, "  {:<22}", format!("  queue depth {q}"));
        for b in &blocks {
            match st
                .seq
                .iter()
                .find(|r| r.queue_depth == *q && r.block_size == *b)
            {
                Some(r) => {
                    let _ = write!(s, "{:>10.2}", r.gbps);
                }
                None => {
                    let _ = write!(s, "{:>10}", "-");
                }
            }
        }
        let _ = writeln!(s);
    }
    row(
        &mut s,
        "best sequential",
        format!(
            "{:.2} GB/s (queue depth {}, {})",
            st.best_seq_gbps,
            st.best_seq_queue_depth,
            size(st.best_seq_block_size)
        ),
    );
    row(
        &mut s,
        "random 4 KiB latency",
        format!(
            "p50 {:.0} us, p99 {:.0} us (queue depth 1)",
            st.rand4k_p50_us, st.rand4k_p99_us
        ),
    );
    row(
        &mut s,
        "random 4 KiB IOPS",
        format!(
            "{:.0} (queue depth {})",
            st.rand4k_iops, st.rand4k_queue_depth
        ),
    );
    for b in &st.backend_comparison {
        let runs: Vec<String> = b.runs_gbps.iter().map(|g| format!("{g:.2}")).collect();
        row(
            &mut s,
            &format!("{} QD{} {}", b.backend, b.queue_depth, size(b.block_size)),
            format!(
                "median {:.2} GB/s (runs: {})",
                b.median_gbps,
                runs.join(", ")
            ),
        );
    }

    let _ = writeln!(s, "\nDevices (ggml)");
    if p.gpus.is_empty() {
        let _ = writeln!(s, "  none");
    }
    for g in &p.gpus {
        let _ = writeln!(
            s,
            "  {:<10} {:<6} {}  {} free of {}",
            g.name,
            g.kind,
            g.description,
            gib(g.free_bytes),
            gib(g.total_bytes)
        );
        if g.h2d_pinned_gbps.is_some() || g.h2d_pageable_gbps.is_some() {
            let f =
                |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1} GB/s"));
            let _ = writeln!(
                s,
                "  {:<10} host->device copies: {} from pinned memory, {} from pageable",
                "",
                f(g.h2d_pinned_gbps),
                f(g.h2d_pageable_gbps)
            );
        }
    }
    s
}
