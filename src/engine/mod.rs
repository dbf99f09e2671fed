//! The engine: one OS thread owns the model, the KV caches and the running batch; the HTTP side
//! submits validated requests through a bounded queue and reads each sequence's token events
//! from its own channel. Dropping that channel cancels the sequence at the next step.
//!
//! Invariant: no model work runs outside the worker thread (or a caller-owned [`Batcher`]).
//! Invariant: a fault in one sequence fails that sequence only (`engine::fault`).

pub mod batcher;
pub mod fault;
pub mod kv_pool;
pub mod masks;
pub mod scheduler;
pub mod sequence;
pub mod worker;

pub use batcher::{Batcher, LoraPath};
pub use fault::{FaultInjection, FaultKind, SequenceError};
pub use worker::{Engine, EngineStats};

/// Work the engine thread runs on its own model between inference steps (fine-tuning jobs),
/// so it needs no second copy of the model: at full speed while no sequence runs, and one
/// slice per [`EngineConfig::background_gap`] steps while some do.
pub trait Background: Send + Sync {
    /// Whether a slice is ready to run.
    fn pending(&self) -> bool;
    /// Runs one bounded slice of work (one forward/backward pass) on the model.
    fn run_slice(&self, model: &crate::model::Decoder);
}

/// Several kinds of background work (fine-tuning jobs, training clients) as one: each slice
/// goes to the next one that has work, in turn, so none starves another.
pub struct Backgrounds {
    parts: Vec<std::sync::Arc<dyn Background>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Backgrounds {
    pub fn new(parts: Vec<std::sync::Arc<dyn Background>>) -> Self {
        Self { parts, next: Default::default() }
    }
}

impl Background for Backgrounds {
    fn pending(&self) -> bool {
        self.parts.iter().any(|p| p.pending())
    }

    fn run_slice(&self, model: &crate::model::Decoder) {
        let n = self.parts.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(p) = (0..n).map(|i| &self.parts[(start + i) % n]).find(|p| p.pending()) {
            p.run_slice(model);
        }
    }
}

use crate::model::lora::AdapterMix;
use crate::model::sampling::{LogitRules, SamplingParams};
use crate::structured::Grammar;
use serde::Serialize;

/// A validated generation request for one sequence.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub mix: AdapterMix,
    /// At least 1.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// `logit_bias`, `min_tokens` and the penalties.
    pub rules: LogitRules,
    pub stop: Vec<String>,
    /// Tokens that end the sequence like EOS (vLLM's `stop_token_ids`); not part of the text.
    pub stop_token_ids: Vec<u32>,
    /// What the text must match (structured outputs); each sequence gets its own matcher.
    pub constraint: Option<std::sync::Arc<Grammar>>,
    /// Top alternatives to report per token; `None` = no log-probabilities.
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt's own tokens, with this many top alternatives each
    /// (OpenAI's `echo` + `logprobs`, vLLM's `prompt_logprobs`), computed in the prefill; the
    /// sequence then skips the prefix cache, whose blocks carry no logits.
    pub prompt_logprobs: Option<usize>,
    pub stop_at_eos: bool,
    /// The adapter or named mix the client gave as `model` (routers see this name; the
    /// gateway metrics list it while the request waits).
    pub model: Option<std::sync::Arc<str>>,
    /// The request's tracing span; the engine steps that serve it link to it (`follows_from`).
    pub span: tracing::Span,
}

