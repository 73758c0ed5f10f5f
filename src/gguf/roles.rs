//! What a tensor is for, from its llama.cpp name (`blk.N.ffn_up.weight`).

/// The part of the model a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorRole {
    /// `token_embd`: the input embedding table.
    TokenEmbedding,
    /// `output`: the LM head.
    Output,
    /// `output_norm`: the final norm.
    OutputNorm,
    /// `attn_norm`, `post_attention_norm`: norms around attention.
    AttnNorm,
    /// `attn_q/k/v/output`, `attn_qkv`, `attn_q_norm`, ...: attention weights.
    Attention,
    /// `ffn_norm`, `post_ffw_norm`, `pre_ffw_norm_2`: norms around the FFN.
    FfnNorm,
    /// Dense FFN gate projection.
    FfnGate,
    /// Dense FFN up projection.
    FfnUp,
    /// Dense FFN down projection.
    FfnDown,
    /// Stacked routed-expert gate projections (`[n_embd, n_ff_exp, n_expert]`).
    FfnGateExps,
    /// Stacked routed-expert up projections.
    FfnUpExps,
    /// Stacked routed-expert down projections.
    FfnDownExps,
    /// Stacked routed-expert fused gate+up projections.
    FfnGateUpExps,
    /// Shared (always active) expert: `ffn_*_shexp`.
    SharedExpert,
    /// Expert router: `ffn_gate_inp`, `ffn_gate_inp_shexp`, `exp_probs_b`.
    Router,
    /// Anything else (rope frequencies, SSM, vision, ...).
    Other,
}

impl TensorRole {
    /// Every role, in display order.
    pub const ALL: [TensorRole; 16] = {
        use TensorRole::*;
        [
            TokenEmbedding,
            Output,
            OutputNorm,
            AttnNorm,
            Attention,
            FfnNorm,
            FfnGate,
            FfnUp,
            FfnDown,
            FfnGateExps,
            FfnUpExps,
            FfnDownExps,
            FfnGateUpExps,
            SharedExpert,
            Router,
            Other,
        ]
    };

    /// A dense (non-expert) FFN projection.
    pub fn is_dense_ffn(self) -> bool {
        matches!(
            self,
            TensorRole::FfnGate | TensorRole::FfnUp | TensorRole::FfnDown
        )
    }

    /// Stacked routed experts: the tensors that can be loaded one expert at a time.
    pub fn is_experts(self) -> bool {
        use TensorRole::*;
        matches!(self, FfnGateExps | FfnUpExps | FfnDownExps | FfnGateUpExps)
    }

    /// A short stable label (`ffn_up`, `attention`, `router`, ...).
    pub fn label(self) -> &'static str {
        use TensorRole::*;
        match self {
            TokenEmbedding => "token_embd",
            Output => "output",
            OutputNorm => "output_norm",
            AttnNorm => "attn_norm",
            Attention => "attention",
            FfnNorm => "ffn_norm",
            FfnGate => "ffn_gate",
            FfnUp => "ffn_up",
            FfnDown => "ffn_down",
            FfnGateExps => "ffn_gate_exps",
            FfnUpExps => "ffn_up_exps",
            FfnDownExps => "ffn_down_exps",
            FfnGateUpExps => "ffn_gate_up_exps",
            SharedExpert => "shared_expert",
            Router => "router",
            Other => "other",
        }
    }
}

