//! The frozen base model: the architecture description (`config`), the loader trait and weight
//! conversions (`weights`), weight loading (GGUF or Hugging Face folder) and writing
//! (`gguf_export`), the one LoRA-aware linear layer, the one decoder forward over ragged batches
//! (`decoder`, its attention in `attention`, its execution mode an [`Exec`]), KV caches, the
//! tokenizer (byte-level BPE, or SentencePiece from GGUF in `spm`) and chat template, sampling,
//! and the test and bench constructors (`fixtures`).
//!
//! Invariant: base weights are created once by a loader and never written afterwards; every
//! per-request change (LoRA deltas) is computed beside them, never into them.

mod attention;
pub mod config;
pub mod decoder;
pub mod device;
pub mod diffops;
pub mod family;
pub mod fixtures;
pub mod frozen;
pub mod gguf;
pub mod gguf_export;
pub mod hf;
pub mod kv_cache;
pub mod linear;
pub mod load;
pub mod lora;
pub mod names;
pub mod ops;
pub mod random;
pub mod sampling;
pub mod spm;
pub mod tokenizer;
pub mod weights;

pub use config::{Activation, Arch, DecoderConfig, RopeScaling, StoredModule};
pub use decoder::{BatchInput, Decoder, FrozenProjections};
pub use device::{parse_device, WeightFormat};
pub use kv_cache::SeqCache;
pub use linear::{BaseWeight, LoraLinear, Pass};
pub use lora::StepLora;
pub use ops::Exec;

use std::fmt;

/// Errors from loading or running the base model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("i/o error on `{path}`: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing `{key}` in {what}")]
    Missing { key: String, what: String },
    #[error("invalid model file `{path}`: {reason}")]
    Invalid { path: String, reason: String },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("invalid device `{0}`: expected cpu, cuda[:N] or metal")]
    Device(String),
    #[error("CUDA device {ordinal} is unavailable: {reason}")]
    CudaUnavailable { ordinal: usize, reason: String },
    #[error("invalid dtype `{0}`: expected auto, packed, f32, bf16, f16, quantized, q8_0 or q4_0")]
    DType(String),
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("model download failed: {0}")]
    Download(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Rows `rows` of `t` (a projection's part of a fused stored module): the tensor itself when
/// they are all of it in order, a narrow view when contiguous, a gather otherwise.
pub fn select_rows(
    t: &candle_core::Tensor,
    rows: &[usize],
) -> candle_core::Result<candle_core::Tensor> {
    let n = t.dim(0)?;
    let contiguous = rows.windows(2).all(|w| w[1] == w[0] + 1);
    match rows.first() {
        Some(&0) if contiguous && rows.len() == n => Ok(t.clone()),
        Some(&start) if contiguous => t.narrow(0, start, rows.len())?.contiguous(),
        _ => {
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            t.index_select(&candle_core::Tensor::from_vec(idx, rows.len(), t.device())?, 0)
        }
    }
}

/// The seven linear projections of a Llama block that LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] =
        [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// The module's short name as Hugging Face and PEFT spell it.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The parent module (`self_attn` or `mlp`) in the Hugging Face module tree.
    pub fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One targetable linear layer: `(layer, projection)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModuleId {
    pub layer: usize,
    pub target: Target,
}

impl ModuleId {
    /// Dense index for per-module tables of `num_layers * 7` entries.
    pub fn index(self) -> usize {
        self.layer * Target::ALL.len() + self.target.index()
    }

    pub fn all(num_layers: usize) -> impl Iterator<Item = ModuleId> {
        (0..num_layers)
            .flat_map(|layer| Target::ALL.into_iter().map(move |target| ModuleId { layer, target }))
    }

    pub fn count(num_layers: usize) -> usize {
        num_layers * Target::ALL.len()
    }
}

impl fmt::Display for ModuleId {
    /// The full Hugging Face module name, e.g. `model.layers.3.self_attn.q_proj`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model.layers.{}.{}.{}", self.layer, self.target.parent(), self.target.name())
    }
}