impl Request {
    /// Greedy, no stop strings, stop at EOS.
    pub fn greedy(prompt_ids: Vec<u32>, mix: AdapterMix, max_tokens: usize) -> Self {
        Self {
            prompt_ids,
            mix,
            max_tokens,
            sampling: SamplingParams::default(),
            rules: LogitRules::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            constraint: None,
            logprobs: None,
            prompt_logprobs: None,
            stop_at_eos: true,
            model: None,
            span: tracing::Span::none(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What a sequence streams back, in order: `Token`s, then one `Done` (or one `Error`).
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// `text` is the newly printable text (may be empty while a stop string or UTF-8
    /// character is incomplete); `top` is empty unless log-probabilities were asked for.
    Token {
        id: u32,
        text: String,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    /// The prompt's log-probabilities (asked for with `prompt_logprobs`), sent once, before
    /// the first token: one entry per prompt token, the first `None` (nothing predicts it).
    Prompt(Vec<Option<PromptLogprob>>),
    Done {
        reason: FinishReason,
        usage: Usage,
    },
    Error(SequenceError),
}

/// One prompt token's log-probability under the model's raw distribution given the tokens
/// before it, its rank there (1 = the likeliest), and the top alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptLogprob {
    pub logprob: f32,
    pub rank: usize,
    pub top: Vec<(u32, f32)>,
}

/// Everything one sequence streamed, gathered (the non-streaming responses and `generate`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Collected {
    /// Generated ids, including a final EOS if one stopped generation.
    pub ids: Vec<u32>,
    pub text: String,
    /// Log-probability of each generated token (when asked for).
    pub logprobs: Vec<f32>,
    /// Top alternatives at each generated position (when asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// `None` until the sequence is done.
    pub finish_reason: Option<FinishReason>,
    pub usage: Usage,
    /// The prompt's log-probabilities, when asked for.
    pub prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
}

impl Collected {
    /// Adds one event; `Err` carries the sequence's failure.
    pub fn push(&mut self, ev: TokenEvent) -> Result<(), SequenceError> {
        match ev {
            TokenEvent::Token { id, text, logprob, top } => {
                self.ids.push(id);
                self.text.push_str(&text);
                self.logprobs.push(logprob);
                self.top_logprobs.push(top);
            }
            TokenEvent::Prompt(p) => self.prompt_logprobs = Some(p),
            TokenEvent::Done { reason, usage } => {
                self.finish_reason = Some(reason);
                self.usage = usage;
            }
            TokenEvent::Error(e) => return Err(e),
        }
        Ok(())
    }
}

/// Why the engine did not take a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the server is overloaded: {waiting} sequences are waiting and this request adds {adding} (limit {limit}); retry later")]
    QueueFull { waiting: usize, adding: usize, limit: usize },
    /// More sequences (prompts × `n`) than the queue can ever hold: never retryable.
    #[error(
        "the request needs {sequences} sequences (prompts × n); the queue holds at most {limit}"
    )]
    TooManySequences { sequences: usize, limit: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("prompt ({prompt} tokens) + max_tokens ({max_tokens}) needs {blocks} KV cache blocks of 16 tokens; the whole pool holds {capacity} (set --kv-cache-bytes to raise it)")]
    TooLarge { prompt: usize, max_tokens: usize, blocks: usize, capacity: usize },
}

/// Batch and queue limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_batch_size: usize,
    /// Sequences waiting for a batch slot at most (more are refused: HTTP 429).
    pub max_waiting: usize,
    /// Prompt tokens prefilled in one step at most (a longer prompt is fed in chunks).
    pub max_prefill_tokens: usize,
    /// Bytes of the KV block pool; `None`: derived from the model and the machine
    /// ([`default_kv_cache_bytes`]).
    pub kv_cache_bytes: Option<usize>,
    /// Keep full KV blocks for reuse by later requests with the same prefix and adapter mix.
    pub prefix_cache: bool,
    /// While sequences decode, a step that carries prompt tokens is kept to about this many
    /// times a decode-only step, by shrinking the prompt chunk; 0 = only `max_prefill_tokens`.
    pub step_latency_ratio: f64,
    /// While sequences run, engine steps between two background slices (a training pass
    /// takes many decode steps' time, so fewer than one inter-token gap in `background_gap`
    /// holds one); 0 = background work waits until no sequence runs.
    pub background_gap: usize,
    /// Test-only fault injection ([`FaultInjection`]); `None` in every real configuration.
    pub faults: Option<std::sync::Arc<FaultInjection>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_waiting: 256,
            max_prefill_tokens: 512,
            kv_cache_bytes: None,
            prefix_cache: true,
            step_latency_ratio: batcher::STEP_LATENCY_RATIO,
            background_gap: 200,
            faults: None,
        }
    }
}

/// The default KV pool: room for a full batch of full-context sequences, but at most 40 % of
/// the memory the machine has available now, and at least one full-context sequence.
pub fn default_kv_cache_bytes(bytes_per_token: usize, context: usize, max_batch: usize) -> usize {
    let want = bytes_per_token.saturating_mul(context).saturating_mul(max_batch);
    let floor = bytes_per_token.saturating_mul(context);
    let avail = available_memory().unwrap_or(4 << 30);
    want.min(avail / 5 * 2).max(floor)
}

/// `MemAvailable` from `/proc/meminfo` (Linux), in bytes.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
