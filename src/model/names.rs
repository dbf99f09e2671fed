//! Every tensor name, per architecture, in one table (in the spirit of llama.cpp's
//! `llama-arch.cpp`): what each tensor of the decoder is called in a Hugging Face checkpoint
//! (Llama-style `model.layers.N…`, or BLOOM's `transformer.h.N…`), in a GGUF file, and where a
//! projection lives for PEFT. Loaders, exporters and the adapter reader ask this table; no
//! other file spells a tensor name.

use super::config::{Arch, Naming};
use super::{ModuleId, Target};

/// A tensor of the decoder other than a projection, by what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embed,
    /// The norm right after the embeddings (BLOOM).
    EmbedNorm,
    FinalNorm,
    /// The output head (absent where tied to the embeddings).
    LmHead,
    /// Layer `l`'s norm before attention.
    AttnNorm(usize),
    /// Layer `l`'s norm before the MLP.
    MlpNorm(usize),
    /// Layer `l`'s norm of the attention output, before its residual add (Gemma 3).
    AttnOutNorm(usize),
    /// Layer `l`'s norm of the MLP output, before its residual add (Gemma 3).
    MlpOutNorm(usize),
    /// Layer `l`'s per-head norms on q and k (Qwen3, Gemma 3).
    QNorm(usize),
    KNorm(usize),
}

impl Role {
    /// The weight's name in a Hugging Face checkpoint of `arch`.
    pub fn hf(self, arch: &Arch) -> String {
        let bloom = arch.naming == Naming::Bloom;
        let layer = |l: usize, what: &str| match bloom {
            true => format!("transformer.h.{l}.{what}.weight"),
            false => format!("model.layers.{l}.{what}.weight"),
        };
        match self {
            Role::Embed if bloom => "transformer.word_embeddings.weight".into(),
            Role::Embed => "model.embed_tokens.weight".into(),
            Role::EmbedNorm if bloom => "transformer.word_embeddings_layernorm.weight".into(),
            Role::EmbedNorm => "model.embed_norm.weight".into(),
            Role::FinalNorm if bloom => "transformer.ln_f.weight".into(),
            Role::FinalNorm => "model.norm.weight".into(),
            Role::LmHead => "lm_head.weight".into(),
            Role::AttnNorm(l) => layer(l, "input_layernorm"),
            // Gemma calls the MLP's input norm `pre_feedforward_layernorm`; its
            // `post_attention_layernorm` is the attention output's.
            Role::MlpNorm(l) if arch.sandwich_norms => layer(l, "pre_feedforward_layernorm"),
            Role::MlpNorm(l) => layer(l, "post_attention_layernorm"),
            Role::AttnOutNorm(l) => layer(l, "post_attention_layernorm"),
            Role::MlpOutNorm(l) => layer(l, "post_feedforward_layernorm"),
            Role::QNorm(l) => layer(l, "self_attn.q_norm"),
            Role::KNorm(l) => layer(l, "self_attn.k_norm"),
        }
    }

    /// The module that holds the weight, as PEFT names it (`model.embed_tokens`, `lm_head`).
    pub fn module_path(self, arch: &Arch) -> String {
        let name = self.hf(arch);
        name.strip_suffix(".weight").unwrap_or(&name).to_string()
    }

    /// The weight's name in a GGUF file (llama.cpp's names; the same for every architecture).
    pub fn gguf(self) -> String {
        match self {
            Role::Embed => "token_embd.weight".into(),
            Role::EmbedNorm => "token_embd_norm.weight".into(),
            Role::FinalNorm => "output_norm.weight".into(),
            Role::LmHead => "output.weight".into(),
            Role::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Role::MlpNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Role::AttnOutNorm(l) => format!("blk.{l}.post_attention_norm.weight"),
            Role::MlpOutNorm(l) => format!("blk.{l}.post_ffw_norm.weight"),
            Role::QNorm(l) => format!("blk.{l}.attn_q_norm.weight"),
            Role::KNorm(l) => format!("blk.{l}.attn_k_norm.weight"),
        }
    }

