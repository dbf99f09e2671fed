//! The decoder's architecture description shared by every loader (GGUF and Hugging Face
//! folders) and by the forward pass: sizes, rope, and the per-family differences ([`Arch`])
//! as data, so that one forward serves every family. Invariant: once built, never mutated.

use serde::Deserialize;

/// Architecture hyper-parameters of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GQA).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub arch: Arch,
}

/// What distinguishes one decoder family from Llama, as values the forward reads. Each
/// family's values are declared once, in [`super::family`].
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    /// The family as its files name it (`model_type` / `general.architecture`): reported by
    /// `/v1/models`.
    pub name: String,
    /// Projections with an additive bias (Qwen2: q, k, v; Llama's `attention_bias`: q, k, v, o).
    pub biased: Vec<super::Target>,
    /// Per-head RMS norms on q and k before rope (Qwen3).
    pub qk_norm: bool,
    /// The checkpoint stores q, k and v as one module (`qkv_proj`, rows `[q | k | v]`; BLOOM's
    /// `query_key_value`) and gate and up as one (`gate_up_proj`, rows `[gate | up]`), as Phi-3
    /// does: the model splits the weights into its seven projections, and a PEFT adapter on a
    /// combined module is split the same way.
    pub combined_modules: bool,
    /// Norms scale by `1 + w` (Gemma: a Hugging Face checkpoint stores `w`, a GGUF `1 + w`).
    pub norm_plus_one: bool,
    /// llama.cpp's converter interleaves the two rotary halves of every Q/K head's rows in the
    /// GGUF (it does for the Llama family only: Qwen's rope pairs the halves as Hugging Face).
    pub gguf_qk_interleaved: bool,
    /// Norms on the attention and MLP outputs before their residual adds (Gemma 3's
    /// `post_attention_layernorm` / `post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// Embeddings multiplied by √hidden (Gemma).
    pub embed_scale: bool,
    /// The gated MLP's activation: `down(act(gate) · up)`.
    pub activation: Activation,
    /// Attention scores scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Per layer: the sliding window (keys a query sees, itself included) or `None` for full
    /// attention.
    pub windows: Vec<Option<usize>>,
    /// The rope base of sliding-window layers, where it differs from the global one (Gemma 3).
    pub local_rope_theta: Option<f64>,
    /// RMS norms (`x̂ · w`), or LayerNorms with a bias (BLOOM).
    pub norm: NormKind,
    /// A norm right after the embeddings (BLOOM's `word_embeddings_layernorm`).
    pub embed_norm: bool,
    /// `down(act(gate) · up)`; without a gate (BLOOM) the MLP is `down(act(up))`.
    pub gated: bool,
    /// How positions enter attention.
    pub position: PositionKind,
    /// Checkpoint tensor names: Llama's `model.layers.N…` or BLOOM's `transformer.h.N…`.
    pub naming: Naming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    /// Mean-centred, with a bias.
    Layer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    Rope,
    /// A per-head linear bias on the scores (`slope_h · key position`), no rope.
    Alibi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Llama,
    Bloom,
}

/// The activation of a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Arch {
    /// Whether the model has projection `t` (a gateless MLP has no `gate_proj`).
    pub fn has_target(&self, t: super::Target) -> bool {
        t != super::Target::Gate || self.gated
    }

    /// ALiBi slopes per head (the kernel crate's, shared by both attention paths).
    pub fn alibi_slopes(heads: usize) -> Vec<f32> {
        crate::kernels::fused::alibi_slopes(heads)
    }

    /// The window of `layer` (`None`: full causal attention).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.windows.get(layer).copied().flatten()
    }
}

/// Where a projection lives in the checkpoint and in PEFT: its module path and, for a combined
/// module, which of its output rows are this projection's.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredModule {
    pub path: String,
    /// This projection's rows of the stored module, in order.
    pub rows: Vec<usize>,
    /// Rows of the whole stored module.
    pub out: usize,
}

impl Arch {
    pub fn has_bias(&self, t: super::Target) -> bool {
        self.biased.contains(&t)
    }
}

