//! The model families, each declared once: what the forward must know about it ([`Arch`]:
//! norms, activation, rope, attention variants, combined modules, biases, tensor naming), the
//! names it goes by in each file format, the fields of each format that vary within it, and
//! what each format may carry that the decoder does not compute (refused by name). Both
//! loaders (`model::hf`, `model::gguf`), the exporter (`model::gguf_export`), the tensor-name
//! tables (`model::names`) and the tiny test models read this table; adding a family is one
//! entry here plus whatever is truly new about it.

use super::config::{Activation, Arch, Naming, NormKind, PositionKind};
use super::Target;

/// How a family names its sliding-window layers when a Hugging Face config gives no
/// `layer_types` (older transformers), and in GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windows {
    /// `sliding_window` (when set) applies to every layer.
    Every,
    /// Qwen: only with `use_sliding_window`, from layer `max_window_layers` on (Hugging Face);
    /// GGUF: every layer when the key is present.
    Qwen,
    /// Gemma 3: every `n`-th layer is global (`sliding_window_pattern`, default `n`), the rest
    /// windowed; the window is required.
    EveryNthGlobal(usize),
}

/// One family.
#[derive(Debug)]
pub struct Family {
    /// Hugging Face `model_type` values (the first is what the exporter writes).
    pub hf: &'static [&'static str],
    /// GGUF `general.architecture`.
    pub gguf: &'static str,
    /// The facts, fixed for the family.
    arch: fn() -> Arch,
    /// A Hugging Face config may switch on q, k, v and o biases (`attention_bias`).
    pub hf_attention_bias: bool,
    /// … and gate, up and down biases (`mlp_bias`).
    pub hf_mlp_bias: bool,
    /// The activation the family computes, as `hidden_act` / `hidden_activation` names it
    /// (`None`: the family's configs do not name it).
    pub hf_activation: Option<&'static str>,
    /// Hugging Face fields this decoder does not compute: refused by name when set (not
    /// null, not false).
    pub hf_refused: &'static [&'static str],
    /// GGUF metadata keys (after `{arch}.`) and tensors the decoder does not compute.
    pub gguf_refused_keys: &'static [&'static str],
    pub gguf_refused_tensors: &'static [&'static str],
    pub windows: Windows,
    /// A GGUF stores this family's biases and q/k norms as tensors the loader finds.
    pub gguf_detects_biases: bool,
}

impl Family {
    /// The family's [`Arch`], named as the file named it.
    pub fn arch(&self, name: &str) -> Arch {
        Arch { name: name.to_string(), ..(self.arch)() }
    }
}

/// Llama's facts (and the baseline the others change).
pub fn llama() -> Arch {
    Arch {
        name: "llama".into(),
        biased: Vec::new(),
        qk_norm: false,
        combined_modules: false,
        norm_plus_one: false,
        gguf_qk_interleaved: true,
        sandwich_norms: false,
        embed_scale: false,
        activation: Activation::Silu,
        query_pre_attn_scalar: None,
        windows: Vec::new(),
        local_rope_theta: None,
        norm: NormKind::Rms,
        embed_norm: false,
        gated: true,
        position: PositionKind::Rope,
        naming: Naming::Llama,
    }
}

/// Qwen2: biases on q, k and v; rope halves paired as Hugging Face stores them.
pub fn qwen2() -> Arch {
    Arch {
        name: "qwen2".into(),
        biased: vec![Target::Q, Target::K, Target::V],
        gguf_qk_interleaved: false,
        ..llama()
    }
}

/// Qwen3: per-head RMS norms on q and k before rope.
pub fn qwen3() -> Arch {
    Arch { name: "qwen3".into(), qk_norm: true, gguf_qk_interleaved: false, ..llama() }
}

/// Phi-3: `qkv_proj` and `gate_up_proj` stored as one module each.
pub fn phi3() -> Arch {
    Arch { name: "phi3".into(), combined_modules: true, gguf_qk_interleaved: false, ..llama() }
}

/// Gemma 3's text decoder: sandwich norms, q/k norms, `1 + w` norms, √hidden embeddings,
/// GELU-tanh, scores scaled by `query_pre_attn_scalar^-1/2` (256 unless the config says),
/// sliding-window layers with a local rope base (10,000 unless the config says).
pub fn gemma3() -> Arch {
    Arch {
        name: "gemma3_text".into(),
        qk_norm: true,
        norm_plus_one: true,
        gguf_qk_interleaved: false,
        sandwich_norms: true,
        embed_scale: true,
        activation: Activation::GeluTanh,
        query_pre_attn_scalar: Some(256.0),
        local_rope_theta: Some(10_000.0),
        ..llama()
    }
}

/// BLOOM: ALiBi instead of rope, LayerNorms with biases (one after the embeddings), biases on
/// every linear, a per-head interleaved `query_key_value`, a gateless GELU-tanh MLP.
pub fn bloom() -> Arch {
    Arch {
        name: "bloom".into(),
        biased: Target::ALL.to_vec(),
        combined_modules: true,
        gguf_qk_interleaved: false,
        activation: Activation::GeluTanh,
        norm: NormKind::Layer,
        embed_norm: true,
        gated: false,
        position: PositionKind::Alibi,
        naming: Naming::Bloom,
        ..llama()
    }
}

