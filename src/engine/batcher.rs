//! One forward step over the running sequences: new sequences prefill while the others decode,
//! in the same ragged batch. A prompt longer than the step's prefill budget is fed in chunks
//! over several steps (chunked prefill), so one long prompt never stalls the others' decode.
//! Owned by the worker thread (or by a caller, for `generate`).

use super::sequence::Sequence;
use crate::adapters::AdapterMix;
use crate::model::tokenizer::TextTokenizer;
use crate::model::{BatchInput, Llama, Result, SeqCache, StepLora};

/// Which LoRA implementation the batch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    /// Per-sequence operands stacked once per batch composition (the fast path).
    Batched,
    /// The per-row reference loop.
    PerRow,
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    pub sequences: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub finished: usize,
    pub cancelled: usize,
}

pub struct Batcher<'m> {
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    model: &'m Llama,
    tok: &'m TextTokenizer,
    path: LoraPath,
    pub running: Vec<Sequence>,
    /// The LoRA operands and the sequence ids (in batch order) they were built for.
    lora: Option<(Vec<u64>, StepLora)>,
    /// Prompt tokens fed per step, over all prefilling sequences (each gets at least one).
    pub prefill_chunk: usize,
}

impl<'m> Batcher<'m> {
    pub fn new(model: &'m Llama, tok: &'m TextTokenizer, path: LoraPath) -> Self {
        Self { metrics: None, model, tok, path, running: Vec::new(), lora: None, prefill_chunk: usize::MAX }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.running.push(seq);
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// KV tokens held by the running sequences.
    pub fn kv_tokens(&self) -> usize {
        self.running.iter().map(|s| s.cache.len()).sum()
    }

    /// Runs one forward for every running sequence and retires the finished ones.
    pub fn step(&mut self) -> StepReport {
        let before = self.running.len();
        let (cancelled, running): (Vec<Sequence>, Vec<Sequence>) = std::mem::take(&mut self.running).into_iter().partition(|s| s.is_cancelled());
        self.running = running;
        cancelled.iter().for_each(|s| self.count_tokens(s));
        let mut report = StepReport { cancelled: before - self.running.len(), ..Default::default() };
        if self.running.is_empty() {
            return report;
        }
        // Decoding sequences feed their one token; prefilling ones share the chunk budget in
        // batch order, each at least one token so every prompt makes progress.
        let mut budget = self.prefill_chunk;
        let feeds: Vec<usize> = self
            .running
            .iter()
            .map(|s| {
                if !s.is_prompt() {
                    return s.pending.len();
                }
                let take = s.pending.len().min(budget.max(1));
                budget = budget.saturating_sub(take);
                take
            })
            .collect();
        let mut input = BatchInput::default();
        for (s, &feed) in self.running.iter().zip(&feeds) {
            if s.is_prompt() {
                report.prefill_tokens += feed;
            } else {
                report.decode_tokens += feed;
            }
            input.push(&s.pending[..feed]);
        }
        report.sequences = self.running.len();
        let span = tracing::debug_span!("engine_step", sequences = report.sequences, prefill_tokens = report.prefill_tokens, decode_tokens = report.decode_tokens);
        for s in &self.running {
            span.follows_from(&s.req.span);
        }
        let _entered = span.enter();
        if let Err(e) = self.forward_and_sample(&input, &feeds) {
            tracing::error!(error = %e, "forward step failed; failing its sequences");
            for s in self.running.iter_mut() {
                s.fail(format!("internal error: {e}"));
            }
        }
        let before = self.running.len();
        let (done, running): (Vec<Sequence>, Vec<Sequence>) = std::mem::take(&mut self.running).into_iter().partition(|s| s.finished.is_some());
        self.running = running;
        report.finished = before - self.running.len();
        for s in done {
            self.count_tokens(&s);
            s.retire();
        }
        report
    }

    /// Adds a retiring sequence's prompt and generated tokens to the per-adapter counters.
    fn count_tokens(&self, s: &Sequence) {
        let Some(m) = &self.metrics else { return };
        let names: Vec<String> = s.req.mix.entries.iter().map(|e| e.adapter.name.clone()).collect();
        for label in m.mix_labels(&names) {
            m.prompt_tokens.with_label_values(&[&label]).inc_by(s.req.prompt_ids.len() as u64);
            m.generated_tokens.with_label_values(&[&label]).inc_by(s.generated_len() as u64);
        }
    }

    fn forward_and_sample(&mut self, input: &BatchInput, feeds: &[usize]) -> Result<()> {
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        if self.lora.as_ref().is_none_or(|(key, _)| *key != ids) {
            let mixes: Vec<&AdapterMix> = self.running.iter().map(|s| &s.req.mix).collect();
            let lora = match self.path {
                LoraPath::Batched => StepLora::batched(&mixes, self.model.cfg.num_layers, self.model.dtype(), self.model.device())?,
                LoraPath::PerRow => StepLora::per_row(&mixes),
            };
            self.lora = Some((ids, lora));
        }
        let lora = match &self.lora {
            Some((_, l)) => l,
            None => &StepLora::None,
        };
        let logits = {
            let mut caches: Vec<&mut SeqCache> = self.running.iter_mut().map(|s| &mut s.cache).collect();
            let hidden = self.model.forward(input, Some(&mut caches), lora)?;
            self.model.logits(&Llama::last_rows(&hidden, &input.seq_lens)?)?
        };
        let now = std::time::Instant::now();
        for (row, (s, &feed)) in self.running.iter_mut().zip(feeds).enumerate() {
            if feed < s.pending.len() {
                // Mid-prompt: the rest of the prompt goes in later steps; nothing is sampled.
                s.pending.drain(..feed);
                continue;
            }
            s.accept(&logits.get(row)?, self.tok)?;
            if let Some(m) = &self.metrics {
                match s.last_token_at {
                    None => m.ttft.observe((now - s.submitted_at).as_secs_f64()),
                    Some(prev) => m.itl.observe((now - prev).as_secs_f64()),
                }
            }
            s.last_token_at = Some(now);
        }
        Ok(())
    }
}
