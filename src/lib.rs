//! loraplex: one frozen base LLM, many LoRA adapters mixed per request.
//!
//! Architecture map:
//! - [`model`]: the base model (GGUF or Hugging Face folder), the LoRA-aware linear layer,
//!   the ragged-batch Llama forward, KV caches, tokenizer/chat template, sampling.
//! - [`adapters`]: PEFT adapter folders → immutable, validated [`adapters::LoraAdapter`]s and
//!   per-request [`adapters::AdapterMix`]es.
//! - [`generate`]: batched prefill + decode with stop conditions and log-probabilities.
//! - [`cli`]: the command line (`generate`, …).
//!
//! Invariant: base weights never change after load; a LoRA delta is computed beside them.
//! Invariant: an adapter is immutable once loaded and shared by `Arc`.
#![deny(unsafe_code)]

pub mod adapters;
pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod generate;
pub use loraplex_kernels as kernels;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod serve;
pub mod train;
