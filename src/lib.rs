//! loraplex: one frozen base LLM, many LoRA adapters mixed per request.
//!
//! # One request, handler to kernels
//!
//! From the handler to the kernels, a completion passes through 11 files:
//! `api::handlers` → `api::validate` (the typed `ValidRequest`) → `engine::worker` (the engine
//! thread) → `engine::scheduler` (the step's plan) → `engine::batcher` (one ragged step) →
//! `model::decoder` → `model::attention` → `model::linear` (the LoRA-aware linear) →
//! `model::lora::step` (the step's deltas) → `kernels::matmul` and `kernels::fused`. Before the
//! handler it passes `api::routes` (the table), `api::guard` (hosts, auth, origins) and `api::body` (the JSON
//! body); its tokens come back through `engine::sequence` and `api::stream` + `api::response`.
//!
//! # Every module
//!
//! - [`api`]: the HTTP edge (actix-web): the shared state, auth.
//!   - `api::routes`: the route table: every endpoint once (method, path, access, cross-origin
//!     policy, metrics label, wire format, handler); registration, auth, the origin guard,
//!     metrics and the access log read it.
//!   - `api::guard`: who may call the route (from the table), browser origins (CORS, off by
//!     default; never for the routes the table keeps same-origin) and `Host`
//!     names on a keyless loopback server (DNS rebinding).
//!   - `api::body`: JSON request bodies: `Content-Type`, size limit, arrival timeout, parsing
//!     with the failing field named; keeps an unread body from holding its connection.
//!   - `api::handlers`: thin handlers (validate off the async workers, submit, respond;
//!     models, adapters, health, metrics).
//!   - `api::context`: the `ModelView` every validator reads (model, tokenizer, grammars,
//!     registry, limits) and how refusals write numbers; below all the validators.
//!   - `api::validate`: wire requests → a complete `ValidRequest` (every sequence with its
//!     adapter mix, and the answer's shape), checked in the types the engine computes with;
//!     adapters resolved through the registry passed in.
//!   - `api::response`: the answer's shape, ids, timestamps, finish reasons, the one usage
//!     count, the JSON bodies and each SSE chunk.
//!   - `api::chat`: a chat request's prompt: messages (tool calls and results included) and
//!     `tools` through the model's template (or the generic tool prompt), and the grammar a
//!     forced call needs.
//!   - `api::responses`: stateless `/v1/responses`: translated into a chat request, answered
//!     as a `response` object or the Responses stream events.
//!   - `api::rules`: the sampling fields beyond OpenAI's core (`logit_bias`, `min_p`,
//!     `repetition_penalty`, `min_tokens`, `stop_token_ids`) → the engine's logit rules.
//!   - `api::structured`: `response_format` and vLLM's `structured_outputs` → one compiled
//!     constraint (errors name the field and llguidance's reason).
//!   - `api::adapter_files`: adapter weights over HTTP (admin): a PEFT adapter uploaded as one
//!     safetensors body (its config in the header's metadata), any resident version downloaded
//!     byte for byte.
//!   - `api::training`: the training-client routes (admin): create, `forward_backward`,
//!     `optim_step`, `save`, `sample`; bodies checked into `online`'s typed values.
//!   - `api::merges`: the admin adapter-algebra routes (`/v1/adapters/merge`,
//!     `/v1/adapters/{name}/compress`): write the new folder and register it.
//!   - `api::fine_tuning`: OpenAI's `/v1/files` (multipart uploads) and
//!     `/v1/fine_tuning/jobs` routes over [`finetune`].
//!   - `api::ui`: the playground page (`/ui`, three framework-free files from `ui/` compiled
//!     in, same-origin only by its Content-Security-Policy) and `POST /v1/mixes`.
//!   - `api::vllm`: vLLM's endpoints (`/tokenize`, `/detokenize`, `/v1/load_lora_adapter`,
//!     `/v1/unload_lora_adapter`) in vLLM's shapes.
//!   - `api::openai`: OpenAI wire types (serde) and the `adapters` extension.
//!   - `api::stream`: moves token events: collected into one answer, or streamed.
//!   - `api::observe`: request ids, tracing spans, access log, per-request metrics.
//!   - `api::error`: the one error type of the edge, in OpenAI's shape; a panic in a handler
//!     is a generic 500 (its message logged).
//! - [`engine`]: one OS thread owns the model, the KV block pool and the running batch; the
//!   HTTP side submits over a channel, admitted up to `max_waiting` queued sequences (429
//!   beyond, 422 for a request that could never fit), and reads each sequence's events.
//!   - `engine::worker`: the engine thread and its handle (`Engine::submit_all`); it runs
//!     background work (fine-tuning passes, [`engine::Background`]) on the same model.
//!   - `engine::scheduler`: the step's decisions as a pure function of views of the batch,
//!     the queue and the pool (preemption, refusal, deferral for a shared prefix, admission,
//!     feeds), property-tested on its own; and when a background slice runs.
//!   - `engine::batcher`: executes the plan (blocks, prefix cache, queue), runs the forward and
//!     each row's token; a row's fault fails that sequence only, a failed step re-queues its
//!     sequences.
//!   - `engine::sequence`: one sequence's life: logit rules, its grammar's mask, sampling,
//!     stop conditions, streamed text.
//!   - `engine::masks`: constrained rows' token masks, computed on helper threads beside the
//!     step's forward.
//!   - `engine::kv_pool`: the block budget and the prefix cache keyed by tokens and mix.
//!   - `engine::fault`: typed per-sequence failures and the test-only fault injection.
//! - [`adapters`]: PEFT adapter folders: reading, checking, writing, the registry, named mixes
//!   (it builds `model::lora` types; `model` never depends on it).
//!   - `adapters::config`: `adapter_config.json` → [`adapters::PeftConfig`] (unsupported
//!     fields refused by name; numbers checked as f32).
//!   - `adapters::header`: the safetensors header check before any weight is read.
//!   - `adapters::loader`: a folder → an immutable [`model::lora::LoraAdapter`], checked
//!     against the base model.
//!   - `adapters::vocab`: an adapter's embedding and output-head parts from its file (LoRA
//!     there, `modules_to_save` copies, trainable tokens; PEFT's saved base copies checked).
//!   - `adapters::registry`: name → adapter for every folder of the root: versions, lazy
//!     loads, LRU within a byte budget, failed folders with their errors.
//!   - `adapters::watcher`: filesystem events and rescans keep the registry in sync.
//!   - `adapters::mixes`: named mixes (`mixes.toml`, the `mix` option) served as models.
//!   - `adapters::writer`: writing PEFT folders (training output, synthetic adapters).
//!   - `adapters::synth`: synthetic random adapters for benchmarks and tests.
//!   - `adapters::gguf_lora`: export to llama.cpp's GGUF LoRA format.
//!   - `adapters::algebra`: PEFT's `add_weighted_adapter` (every `combination_type`) and rank
//!     compression by truncated SVD, over registry adapters, as a new PEFT folder.
//! - [`model`]: the frozen base model (GGUF or Hugging Face folder; Llama, Mistral, Qwen2,
//!   Qwen3, Phi-3, Gemma 3, BLOOM).
//!   - `model::config`: the architecture as data (norms, biases, positions, windows, MLP,
//!     naming), from `config.json` or GGUF metadata, unsupported fields refused by name.
//!   - `model::family`: the table of families (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3,
//!     BLOOM), each declared once: its facts, its names in each format, what varies within
//!     it and what each format may carry that is refused; both loaders, the exporter and the
//!     tiny test models read it.
//!   - `model::decoder`: the one ragged-batch decoder forward for every family, its ops run as
//!     the [`model::Exec`] each forward is given (serving: the inference mode chosen at load,
//!     fused CPU kernels or composed candle ops; a training step passes the differentiable
//!     one down its own calls, never through shared state); `model::attention`: its attention (rope, KV append,
//!     causal / windowed / ALiBi attention), fused or composed.
//!   - `model::weights`: the loader trait every weight format implements and the conversions
//!     into base weights (dense, candle-quantized, packed).
//!   - `model::names`: every tensor-name table (Hugging Face, GGUF, PEFT module paths) per
//!     architecture, one `Role` per weight, in the spirit of llama.cpp's `llama-arch.cpp`.
//!   - `model::fixtures`: tiny random models and reference copies for tests and benches.
//!   - `model::linear`: the one LoRA-aware linear over dense, candle-quantized or packed
//!     weights.
//!   - `model::lora`: LoRA as the model computes it, in one place: `model::lora::weights` (a
//!     loaded adapter's `A`, `B` and scalings), `model::lora::dora` (DoRA's magnitudes and the
//!     row products its weight norms come from), `model::lora::mix` (a request's mix and its
//!     `c_i = s_i · alpha_i / r_i` terms), `model::lora::step` (one step's operands: batched fast
//!     paths and the per-row reference), `model::lora::vocab` (LoRA and replaced rows on the
//!     embedding and the head, and the mixes PEFT cannot apply), `model::lora::train_linear` (a
//!     training step's plain LoRA projection as one graph node with its own backward).
//!   - `model::ops`: the ops between matmuls, fused on the CPU or composed in candle.
//!   - `model::kv_cache`: paged per-sequence KV caches (16-token blocks, shared read-only).
//!   - `model::sampling`: the logit rules (`logit_bias`, `min_tokens`, penalties), greedy and
//!     seeded sampling (`min_p`, top-k, top-p), log-probabilities.
//!   - `model::tokenizer`: tokenizers (byte-level BPE) and the chat template, whose content is
//!     tokenized as text (only the template's markup yields control tokens); `model::spm`:
//!     SentencePiece vocabularies from GGUF.
//!   - `model::load`: resolving `--model` into a model and tokenizer; `model::gguf` and
//!     `model::hf`: the two weight formats; `model::gguf_export`: GGUF ↔ Hugging Face folders.
//!   - `model::device`: `--device` and `--dtype`.
//!   - `model::random`: seeded random weights (tiny models for tests and benches).
//!   - `model::frozen` and `model::diffops`: the differentiable pieces training needs (a
//!     frozen matmul whose backward skips the weight, through an 8-bit transpose for packed
//!     weights; fused norm, rope, softmax and `silu · up` with backward).
//! - [`structured`]: structured outputs: a constraint (JSON schema, JSON object, regex, choice,
//!   Lark grammar) compiled by llguidance against the served tokenizer, cached by its text;
//!   `structured::limits`: the bounds checked before compiling (bytes, subschemas,
//!   properties, definitions, depth, tools), each refusal naming its bound;
//!   `structured::compiler`: the compile threads (large stacks, a time budget, panics caught,
//!   one-line errors); `structured::cache`: the compiled grammars, bounded by measured bytes;
//!   `structured::keywords`: the JSON Schema keywords allowed (enforced or annotations);
//!   `structured::tools`: tool-call formats per family, their grammars, reading calls back, the
//!   generic tool prompt.
//! - [`kernels`] (the `loraplex-kernels` crate, the only one with `unsafe`): `kernels::packed`
//!   (the packed layout, f16 or f32 scales, and its scalar reference), `kernels::ggml` (GGUF
//!   blocks decoded without loss), `kernels::acts` (activations quantized per 32 values),
//!   `kernels::matmul` and `kernels::x86` (the integer matmul, one weight or several sharing
//!   an input in one job: AVX-512 VNNI / AVX-VNNI / AVX2 / scalar), `kernels::probe` (the
//!   host's read bandwidth, which bounds batch-1 decode),
//!   `kernels::dense` (the dense f32 matmul), `kernels::fused` (norms, rope, SiLU·mul,
//!   attention, LoRA), `kernels::pool` (the chunked thread pool), `kernels::alloc` (the global
//!   allocator with a per-thread tally: what a piece of work left allocated).
//! - [`train`]: `loraplex train` and `eval`: `train::data` (chat, prompt/completion and SQuAD
//!   files told apart by content, line-checked; tokenized examples with their loss positions),
//!   `train::squad` (SQuAD), `train::params` (the
//!   trainable A and B), `train::run` (a run advanced one forward/backward pass at a time,
//!   resumable), `train::trainer` (the CLI's loop, outputs), `train::optim` (AdamW, clipping,
//!   schedules), `train::eval` (batched greedy answers), `train::metrics` (SQuAD EM and F1),
//!   `train::plot` (the loss curve).
//! - [`finetune`]: fine-tuning as a service: uploaded files and jobs in OpenAI's shapes
//!   (`finetune::objects`), kept in the state folder across restarts (`finetune::store`), run
//!   as the engine's background work on its own model (`finetune::runner`), the result served
//!   as soon as it is written.
//! - [`online`]: training clients on the serving process (the online-training loop): a LoRA's
//!   parameters and AdamW state over the engine's own model, `forward_backward` with
//!   `cross_entropy` or `importance_sampling`, `optim_step`, `save` as a new adapter version,
//!   state kept for a restart; passes run as the engine's background work.
//! - [`generate`]: batched generation on the caller's thread (CLI, tests, eval).
//! - [`serve`]: `loraplex serve`: bind, load in the background, drain on SIGTERM.
//! - [`config`]: serve options from flags, `LORAPLEX_*` variables and TOML, merged and checked
//!   into a `ServeConfig` (device and dtype are checked when the model loads).
//! - [`cli`]: the command line (`serve`, `generate`, `bench`, `train`, `eval`, `export-lora`,
//!   `export-tokenizer`).
//! - [`bench`]: the load generator (loraplex's and llama.cpp's request shapes).
//! - [`metrics`]: Prometheus series (names as constants, bounded adapter labels, gateway
//!   series).
//! - [`runtime`]: process-wide settings fixed before any thread starts; panics reported to the
//!   log.
//! - `main.rs`: the binary: parse, initialise logging, dispatch.
//!
//! # Invariants
//!
//! - Base weights never change after load; a LoRA delta is computed beside them.
//! - An adapter is immutable once loaded and shared by `Arc`.
//! - Every fast path (fused CPU ops, packed matmul, batched LoRA) has a reference path and a
//!   test that they agree; a row's output never depends on the rest of its batch.
//! - A fault in one sequence fails that sequence only; a failed step re-queues its sequences
//!   rather than dropping them.
#![deny(unsafe_code)]

pub mod adapters;
pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod finetune;
pub mod generate;
pub use loraplex_kernels as kernels;
pub mod metrics;
pub mod model;
pub mod online;
pub mod runtime;
pub mod serve;
pub mod structured;
pub mod train;