/// How the rotary frequencies `θ^(-2i/d)` are rescaled: a field that changes every position's
/// encoding, so each variant is computed exactly or refused by the loaders, never dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.x (`rope_type: "llama3"`): wavelengths longer than `original / low_freq_factor`
    /// are stretched by `factor`, those shorter than `original / high_freq_factor` kept, and the
    /// band between interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency, as GGUF files store Llama 3.x scaling (`rope_freqs.weight`).
    Divisors(Vec<f32>),
    /// Every frequency divided by `factor` (`rope_type: "linear"`, position interpolation).
    Linear(f64),
}

impl DecoderConfig {
    /// The `head_dim / 2` inverse frequencies of the rotary encoding, scaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        // f32 throughout, as transformers computes them.
        let base: Vec<f32> = (0..half)
            .map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / self.head_dim as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Divisors(d) => base
                .iter()
                .zip(d.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, d)| f / d)
                .collect(),
            &RopeScaling::Linear(factor) => base.iter().map(|f| f / factor as f32).collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, low, high, old) =
                    (factor as f32, low_freq_factor as f32, high_freq_factor as f32, old as f32);
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The stored (and PEFT) module that holds projection `id`.
    pub fn stored_module(&self, id: super::ModuleId) -> StoredModule {
        use super::Target::*;
        let (q, kv, ff, hd) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
            self.head_dim,
        );
        let out = self.proj_dims(id.target).1;
        let path = super::names::module_path(&self.arch, id);
        if self.arch.naming == Naming::Bloom {
            // One `query_key_value` whose rows are grouped per head: `[h][q, k, v][head_dim]`.
            let part = |which: usize| {
                (0..self.num_heads)
                    .flat_map(|h| (3 * h + which) * hd..(3 * h + which + 1) * hd)
                    .collect()
            };
            let module =
                |rows: Vec<usize>, out: usize| StoredModule { path: path.clone(), rows, out };
            return match id.target {
                Q => module(part(0), 3 * q),
                K => module(part(1), 3 * q),
                V => module(part(2), 3 * q),
                O | Up | Down => module((0..out).collect(), out),
                Gate => module(Vec::new(), 0),
            };
        }
        let combined = |rows: std::ops::Range<usize>, out: usize| StoredModule {
            path: path.clone(),
            rows: rows.collect(),
            out,
        };
        match id.target {
            Q if self.arch.combined_modules => combined(0..q, q + 2 * kv),
            K if self.arch.combined_modules => combined(q..q + kv, q + 2 * kv),
            V if self.arch.combined_modules => combined(q + kv..q + 2 * kv, q + 2 * kv),
            Gate if self.arch.combined_modules => combined(0..ff, 2 * ff),
            Up if self.arch.combined_modules => combined(ff..2 * ff, 2 * ff),
            _ => StoredModule { path, rows: (0..out).collect(), out },
        }
    }

    /// The projections this model has, in [`ModuleId::all`] order.
    pub fn projections(&self) -> impl Iterator<Item = super::ModuleId> + '_ {
        super::ModuleId::all(self.num_layers).filter(|id| self.arch.has_target(id.target))
    }

    /// Input and output width of a projection, as `(in, out)`.
    pub fn proj_dims(&self, target: super::Target) -> (usize, usize) {
        use super::Target::*;
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        match target {
            Q => (h, q),
            K | V => (h, kv),
            O => (q, h),
            Gate | Up => (h, self.intermediate_size),
            Down => (self.intermediate_size, h),
        }
    }
}

/// The subset of a Hugging Face `config.json` we read.
#[derive(Debug, Deserialize)]
pub struct HfConfigJson {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// BLOOM has none: its MLP is 4 · hidden.
    pub intermediate_size: Option<usize>,
    #[serde(alias = "n_layer")]
    pub num_hidden_layers: usize,
    #[serde(alias = "n_head")]
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps", alias = "layer_norm_epsilon")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl HfConfigJson {
    pub fn into_config(
        self,
        rope_theta: f64,
        rope_scaling: RopeScaling,
        arch: Arch,
    ) -> DecoderConfig {
        let c = self;
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        DecoderConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size.unwrap_or(4 * c.hidden_size),
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            arch,
        }
    }
}

