//! LoRA adapters in the Hugging Face PEFT format, as files: config parsing and validation,
//! loading the safetensors weights checked against the base model (the embedding and head parts
//! in `vocab`), writing PEFT folders and
//! llama.cpp's GGUF LoRA, the hot-loading registry and named mixes. What the model computes with
//! (the weights, mixes, a step's operands) is `model::lora`'s; its types are re-exported here.

pub mod algebra;
pub mod config;
pub mod gguf_lora;
pub mod header;
pub mod loader;
pub mod mixes;
pub mod registry;
pub mod synth;
pub mod vocab;
pub mod watcher;
pub mod writer;

pub use config::PeftConfig;
pub use loader::{load_adapter, load_adapter_on};

pub use crate::model::lora::{AdapterMix, HostLoraWeights, LoraAdapter, LoraWeights, MixEntry};

/// Errors from reading or validating a PEFT adapter folder.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("i/o error on `{path}`: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid `adapter_config.json`: {0}")]
    ConfigJson(String),
    #[error("unsupported adapter: {0}")]
    Unsupported(String),
    #[error("invalid adapter weights: {0}")]
    Weights(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}