const NONE: &[&str] = &[];

/// Every family the decoder serves.
pub static FAMILIES: &[Family] = &[
    Family {
        hf: &["llama", "mistral"],
        gguf: "llama",
        arch: llama,
        hf_attention_bias: true,
        hf_mlp_bias: true,
        hf_activation: Some("silu"),
        hf_refused: NONE,
        gguf_refused_keys: NONE,
        gguf_refused_tensors: NONE,
        windows: Windows::Every,
        gguf_detects_biases: true,
    },
    Family {
        hf: &["mistral"],
        gguf: "mistral",
        arch: llama,
        hf_attention_bias: true,
        hf_mlp_bias: true,
        hf_activation: Some("silu"),
        hf_refused: NONE,
        gguf_refused_keys: NONE,
        gguf_refused_tensors: NONE,
        windows: Windows::Every,
        gguf_detects_biases: true,
    },
    Family {
        hf: &["qwen2"],
        gguf: "qwen2",
        arch: qwen2,
        hf_attention_bias: false,
        hf_mlp_bias: false,
        hf_activation: Some("silu"),
        hf_refused: NONE,
        gguf_refused_keys: NONE,
        gguf_refused_tensors: NONE,
        windows: Windows::Qwen,
        gguf_detects_biases: true,
    },
    Family {
        hf: &["qwen3"],
        gguf: "qwen3",
        arch: qwen3,
        hf_attention_bias: true,
        hf_mlp_bias: false,
        hf_activation: Some("silu"),
        hf_refused: NONE,
        gguf_refused_keys: NONE,
        gguf_refused_tensors: NONE,
        windows: Windows::Qwen,
        gguf_detects_biases: true,
    },
    Family {
        hf: &["phi3"],
        gguf: "phi3",
        arch: phi3,
        hf_attention_bias: true,
        hf_mlp_bias: false,
        hf_activation: Some("silu"),
        hf_refused: NONE,
        gguf_refused_keys: NONE,
        // Phi-3's LongRoPE.
        gguf_refused_tensors: &["rope_factors_long.weight", "rope_factors_short.weight"],
        windows: Windows::Every,
        gguf_detects_biases: true,
    },
    Family {
        hf: &["gemma3_text"],
        gguf: "gemma3",
        arch: gemma3,
        hf_attention_bias: false,
        hf_mlp_bias: false,
        hf_activation: Some("gelu_pytorch_tanh"),
        hf_refused: &[
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "use_bidirectional_attention",
            "attention_bias",
        ],
        gguf_refused_keys: &["attn_logit_softcapping", "final_logit_softcapping"],
        gguf_refused_tensors: NONE,
        windows: Windows::EveryNthGlobal(6),
        gguf_detects_biases: false,
    },
    Family {
        hf: &["bloom"],
        gguf: "bloom",
        arch: bloom,
        hf_attention_bias: false,
        hf_mlp_bias: false,
        hf_activation: None,
        hf_refused: &["apply_residual_connection_post_layernorm"],
        gguf_refused_keys: NONE,
        gguf_refused_tensors: NONE,
        windows: Windows::Every,
        gguf_detects_biases: false,
    },
];

/// The family of a Hugging Face `model_type`, or why it is refused.
pub fn from_hf(model_type: &str) -> Result<&'static Family, String> {
    if model_type == "gemma3" {
        return Err(
            "model_type `gemma3` (the multimodal checkpoint); use its text model (`gemma3_text`)"
                .into(),
        );
    }
    FAMILIES.iter().find(|f| f.hf.contains(&model_type)).ok_or_else(|| {
        let mut all: Vec<&str> = Vec::new();
        for t in FAMILIES.iter().flat_map(|f| f.hf.iter().copied()) {
            if !all.contains(&t) {
                all.push(t);
            }
        }
        format!("model_type `{model_type}`; supported: {}", all.join(", "))
    })
}

/// The family of a GGUF `general.architecture`, or why it is refused.
pub fn from_gguf(arch: &str) -> Result<&'static Family, String> {
    FAMILIES.iter().find(|f| f.gguf == arch).ok_or_else(|| {
        let all: Vec<&str> = FAMILIES.iter().map(|f| f.gguf).collect();
        format!("GGUF architecture `{arch}`; supported: {}", all.join(", "))
    })
}

/// The Hugging Face `model_type` a GGUF architecture is written as.
pub fn hf_model_type(gguf_arch: &str) -> &str {
    from_gguf(gguf_arch).map_or(gguf_arch, |f| f.hf[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_found_by_each_of_its_names() {
        for f in FAMILIES {
            assert!(std::ptr::eq(from_gguf(f.gguf).unwrap(), f), "{}", f.gguf);
            for t in f.hf {
                assert!(from_hf(t).unwrap().hf.contains(t), "{t}");
            }
        }
        assert_eq!(hf_model_type("gemma3"), "gemma3_text");
        assert!(from_hf("gpt2").unwrap_err().contains("supported: llama, mistral, qwen2"));
        assert!(from_gguf("falcon").unwrap_err().contains("bloom"));
        assert_eq!(from_hf("gemma3_text").unwrap().arch("x").query_pre_attn_scalar, Some(256.0));
    }
}