    /// Every norm a model of `arch` with `layers` layers has, in load order.
    pub fn norms(arch: &Arch, layers: usize) -> Vec<Role> {
        let mut out = Vec::new();
        for l in 0..layers {
            out.extend([Role::AttnNorm(l), Role::MlpNorm(l)]);
            if arch.sandwich_norms {
                out.extend([Role::AttnOutNorm(l), Role::MlpOutNorm(l)]);
            }
            if arch.qk_norm {
                out.extend([Role::QNorm(l), Role::KNorm(l)]);
            }
        }
        out.push(Role::FinalNorm);
        if arch.embed_norm {
            out.push(Role::EmbedNorm);
        }
        out
    }
}

/// The name of a weight's bias beside it (`….weight` → `….bias`).
pub fn bias_of(weight: &str) -> String {
    match weight.strip_suffix(".weight") {
        Some(stem) => format!("{stem}.bias"),
        None => format!("{weight}.bias"),
    }
}

/// A projection's tensor in a GGUF file (`what`: `weight` or `bias`).
pub fn gguf_projection(id: ModuleId, what: &str) -> String {
    let t = match id.target {
        Target::Q => "attn_q",
        Target::K => "attn_k",
        Target::V => "attn_v",
        Target::O => "attn_output",
        Target::Gate => "ffn_gate",
        Target::Up => "ffn_up",
        Target::Down => "ffn_down",
    };
    format!("blk.{}.{t}.{what}", id.layer)
}

/// The GGUF tensor of a layer's combined q/k/v (`attn_qkv`: Phi-3, BLOOM).
pub fn gguf_qkv(layer: usize, what: &str) -> String {
    format!("blk.{layer}.attn_qkv.{what}")
}

/// The GGUF tensor of a layer's combined gate/up (`ffn_up` holding `[gate | up]`: Phi-3).
pub fn gguf_gate_up(layer: usize) -> String {
    format!("blk.{layer}.ffn_up.weight")
}

/// Where projection `id` lives in a Hugging Face checkpoint of `arch` (and so in PEFT): the
/// module path of the stored module (a combined one where the architecture stores it so).
pub fn module_path(arch: &Arch, id: ModuleId) -> String {
    let l = id.layer;
    if arch.naming == Naming::Bloom {
        let name = match id.target {
            Target::Q | Target::K | Target::V => "self_attention.query_key_value",
            Target::O => "self_attention.dense",
            Target::Up => "mlp.dense_h_to_4h",
            Target::Down => "mlp.dense_4h_to_h",
            // No such module: a path no selector can name.
            Target::Gate => "mlp.<no gate>",
        };
        return format!("transformer.h.{l}.{name}");
    }
    let parent = id.target.parent();
    match id.target {
        Target::Q | Target::K | Target::V if arch.combined_modules => {
            format!("model.layers.{l}.{parent}.qkv_proj")
        }
        Target::Gate | Target::Up if arch.combined_modules => {
            format!("model.layers.{l}.{parent}.gate_up_proj")
        }
        _ => format!("model.layers.{l}.{parent}.{}", id.target.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_each_architecture() {
        let (llama, bloom) = (crate::model::family::llama(), crate::model::family::bloom());
        let gemma = Arch { sandwich_norms: true, ..crate::model::family::llama() };
        assert_eq!(Role::MlpNorm(3).hf(&llama), "model.layers.3.post_attention_layernorm.weight");
        assert_eq!(Role::MlpNorm(3).hf(&gemma), "model.layers.3.pre_feedforward_layernorm.weight");
        assert_eq!(
            Role::AttnOutNorm(3).hf(&gemma),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(Role::MlpNorm(3).gguf(), "blk.3.ffn_norm.weight");
        assert_eq!(Role::FinalNorm.hf(&bloom), "transformer.ln_f.weight");
        assert_eq!(Role::AttnNorm(0).hf(&bloom), "transformer.h.0.input_layernorm.weight");
        assert_eq!(bias_of(&Role::FinalNorm.hf(&bloom)), "transformer.ln_f.bias");
        let q = ModuleId { layer: 2, target: Target::Q };
        assert_eq!(module_path(&llama, q), "model.layers.2.self_attn.q_proj");
        assert_eq!(
            module_path(&Arch { combined_modules: true, ..crate::model::family::llama() }, q),
            "model.layers.2.self_attn.qkv_proj"
        );
        assert_eq!(module_path(&bloom, q), "transformer.h.2.self_attention.query_key_value");
        assert_eq!(gguf_projection(q, "bias"), "blk.2.attn_q.bias");
    }
}
