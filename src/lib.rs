//! loraplex: one frozen base LLM, many LoRA adapters mixed per request.
//!
//! Architecture map (request path first):
//! - [`api`]: the HTTP edge (actix-web) — OpenAI-style routes, auth, the HTTP policy
//!   (`api::guard`: browser origins, `Host` names), request bodies (`api::body`: JSON content
//!   type, size, arrival timeout), JSON parsed and validated into typed requests, errors
//!   converted once into OpenAI's error shape.
//! - [`engine`]: one OS thread owns the model, the KV block pool and the running batch
//!   (continuous batching: prefills join decodes in one ragged step, long prompts in paced
//!   chunks; admission by blocks, preemption, the prefix cache per adapter mix in
//!   `engine::kv_pool`; sequences admitted together share a prompt's prefill); the HTTP side
//!   talks to it through a bounded queue and per-sequence channels; `engine::fault` types how
//!   one sequence fails without its batch.
//! - [`adapters`]: PEFT adapter folders → immutable, validated [`adapters::LoraAdapter`]s, the
//!   hot-loading registry (watcher, LRU budget, versions), per-request
//!   [`adapters::AdapterMix`]es, named mixes served as models (`adapters::mixes`), writing
//!   PEFT folders, export to llama.cpp's GGUF LoRA.
//! - [`model`]: the base model (GGUF or Hugging Face folder; Llama, Mistral, Qwen2, Qwen3,
//!   Phi-3, Gemma 3, BLOOM) —
//!   the architecture description (`config`: rope and its scaling, biases, q/k norms as data),
//!   the one LoRA-aware linear over dense, candle-quantized or packed weights, the one
//!   ragged-batch decoder forward whose ops run fused on the CPU or composed in candle
//!   elsewhere, paged KV caches (16-token blocks, shared read-only when cached), tokenizers (byte-level BPE; SentencePiece from GGUF) and chat
//!   template, sampling, and converters between GGUF and Hugging Face folders (`gguf_export`).
//! - [`kernels`] (the `loraplex-kernels` crate, the only one with `unsafe`): the packed integer
//!   matmul (GGUF blocks decoded without loss; AVX-512 VNNI / AVX-VNNI / AVX2 / scalar), the
//!   fused f32 ops (norms, rope, SiLU·mul, attention, LoRA), the dense f32 matmul, and the
//!   chunked thread pool they share.
//! - [`generate`]: batched generation on the caller's thread (CLI, tests, eval).
//! - [`train`]: `loraplex train` (LoRA on SQuAD against the frozen base, PEFT output) and
//!   `loraplex eval` (SQuAD EM/F1).
//! - [`serve`]: `loraplex serve` — bind, load in the background, drain on SIGTERM.
//! - [`config`]: serve options from flags, `LORAPLEX_*` variables and TOML, validated once.
//! - [`cli`]: the command line (`serve`, `generate`, `bench`, `train`, `eval`, `export-lora`).
//! - [`bench`]: the load generator (loraplex's and llama.cpp's request shapes).
//! - [`metrics`]: Prometheus series (names as constants, bounded adapter labels, gateway series).
//! - [`runtime`]: process-wide settings fixed before any thread starts.
//!
//! Invariant: base weights never change after load; a LoRA delta is computed beside them.
//! Invariant: an adapter is immutable once loaded and shared by `Arc`.
//! Invariant: every fast path (fused CPU ops, packed matmul, batched LoRA) has a reference
//! path and a test that they agree; a row's output never depends on the rest of its batch.
//! Invariant: a fault in one sequence fails that sequence only; a failed step re-queues its
//! sequences rather than dropping them.
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