impl serde::Serialize for TensorRole {
    /// Serialised as [`TensorRole::label`].
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

impl std::fmt::Display for TensorRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// The role and block index of the tensor called `name`.
pub fn classify(name: &str) -> (TensorRole, Option<u32>) {
    let (layer, rest) = split_layer(name);
    let (base, expert_index) = strip_suffix(rest);
    let role = match (role_of(base), expert_index) {
        // Legacy unstacked experts (`blk.N.ffn_gate.E.weight`) are routed experts too.
        (TensorRole::FfnGate, true) => TensorRole::FfnGateExps,
        (TensorRole::FfnUp, true) => TensorRole::FfnUpExps,
        (TensorRole::FfnDown, true) => TensorRole::FfnDownExps,
        (role, _) => role,
    };
    (role, layer)
}

/// Splits `blk.N.rest` into `(Some(N), rest)`; other names into `(None, name)`.
fn split_layer(name: &str) -> (Option<u32>, &str) {
    let Some(after) = name.strip_prefix("blk.") else {
        return (None, name);
    };
    let Some((num, rest)) = after.split_once('.') else {
        return (None, name);
    };
    match num.parse::<u32>() {
        Ok(n) => (Some(n), rest),
        Err(_) => (None, name),
    }
}

/// Drops the parameter-kind suffix (`.weight`, `.bias`, `.scale`, ...) and a
/// trailing per-expert index (`ffn_gate.3`, the legacy unstacked layout);
/// the flag says whether there was such an index.
fn strip_suffix(base: &str) -> (&str, bool) {
    let base = ["weight", "bias", "scale", "input_scale", "weight_scale"]
        .iter()
        .find_map(|s| base.strip_suffix(s).and_then(|b| b.strip_suffix('.')))
        .unwrap_or(base);
    match base.rsplit_once('.') {
        Some((head, idx)) if !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit()) => {
            (head, true)
        }
        _ => (base, false),
    }
}

/// The role of a suffix-free, layer-free base name.
fn role_of(base: &str) -> TensorRole {
    use TensorRole::*;
    match base {
        "token_embd" => return TokenEmbedding,
        "output" => return Output,
        "output_norm" => return OutputNorm,
        "attn_norm" | "attn_norm_2" | "post_attention_norm" | "attn_post_norm" => return AttnNorm,
        "ffn_gate" => return FfnGate,
        "ffn_up" => return FfnUp,
        "ffn_down" => return FfnDown,
        "ffn_gate_exps" => return FfnGateExps,
        "ffn_up_exps" => return FfnUpExps,
        "ffn_down_exps" => return FfnDownExps,
        "ffn_gate_up_exps" => return FfnGateUpExps,
        "ffn_gate_inp" | "ffn_gate_inp_shexp" | "exp_probs_b" => return Router,
        _ => {}
    }
    if base.starts_with("attn_") {
        Attention
    } else if base.ends_with("_shexp") {
        SharedExpert
    } else if base == "ffn_norm"
        || base.starts_with("post_ffw_norm")
        || base.starts_with("pre_ffw_norm")
    {
        FfnNorm
    } else {
        Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_roles() {
        use TensorRole::*;
        let cases = [
            ("token_embd.weight", TokenEmbedding, None),
            ("output.weight", Output, None),
            ("output_norm.weight", OutputNorm, None),
            ("rope_freqs.weight", Other, None),
            ("blk.0.attn_norm.weight", AttnNorm, Some(0)),
            ("blk.3.attn_q.weight", Attention, Some(3)),
            ("blk.3.attn_qkv.bias", Attention, Some(3)),
            ("blk.3.attn_k_norm.weight", Attention, Some(3)),
            ("blk.3.post_attention_norm.weight", AttnNorm, Some(3)),
            ("blk.12.ffn_norm.weight", FfnNorm, Some(12)),
            ("blk.12.post_ffw_norm.weight", FfnNorm, Some(12)),
            ("blk.0.ffn_up.weight", FfnUp, Some(0)),
            ("blk.0.ffn_gate.weight", FfnGate, Some(0)),
            ("blk.0.ffn_down.weight", FfnDown, Some(0)),
            ("blk.0.ffn_gate.7.weight", FfnGateExps, Some(0)),
            ("blk.1.ffn_gate_exps.weight", FfnGateExps, Some(1)),
            ("blk.1.ffn_up_exps.weight", FfnUpExps, Some(1)),
            ("blk.1.ffn_down_exps.weight", FfnDownExps, Some(1)),
            ("blk.1.ffn_gate_up_exps.weight", FfnGateUpExps, Some(1)),
            ("blk.1.ffn_up_shexp.weight", SharedExpert, Some(1)),
            ("blk.1.ffn_gate_inp.weight", Router, Some(1)),
            ("blk.1.ffn_gate_inp_shexp.weight", Router, Some(1)),
            ("blk.x.ffn_up.weight", Other, None),
        ];
        for (name, role, layer) in cases {
            assert_eq!(classify(name), (role, layer), "{name}");
        }
    }
}
