//! Layers across machines (ggml RPC): how many whole layers each remote
//! device holds, the rest stays with the local plan (resident or streamed).
//!
//! # Sketch
//! llama.cpp's layer split puts the first layers on the CPU and the last
//! `n_gpu_layers` (the output layer counted as one) on its devices in order,
//! each a share in proportion to `tensor_split`, or to the devices' free
//! memory. Hypura is one of the participants: the local machine first (the
//! first layers, streamed from NVMe where the RAM budget is short), then the
//! remote devices in the order given. Without `--tensor-split` the shares
//! follow what each can hold: the local RAM budget and each remote's free
//! memory less [`remote_headroom`]. A remote share never exceeds what its
//! device can hold; the excess returns to the local machine, which streams it.
//!
//! Per token, each change of device on the way through the layers costs a
//! network hop (the activations of one position, `n_embd × 4` bytes, plus a
//! round trip): `t = t_local + remote_bytes / mem_bw + hops × (rtt + act / bw)`.
//! On loopback the round trip is ~50 µs; on 10 GbE ~100–200 µs, so a token
//! crossing 3 hops loses < 1 ms: RPC adds capacity (RAM elsewhere, so fewer
//! bytes from disk), not bandwidth for one stream — the remote layers compute
//! at the remote's memory bandwidth, in series with the local ones.

use anyhow::{bail, Result};

use crate::gguf::{GgufFile, TensorRole};

use super::format_bytes;

/// A remote device the plan may put layers on.
#[derive(Clone, Debug)]
pub struct RemoteInput {
    /// ggml's name for it (RPC0, RPC1, ...).
    pub device: String,
    /// The server it is on (host:port).
    pub endpoint: String,
    /// Free memory it reports.
    pub free: u64,
}

/// Where the layers go.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerSplit {
    /// Repeating layers `0..local_layers` stay local.
    pub local_layers: u32,
    /// Layers (the output layer counted as one, on the last device with
    /// layers) per remote device, in order.
    pub remote: Vec<RemoteShare>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RemoteShare {
    pub device: String,
    pub endpoint: String,
    pub layers: u32,
    /// Weight bytes it holds.
    pub bytes: u64,
}

impl LayerSplit {
    /// llama.cpp's `n_gpu_layers`: every remote layer, the output included.
    pub fn n_remote(&self) -> u32 {
        self.remote.iter().map(|r| r.layers).sum()
    }

    /// llama.cpp's `tensor_split` over the remote devices (layer counts).
    pub fn tensor_split(&self) -> Vec<f32> {
        self.remote.iter().map(|r| r.layers as f32).collect()
    }

    /// Whether the output layer is on a remote device.
    pub fn output_remote(&self) -> bool {
        self.n_remote() > 0
    }

    /// Changes of device per token: local → first remote → ... → back
    /// (the logits return to the local machine).
    pub fn hops(&self) -> u32 {
        // The token embedding is always local (llama.cpp keeps the input
        // layer on the CPU), so a remote layer means a hop there and back.
        let used = self.remote.iter().filter(|r| r.layers > 0).count() as u32;
        match used {
            0 => 0,
            u => u + 1,
        }
    }

    /// The layers on remote devices (repeating ones; see [`Self::output_remote`]).
    pub fn remote_layers(&self) -> std::ops::Range<u32> {
        self.local_layers..self.local_layers + self.n_remote().saturating_sub(1)
    }

    /// A one-line summary: `local 10 layers, RPC0 (host:port) 11, RPC1 (...) 10 + output`.
    pub fn describe(&self) -> String {
        let mut s = format!("local {} layers", self.local_layers);
        let last = self.remote.iter().rposition(|r| r.layers > 0);
        for (i, r) in self.remote.iter().enumerate() {
            let (n, out) = match Some(i) == last {
                true => (r.layers - 1, " + output"),
                false => (r.layers, ""),
            };
            s.push_str(&format!(
                ", {} ({}) {n}{out} ({})",
                r.device,
                r.endpoint,
                format_bytes(r.bytes)
            ));
        }
        s
    }
}

/// Memory a remote device keeps free beyond its weights: its KV cache and
/// compute buffers (a fixed part and 5%).
pub fn remote_headroom(free: u64) -> u64 {
    (256u64 << 20).saturating_add(free / 20)
}