/// The rotary settings of a Hugging Face `config.json`, in either layout: transformers 5's
/// `rope_parameters: {rope_type, rope_theta, …}` or transformers 4's top-level `rope_theta` and
/// `rope_scaling: {rope_type | type, …}`. A type this decoder does not compute is refused by name.
pub fn rope_from_hf(raw: &serde_json::Value) -> Result<(f64, RopeScaling), String> {
    // transformers 5 writes one dict per attention type for models that have two (Gemma 3):
    // the global settings are `full_attention`'s.
    if let Some(full) = raw.get("rope_parameters").and_then(|p| p.get("full_attention")) {
        let mut flat = raw.clone();
        if let Some(o) = flat.as_object_mut() {
            o.insert("rope_parameters".into(), full.clone());
        }
        return rope_from_hf(&flat);
    }
    let (key, p) = match (
        raw.get("rope_parameters").filter(|v| !v.is_null()),
        raw.get("rope_scaling").filter(|v| !v.is_null()),
    ) {
        (Some(p), _) => ("rope_parameters", p),
        (None, Some(s)) => ("rope_scaling", s),
        (None, None) => ("rope_parameters", &serde_json::Value::Null),
    };
    if !p.is_null() && !p.is_object() {
        return Err(format!("`{key}` must be an object, got {p}"));
    }
    let theta = match p.get("rope_theta").or_else(|| raw.get("rope_theta")) {
        None => 10_000.0,
        Some(v) => v
            .as_f64()
            .filter(|t| *t > 0.0)
            .ok_or_else(|| format!("`rope_theta` must be a positive number, got {v}"))?,
    };
    let kind =
        p.get("rope_type").or_else(|| p.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let num = |field: &str| -> Result<f64, String> {
        p.get(field).and_then(|v| v.as_f64()).filter(|v| v.is_finite() && *v > 0.0).ok_or_else(
            || format!("`{key}.{field}` must be a positive number for rope type `{kind}`"),
        )
    };
    if let Some(f) = p.get("partial_rotary_factor").or_else(|| raw.get("partial_rotary_factor")) {
        if f.as_f64() != Some(1.0) {
            return Err(format!("`partial_rotary_factor` {f} is not supported (only 1.0)"));
        }
    }
    let scaling = match kind {
        "default" => RopeScaling::None,
        "llama3" => {
            let (low_freq_factor, high_freq_factor) =
                (num("low_freq_factor")?, num("high_freq_factor")?);
            if high_freq_factor <= low_freq_factor {
                return Err(format!("`{key}.high_freq_factor` must exceed `low_freq_factor`"));
            }
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }
        }
        "linear" => RopeScaling::Linear(num("factor")?),
        other => {
            return Err(format!(
            "rope type `{other}` (`{key}`) is not supported; supported: default, linear, llama3"
        ))
        }
    };
    Ok((theta, scaling))
}

/// The rope base of sliding-window layers, where the config gives one of its own: transformers
/// 5's `rope_parameters.sliding_attention` (default type only) or 4's `rope_local_base_freq`.
pub fn local_rope_theta_from_hf(raw: &serde_json::Value) -> Result<Option<f64>, String> {
    if let Some(p) = raw.get("rope_parameters").and_then(|p| p.get("sliding_attention")) {
        let kind = p.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
        if kind != "default" {
            return Err(format!("rope type `{kind}` for sliding-window layers is not supported"));
        }
        return p
            .get("rope_theta")
            .and_then(|v| v.as_f64())
            .filter(|t| *t > 0.0)
            .map(Some)
            .ok_or_else(|| {
                "`rope_parameters.sliding_attention.rope_theta` must be a positive number"
                    .to_string()
            });
    }
    Ok(raw.get("rope_local_base_freq").and_then(|v| v.as_f64()))
}
