//! The Llama-family architecture description shared by every loader (GGUF and Hugging Face
//! folders) and by the forward pass. Invariant: once built, it is never mutated.

use serde::Deserialize;

/// Architecture hyper-parameters of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GQA).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// The smallest config that still exercises GQA, several layers and every projection;
    /// used by the invariant tests and benches on a random model.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 64,
            hidden_size: 16,
            intermediate_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
        }
    }

    /// [`LlamaConfig::tiny`] with widths that are whole 32-blocks (what the packed integer
    /// kernels need): the tiny model of the packed path's invariant tests.
    pub fn tiny_packable() -> Self {
        Self { vocab_size: 96, hidden_size: 64, intermediate_size: 96, num_heads: 4, num_kv_heads: 2, head_dim: 16, ..Self::tiny() }
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
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl From<HfConfigJson> for LlamaConfig {
    fn from(c: HfConfigJson) -> Self {
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
        }
    }
}