/// Bytes per repeating layer, and of the output layer (output norm and
/// matrix; a tied output is the token embedding, which llama.cpp copies).
pub fn layer_bytes(g: &GgufFile) -> (Vec<u64>, u64) {
    let n = g.arch_params().n_layer.unwrap_or(0).max(g.layer_count()) as usize;
    let mut per = vec![0u64; n];
    for t in &g.tensors {
        if let Some(l) = t.layer.filter(|&l| (l as usize) < n) {
            per[l as usize] += t.size;
        }
    }
    let tied = !g.tensors.iter().any(|t| t.role == TensorRole::Output);
    let output = g
        .tensors
        .iter()
        .filter(|t| match t.role {
            TensorRole::Output | TensorRole::OutputNorm => true,
            TensorRole::TokenEmbedding => tied,
            _ => false,
        })
        .map(|t| t.size)
        .sum();
    (per, output)
}

/// Splits the layers of `g` between this machine (`local_capacity` bytes of
/// weights it can hold; it streams the rest) and `remotes`. `weights`
/// (`--tensor-split`: local first, then one per remote device) overrides
/// the proportions; remote shares are still capped at what each device can
/// hold.
pub fn split_layers(
    g: &GgufFile,
    local_capacity: u64,
    remotes: &[RemoteInput],
    weights: Option<&[f64]>,
) -> Result<LayerSplit> {
    let (per, output) = layer_bytes(g);
    let n = per.len() as u32;
    if remotes.is_empty() {
        return Ok(LayerSplit {
            local_layers: n,
            remote: Vec::new(),
        });
    }
    let caps: Vec<u64> = remotes
        .iter()
        .map(|r| r.free.saturating_sub(remote_headroom(r.free)))
        .collect();
    let w: Vec<f64> = match weights {
        Some(w) => {
            if w.len() != remotes.len() + 1 {
                bail!(
                    "--tensor-split has {} values; it needs {} (this machine first, then each remote device: {})",
                    w.len(),
                    remotes.len() + 1,
                    remotes.iter().map(|r| r.device.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
            if w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
                bail!("--tensor-split values must be non-negative numbers, not all zero");
            }
            w.to_vec()
        }
        None => std::iter::once(local_capacity)
            .chain(caps.iter().copied())
            .map(|b| b as f64)
            .collect(),
    };
    let total: f64 = w.iter().sum();
    if total <= 0.0 {
        bail!("neither this machine nor the RPC servers have memory for weights");
    }
    // Units: the repeating layers and the output layer, in order; device
    // boundaries at the cumulative shares (rounded), the local one first.
    let units = n + 1;
    let mut bounds = Vec::with_capacity(w.len());
    let mut cum = 0.0;
    for x in &w {
        cum += x;
        bounds.push(((cum / total) * units as f64).round() as u32);
    }
    *bounds.last_mut().unwrap() = units;
    // Remote counts from the back, each capped by what its device holds;
    // what a device cannot take goes to the ones before it, and finally to
    // this machine (the first layers), which streams what its RAM lacks.
    let unit_bytes = |u: u32| -> u64 {
        match u == n {
            true => output,
            false => per[u as usize],
        }
    };
    let mut counts: Vec<u32> = (0..remotes.len())
        .map(|i| bounds[i + 1] - bounds[i])
        .collect();
    let mut end = units;
    let mut shares = vec![0u64; remotes.len()];
    for i in (0..remotes.len()).rev() {
        let mut taken = 0;
        let mut bytes = 0u64;
        while taken < counts[i] && taken < end {
            let b = unit_bytes(end - 1 - taken);
            if bytes + b > caps[i] {
                break;
            }
            bytes += b;
            taken += 1;
        }
        counts[i] = taken;
        shares[i] = bytes;
        end -= taken;
    }
    // The output layer must sit on the last remote device that has layers
    // (llama.cpp puts it on the last device of the split): a remote device
    // with no layers after one with layers is fine, the counts say so.
    let remote: Vec<RemoteShare> = remotes
        .iter()
        .zip(counts.iter().zip(&shares))
        .map(|(r, (&layers, &bytes))| RemoteShare {
            device: r.device.clone(),
            endpoint: r.endpoint.clone(),
            layers,
            bytes,
        })
        .collect();
    let n_remote: u32 = counts.iter().sum();
    Ok(LayerSplit {
        local_layers: match n_remote {
            0 => n,
            r => units - r,
        },
        remote,
    })
}

/// `g` without what the remote devices hold: the local plan's view.
pub fn local_view(g: &GgufFile, split: &LayerSplit) -> GgufFile {
    let mut local = g.clone();
    let remote = split.remote_layers();
    let out = split.output_remote();
    local.tensors.retain(|t| match (t.layer, t.role) {
        (Some(l), _) => !remote.contains(&l),
        (None, TensorRole::Output | TensorRole::OutputNorm) => !out,
        _ => true,
    });
    local
}

/// Seconds per token the remote part adds: its layers computed at memory
/// bandwidth `mem_gbps` (assumed like this machine's) and `hops` network
/// hops of one round trip `rtt_s` plus the activations of one position.
pub fn remote_secs_per_token(
    split: &LayerSplit,
    mem_gbps: f64,
    rtt_s: f64,
    net_gbps: Option<f64>,
    act_bytes: u64,
) -> f64 {
    let bytes: u64 = split.remote.iter().map(|r| r.bytes).sum();
    let compute = bytes as f64 / (mem_gbps.max(0.1) * 1e9);
    let per_hop = rtt_s + net_gbps.map_or(0.0, |b| act_bytes as f64 / (b.max(1e-3) * 1e9));
    compute + split.hops() as f64 * per_hop
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_split(
        per: &[u64],
        output: u64,
        local: u64,
        frees: &[u64],
        w: Option<&[f64]>,
    ) -> Result<LayerSplit> {
        // A fake model: one tensor per layer of the given size, plus output.
        use crate::gguf::{GgmlType, TensorInfo};
        let mut g = GgufFile {
            path: "fake.gguf".into(),
            version: 3,
            alignment: 32,
            data_offset: 0,
            file_size: 0,
            metadata: Vec::new(),
            tensors: Vec::new(),
        };
        for (l, &b) in per.iter().enumerate() {
            g.tensors.push(TensorInfo {
                name: format!("blk.{l}.ffn_up.weight"),
                ggml_type: GgmlType::F32,
                dims: vec![b / 4],
                offset: 0,
                size: b,
                role: TensorRole::FfnUp,
                layer: Some(l as u32),
            });
        }
        g.tensors.push(TensorInfo {
            name: "output.weight".into(),
            ggml_type: GgmlType::F32,
            dims: vec![output / 4],
            offset: 0,
            size: output,
            role: TensorRole::Output,
            layer: None,
        });
        let remotes: Vec<RemoteInput> = frees
            .iter()
            .enumerate()
            .map(|(i, &f)| RemoteInput {
                device: format!("RPC{i}"),
                endpoint: format!("h:{i}"),
                free: f,
            })
            .collect();
        split_layers(&g, local, &remotes, w)
    }

    fn split_of(
        per: &[u64],
        output: u64,
        local: u64,
        frees: &[u64],
        w: Option<&[f64]>,
    ) -> LayerSplit {
        try_split(per, output, local, frees, w).unwrap()
    }

    const M: u64 = 1 << 20;

    #[test]
    fn explicit_weights_split_units_in_order() {
        // 11 units (10 layers + output), 1:1:0 of 11 → local 6, RPC0 5 (incl. output).
        let s = split_of(&[M; 10], M, 100 * M, &[10 << 30], Some(&[1.0, 1.0]));
        assert_eq!(s.local_layers, 6);
        assert_eq!(s.n_remote(), 5);
        assert_eq!(s.remote_layers(), 6..10);
        assert_eq!(s.hops(), 2);
        let s = split_of(
            &[M; 8],
            M,
            100 * M,
            &[10 << 30, 10 << 30],
            Some(&[1.0, 1.0, 1.0]),
        );
        assert_eq!(s.local_layers + s.n_remote(), 9);
        assert_eq!(
            s.remote.iter().map(|r| r.layers).collect::<Vec<_>>(),
            vec![3, 3]
        );
        assert_eq!(s.local_layers, 3);
        assert_eq!(s.hops(), 3);
    }

    #[test]
    fn shares_follow_memory_and_are_capped() {
        // A big remote takes nearly all; the small local budget keeps ~none.
        let s = split_of(&[100 * M; 10], 100 * M, 50 * M, &[20 << 30], None);
        assert_eq!(s.local_layers, 0);
        assert_eq!(s.n_remote(), 11);
        // A remote that holds 3 layers (after headroom) gets 3, whatever the weights.
        let cap = 3 * 100 * M + remote_headroom(0) + 5 * M;
        let free = cap + cap / 19;
        let s = split_of(&[100 * M; 10], 100 * M, 50 * M, &[free], Some(&[0.0, 1.0]));
        assert_eq!(s.n_remote(), 3);
        assert_eq!(s.local_layers, 8);
        assert!(s.remote[0].bytes <= free - remote_headroom(free));
    }

    #[test]
    fn no_remotes_keeps_everything_local() {
        let s = split_of(&[M; 4], M, M, &[], None);
        assert_eq!((s.local_layers, s.n_remote(), s.hops()), (4, 0, 0));
    }

    #[test]
    fn bad_weights_are_refused() {
        let (per, out) = (&[M; 4], M);
        for w in [&[1.0][..], &[0.0, 0.0], &[-1.0, 2.0], &[f64::NAN, 1.0]] {
            assert!(
                try_split(per, out, M, &[1 << 30], Some(w)).is_err(),
                "{w:?} accepted"
            );
        }
    }
}
