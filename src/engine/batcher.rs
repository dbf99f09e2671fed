//! One forward step over the running sequences: new sequences prefill while the others decode,
//! in the same ragged batch. A prompt longer than the step's prefill budget is fed in chunks
//! over several steps (chunked prefill), so one long prompt never stalls the others' decode.
//!
//! The batcher also schedules against the KV block pool: a waiting sequence is admitted (in
//! arrival order) only when its prompt's blocks fit, after taking what the prefix cache
//! already holds (and after waiting for a running sequence that is computing the same prefix);
//! when a decoding sequence needs a block and none is free, the most recently admitted running
//! sequence is preempted (its blocks freed, recomputed later from the front of the queue).
//! A fault in one row fails that sequence alone; a failed forward re-queues the step's
//! sequences (`engine::fault`). Owned by the worker thread (or by a caller, for `generate`).

use super::fault::{FaultInjection, FaultKind, SequenceError};
use super::kv_pool::{chain_hashes, KvPool};
use super::masks;
use super::scheduler::{self, Budgets, PoolView, RunningView, StepPlan, WaitingView};
use super::sequence::Sequence;
use crate::model::kv_cache::{blocks_for, BLOCK_TOKENS};
use crate::model::lora::AdapterMix;
use crate::model::tokenizer::TextTokenizer;
use crate::model::{BatchInput, Decoder, Result, SeqCache, StepLora};
use candle_core::{DType, Tensor, D};
use std::collections::VecDeque;
use std::sync::Arc;

/// Which LoRA implementation the batch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    /// Per-sequence operands stacked once per batch composition (the fast path).
    Batched,
    /// The per-row reference loop.
    PerRow,
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReport {
    pub sequences: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub finished: usize,
    pub cancelled: usize,
    /// Sequences that left the queue for the batch this step.
    pub admitted: usize,
    /// Queued sequences dropped because their client went away.
    pub cancelled_waiting: usize,
    /// Running sequences sent back to the queue for lack of KV blocks.
    pub preempted: usize,
    /// Queued sequences ended at admission (a request that can never fit).
    pub refused: usize,
    /// Sequences that failed on their own this step (error sent, blocks freed); the rest of
    /// the batch went on.
    pub failed: usize,
    /// The forward itself failed; its sequences went back to the queue.
    pub step_failed: bool,
    /// Sequences a failed step sent back to the queue (recomputed on probation).
    pub requeued: usize,
    /// Admissions postponed because a running sequence is computing the same prefix.
    pub deferred: usize,
    /// Structured outputs: computing this step's token masks, and the part of it the step
    /// waited for after its forward.
    pub masks: masks::MaskTimes,
    /// What the step's sequences did, for the metrics (observed from this report only).
    pub seen: StepObservations,
}

/// Per-sequence facts of one step that metrics count: the batcher records them here and the
/// engine thread observes them from the report, so the step's numbers have one source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepObservations {
    /// Seconds from submission to the first token (sequences that sampled their first).
    pub first_token: Vec<f64>,
    /// Seconds since the sequence's previous token (the others that sampled).
    pub inter_token: Vec<f64>,
    /// Admitted for the first time: seconds queued and the adapters of its mix.
    pub admitted: Vec<(f64, usize)>,
    /// Prefix-cache lookups at admission (with caching on): tokens looked up and found.
    pub prefix_lookups: Vec<(usize, usize)>,
    /// Sequences that left (finished, failed or cancelled): their mix's adapter names and
    /// their prompt and generated tokens.
    pub retired: Vec<(Vec<String>, usize, usize)>,
}

pub struct Batcher<'m> {
    model: &'m Decoder,
    tok: &'m TextTokenizer,
    path: LoraPath,
    /// In admission order: the last is the first to be preempted.
    pub running: Vec<Sequence>,
    /// In arrival order; preempted sequences go back to the front.
    pub waiting: VecDeque<Sequence>,
    pub pool: KvPool,
    /// The LoRA operands and the sequence ids (in batch order) they were built for.
    lora: Option<(Vec<u64>, StepLora)>,
    /// Prompt tokens fed per step, over all prefilling sequences (each gets at least one).
    pub prefill_chunk: usize,
    /// Running sequences at most.
    pub max_batch: usize,
    /// Ids handed out by [`Batcher::fresh_id`] (callers that queue their own sequences).
    issued: u64,
    /// While sequences decode, steps that carry prompt tokens are kept to about this many
    /// times a decode-only step (their inter-token latency), by shrinking the prompt chunk
    /// below `prefill_chunk`; 0 turns it off. The engine uses [`STEP_LATENCY_RATIO`].
    pub step_latency_ratio: f64,
    pacer: Pacer,
    /// Test-only fault injection ([`FaultInjection`]).
    pub faults: Option<Arc<FaultInjection>>,
}

/// The engine's step latency ratio: a prefilling step about 1.5 decode steps (the attention
/// cost of a long prompt grows from one chunk to the next, so the measured step overshoots).
pub const STEP_LATENCY_RATIO: f64 = 1.5;

/// What the chunk size is chosen from: recent decode-only step time and the marginal cost of
/// a prompt token (measured on the last step that had any, so it follows the growing
/// attention cost of a long prompt's later chunks).
#[derive(Debug, Default, Clone, Copy)]
struct Pacer {
    decode_s: Option<f64>,
    token_s: Option<f64>,
}

impl Pacer {
    /// Prompt tokens for the next step, at most `cap`.
    fn budget(&self, ratio: f64, decoding: bool, cap: usize) -> usize {
        if ratio <= 0.0 || !decoding {
            return cap;
        }
        match (self.decode_s, self.token_s) {
            (Some(d), Some(t)) if t > 0.0 => (((ratio - 1.0) * d / t) as usize).clamp(1, cap),
            // No measurement yet: a small probe chunk.
            _ => cap.min(BLOCK_TOKENS),
        }
    }

    fn observe(&mut self, secs: f64, prefill_tokens: usize, decode_tokens: usize) {
        if prefill_tokens == 0 {
            if decode_tokens > 0 {
                self.decode_s = Some(self.decode_s.map_or(secs, |d| 0.8 * d + 0.2 * secs));
            }
            return;
        }
        let base = if decode_tokens > 0 { self.decode_s.unwrap_or(0.0) } else { 0.0 };
        self.token_s =
            Some(((secs - base) / prefill_tokens as f64).max(secs / prefill_tokens as f64 / 8.0));
    }
}

impl<'m> Batcher<'m> {
    /// A batcher over an unbounded pool without prefix caching.
    pub fn new(model: &'m Decoder, tok: &'m TextTokenizer, path: LoraPath) -> Self {
        let pool = KvPool::unbounded(model.cfg.num_layers, model.kv_width(), model.host_kv());
        Self::with_pool(model, tok, path, pool)
    }

    pub fn with_pool(
        model: &'m Decoder,
        tok: &'m TextTokenizer,
        path: LoraPath,
        pool: KvPool,
    ) -> Self {
        Self {
            model,
            tok,
            path,
            running: Vec::new(),
            waiting: VecDeque::new(),
            pool,
            lora: None,
            prefill_chunk: usize::MAX,
            max_batch: usize::MAX,
            issued: 0,
            step_latency_ratio: 0.0,
            pacer: Pacer::default(),
            faults: None,
        }
    }

    /// An id no other sequence of this batcher has had (the LoRA operands are keyed by ids).
    pub fn fresh_id(&mut self) -> u64 {
        self.issued += 1;
        self.issued
    }

    pub fn num_layers(&self) -> usize {
        self.model.cfg.num_layers
    }

    /// Queues a sequence; it joins the batch when its blocks fit.
    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    /// Nothing running and nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The planner's view of the batch, the queue (built lazily, as far as it looks), the pool
    /// and the budgets, and its plan for this step.
    fn plan(&self) -> StepPlan {
        let caching = self.pool.prefix_caching();
        let running: Vec<RunningView> =
            self.running.iter().map(|s| running_view(s, caching)).collect();
        let pool = PoolView { capacity: self.pool.capacity(), available: self.pool.available() };
        let budgets = Budgets {
            max_batch: self.max_batch,
            prefill_chunk: self.prefill_chunk,
            paced_chunk: self.pacer.budget(self.step_latency_ratio, true, self.prefill_chunk),
        };
        let waiting = self.waiting.iter().map(|s| waiting_view(&self.pool, s));
        scheduler::plan(&running, waiting, pool, &budgets)
    }

    /// Carries out `plan`: preemptions, every running sequence's blocks, refusals and
    /// admissions. Should the pool turn out shorter than planned, the reservation preempts
    /// more and admission stops where an allocation fails, leaving the rest queued.
    fn execute(&mut self, plan: &StepPlan, report: &mut StepReport) {
        for _ in 0..plan.preempt {
            let Some(victim) = self.running.pop() else { break };
            self.preempt(victim, report);
        }
        self.reserve(report);
        let offset = report.preempted;
        if report.preempted > plan.preempt {
            return; // the pool was shorter than planned: nothing is admitted this step
        }
        report.deferred = plan.deferred;
        let looked = plan.admit.iter().map(|a| a.index).chain(plan.refuse.iter().copied()).max();
        let Some(looked) = looked.map(|m| (m + 1).min(self.waiting.len().saturating_sub(offset)))
        else {
            return;
        };
        let front: Vec<Sequence> = self.waiting.drain(offset..offset + looked).collect();
        let mut back = Vec::new();
        let mut stopped = false;
        for (i, mut s) in front.into_iter().enumerate() {
            if plan.refuse.contains(&i) {
                let blocks = blocks_for(s.max_len());
                let capacity = self.pool.capacity();
                let (prompt, max_tokens) = (s.req.prompt_ids.len(), s.req.max_tokens);
                s.fail(SequenceError::Refused(super::EngineError::TooLarge {
                    prompt,
                    max_tokens,
                    blocks,
                    capacity,
                }));
                report.refused += 1;
                Self::retire(s, report);
                continue;
            }
            match plan.admit.iter().find(|a| a.index == i).filter(|_| !stopped) {
                Some(a) => {
                    if let Some(s) = self.admit_one(s, a.cached, report) {
                        stopped = true;
                        back.push(s);
                    }
                }
                None => back.push(s),
            }
        }
        for s in back.into_iter().rev() {
            self.waiting.insert(offset, s);
        }
    }

    /// Admits `s` with its first `cached` blocks from the prefix cache and fresh ones for the
    /// rest; gives it back when the pool cannot supply them.
    fn admit_one(
        &mut self,
        mut s: Sequence,
        cached: usize,
        report: &mut StepReport,
    ) -> Option<Sequence> {
        let all = s.pending.len();
        let (hits, chain) = self.pool.lookup(&s.pending, &s.mix_key, cached);
        let need = blocks_for(all) - hits.len();
        let fresh: Vec<_> = std::iter::from_fn(|| self.pool.allocate()).take(need).collect();
        if fresh.len() < need {
            // Should the pool have changed under the plan, the sequence stays queued rather
            // than run with a short block table.
            return Some(s);
        }
        let hit_tokens = hits.len() * BLOCK_TOKENS;
        self.pool.count_lookup(all, hit_tokens);
        if self.pool.prefix_caching() {
            report.seen.prefix_lookups.push((all, hit_tokens));
        }
        if let Err(e) = s.cache.attach_prefix(hits, self.model.kv_width()) {
            s.fail(SequenceError::Internal(e.to_string()));
            report.refused += 1;
            Self::retire(s, report);
            return None;
        }
        fresh.into_iter().for_each(|b| s.cache.push_block(b));
        if self.pool.prefix_caching() {
            s.prompt_chain = chain_hashes(&s.pending, &s.mix_key);
        }
        s.pending.drain(..hit_tokens);
        s.chain = chain;
        if s.last_token_at.is_none() {
            let queued = s.submitted_at.elapsed().as_secs_f64();
            report.seen.admitted.push((queued, s.req.mix.entries.len()));
        }
        self.running.push(s);
        report.admitted += 1;
        None
    }

    /// Sends a running sequence back to the front of the queue, to be recomputed.
    fn preempt(&mut self, mut victim: Sequence, report: &mut StepReport) {
        victim.preempt();
        self.pool.counters.preemptions += 1;
        report.preempted += 1;
        self.waiting.push_front(victim);
    }

    /// Reserves every running sequence's blocks for this step's tokens, oldest first,
    /// preempting the most recently admitted sequence while the pool has none to give (after
    /// the plan's preemptions, a guard: it preempts only if the pool is shorter than planned).
    fn reserve(&mut self, report: &mut StepReport) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let need =
                blocks_for(s.cache.len() + s.pending.len()).saturating_sub(s.cache.blocks().len());
            let mut got = 0;
            while got < need && i < self.running.len() {
                if let Some(b) = self.pool.allocate() {
                    self.running[i].cache.push_block(b);
                    got += 1;
                    continue;
                }
                // The victim may be sequence `i` itself; then `i` now points past the batch.
                let Some(victim) = self.running.pop() else { break };
                self.preempt(victim, report);
            }
            i += 1;
        }
    }

    /// KV tokens held by the running sequences.
    pub fn kv_tokens(&self) -> usize {
        self.running.iter().map(|s| s.cache.len()).sum()
    }

    /// Admits what fits, runs one forward for every running sequence, and retires the
    /// finished ones.
    ///
    /// A failure that belongs to one row (non-finite logits, choosing its token, a panic
    /// there) fails that sequence only. A failure of the forward itself sends every sequence
    /// of the step back to the front of the queue, to be recomputed on probation; one that was
    /// already on probation fails instead (it failed twice).
    pub fn step(&mut self) -> StepReport {
        let before = self.running.len();
        let (cancelled, running): (Vec<Sequence>, Vec<Sequence>) =
            std::mem::take(&mut self.running).into_iter().partition(|s| s.is_cancelled());
        self.running = running;
        let mut report =
            StepReport { cancelled: before - self.running.len(), ..Default::default() };
        cancelled.iter().for_each(|s| Self::count_tokens(s, &mut report));
        let queued = self.waiting.len();
        self.waiting.retain(|s| !s.is_cancelled());
        report.cancelled_waiting = queued - self.waiting.len();
        let plan = self.plan();
        self.execute(&plan, &mut report);
        if self.running.is_empty() {
            return report;
        }
        // The plan decides what every sequence feeds, also for the batch that runs when the
        // pool turned out shorter than planned.
        let batch: Vec<(bool, usize)> =
            self.running.iter().map(|s| (s.is_prompt(), s.pending.len())).collect();
        let feeds = plan.feeds_for(&batch);
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
        let span = tracing::debug_span!(
            "engine_step",
            sequences = report.sequences,
            prefill_tokens = report.prefill_tokens,
            decode_tokens = report.decode_tokens
        );
        for s in &self.running {
            span.follows_from(&s.req.span);
        }
        let _entered = span.enter();
        let started = std::time::Instant::now();
        let samples: Vec<bool> =
            self.running.iter().zip(&feeds).map(|(s, &f)| f >= s.pending.len()).collect();
        let jobs = masks::take(&mut self.running, &samples);
        let (outcome, done, mask_times) = masks::beside(jobs, || self.forward(&input));
        masks::put_back(&mut self.running, done);
        report.masks = mask_times;
        self.pacer.observe(
            started.elapsed().as_secs_f64(),
            report.prefill_tokens,
            report.decode_tokens,
        );
        match outcome {
            Ok(mut out) => {
                for (row, pos, lp) in std::mem::take(&mut out.prompt) {
                    if let Some(s) = self.running.get_mut(row) {
                        s.record_prompt_logprob(pos, lp);
                    }
                }
                self.take_tokens(&out, &feeds, &mut report);
                self.register_prefixes();
            }
            Err(e) => self.requeue_failed_step(&e, &mut report),
        }
        let before = self.running.len();
        let (done, running): (Vec<Sequence>, Vec<Sequence>) =
            std::mem::take(&mut self.running).into_iter().partition(|s| s.finished.is_some());
        self.running = running;
        report.finished = before - self.running.len();
        for s in done {
            Self::retire(s, &mut report);
        }
        report
    }

    /// Puts the running sequences' newly completed full blocks into the prefix cache (not a
    /// failed sequence's: its values may be what failed it).
    fn register_prefixes(&mut self) {
        if !self.pool.prefix_caching() {
            return;
        }
        for s in self
            .running
            .iter_mut()
            .filter(|s| !s.has_failed() && s.cache.len() / BLOCK_TOKENS > s.chain.hashes.len())
        {
            let tokens = s.tokens();
            self.pool.register(
                &s.cache,
                &tokens[..s.cache.len().min(tokens.len())],
                &s.mix_key,
                &mut s.chain,
            );
        }
    }

    /// After a failed forward: every sequence of the step goes back to the front of the queue
    /// (in order, caches dropped, to be recomputed), on probation; one already on probation
    /// fails. Nothing of the step was sampled, so a recomputed sequence continues exactly
    /// where it was. The rule blames the one suspect of a failing step; it can blame wrongly
    /// only if a sequence that passed its own probation faults in the very step another is on
    /// probation (two faults at once).
    fn requeue_failed_step(&mut self, error: &str, report: &mut StepReport) {
        tracing::error!(
            error,
            sequences = self.running.len(),
            "forward step failed; re-queueing its sequences"
        );
        report.step_failed = true;
        let mut failed = Vec::new();
        for mut s in std::mem::take(&mut self.running).into_iter().rev() {
            if s.suspect {
                s.fail(SequenceError::StepFailed(error.to_string()));
                report.failed += 1;
                failed.push(s);
            } else {
                s.suspect = true;
                s.preempt();
                report.requeued += 1;
                self.waiting.push_front(s);
            }
        }
        self.running = failed;
    }

    fn retire(s: Sequence, report: &mut StepReport) {
        Self::count_tokens(&s, report);
        s.retire();
    }

    /// Records a retiring sequence's prompt and generated tokens for the per-adapter counters.
    fn count_tokens(s: &Sequence, report: &mut StepReport) {
        let names: Vec<String> = s.req.mix.entries.iter().map(|e| e.adapter.name.clone()).collect();
        report.seen.retired.push((names, s.req.prompt_ids.len(), s.generated_len()));
    }

    /// The step's forward and the logits of each sequence's last fed position; a panic
    /// inside is caught and becomes the step's error.
    fn forward(&mut self, input: &BatchInput) -> std::result::Result<StepLogits, String> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.forward_logits(input)))
        {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(e.to_string()),
            Err(panic) => Err(SequenceError::from_panic(panic).to_string()),
        }
    }

    fn forward_logits(&mut self, input: &BatchInput) -> Result<StepLogits> {
        if let Some(f) = &self.faults {
            if self.running.iter().any(|s| f.fault_for(&s.req.prompt_ids).is_some())
                && f.step_fails()
            {
                if f.kind == FaultKind::StepPanic {
                    panic!("injected step panic");
                }
                return Err(crate::model::ModelError::Generation("injected step fault".into()));
            }
        }
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        if self.lora.as_ref().is_none_or(|(key, _)| *key != ids) {
            let mixes: Vec<&AdapterMix> = self.running.iter().map(|s| &s.req.mix).collect();
            let lora = match self.path {
                LoraPath::Batched => StepLora::batched(
                    &mixes,
                    self.model.cfg.num_layers,
                    self.model.dtype(),
                    self.model.device(),
                )?,
                LoraPath::PerRow => StepLora::per_row(&mixes),
            };
            self.lora = Some((ids, lora));
        }
        let lora = match &self.lora {
            Some((_, l)) => l,
            None => &StepLora::None,
        };
        let starts: Vec<usize> = self.running.iter().map(|s| s.cache.len()).collect();
        let (logits, finite, prompt) = {
            let mut caches: Vec<&mut SeqCache> =
                self.running.iter_mut().map(|s| &mut s.cache).collect();
            let (hidden, residual) =
                self.model.forward_with_residual(input, Some(&mut caches), lora)?;
            let prompt = self.prompt_logprobs(&hidden, &input.seq_lens, &starts, lora)?;
            let seqs: Vec<usize> = (0..input.seq_lens.len()).collect();
            let last = Decoder::last_rows(&hidden, &input.seq_lens)?;
            let logits = self.model.logits_for(&last, &seqs, lora)?;
            // A row is finite when its logits are and its residual stream's sum of squares
            // (the final norm's statistic) is: an overflowed residual normalises to zeros and
            // would pass for finite logits. Both sums in one small copy for the batch.
            let norm = Decoder::last_rows(&residual, &input.seq_lens)?
                .to_dtype(DType::F32)?
                .sqr()?
                .sum(D::Minus1)?;
            let finite = (logits.sum(D::Minus1)? + norm)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::is_finite)
                .collect::<Vec<_>>();
            (logits, finite, prompt)
        };
        // Greedy rows take their argmax in one op on the logits' device and one small copy;
        // the others read their row from one host copy of the logits (a copy only off the CPU).
        let sampled = |(s, &feed): (&Sequence, &usize)| feed >= s.pending.len();
        let rows = || self.running.iter().zip(&input.seq_lens).filter(|r| sampled(*r));
        let argmax = match rows().any(|(s, _)| s.is_plain_greedy()) {
            true => Some(logits.argmax(D::Minus1)?.to_vec1::<u32>()?),
            false => None,
        };
        let host = match rows().any(|(s, _)| !s.is_plain_greedy()) {
            true => Some(logits.to_device(&candle_core::Device::Cpu)?),
            false => None,
        };
        Ok(StepLogits { finite, argmax, host, prompt })
    }

    /// The log-probabilities of the prompt tokens that this step's fed positions predict, for
    /// the rows that asked for them: `(row, position, value)`. Each fed position `p` whose next
    /// token is still the prompt's (`p + 1 < prompt length`) gets the logits of its hidden row;
    /// rows go through the head in chunks, so a long prefill never holds all its logits.
    fn prompt_logprobs(
        &self,
        hidden: &Tensor,
        seq_lens: &[usize],
        starts: &[usize],
        lora: &StepLora,
    ) -> Result<Vec<(usize, usize, super::PromptLogprob)>> {
        const CHUNK: usize = 64;
        let mut wanted: Vec<(u32, usize, usize, u32, usize)> = Vec::new();
        let mut offset = 0;
        for (row, (s, &len)) in self.running.iter().zip(seq_lens).enumerate() {
            if let Some(k) = s.req.prompt_logprobs {
                let prompt = &s.req.prompt_ids;
                for j in 0..len {
                    let next = starts[row] + j + 1;
                    if let Some(&target) = prompt.get(next) {
                        wanted.push(((offset + j) as u32, row, next, target, k));
                    }
                }
            }
            offset += len;
        }
        let mut out = Vec::with_capacity(wanted.len());
        for part in wanted.chunks(CHUNK) {
            let idx: Vec<u32> = part.iter().map(|w| w.0).collect();
            let idx = Tensor::from_vec(idx, part.len(), hidden.device())?;
            let seqs: Vec<usize> = part.iter().map(|w| w.1).collect();
            let logits = self
                .model
                .logits_for(&hidden.index_select(&idx, 0)?, &seqs, lora)?
                .to_device(&candle_core::Device::Cpu)?;
            for (i, &(_, row, pos, target, k)) in part.iter().enumerate() {
                let r = logits.get(i)?;
                let (logprob, top) = crate::model::sampling::logprobs(&r, target, k)?;
                let values = r.to_vec1::<f32>()?;
                let mine = values.get(target as usize).copied().unwrap_or(f32::NEG_INFINITY);
                let rank = 1 + values.iter().filter(|&&v| v > mine).count();
                out.push((row, pos, super::PromptLogprob { logprob, rank, top }));
            }
        }
        Ok(out)
    }

    /// Each sequence that fed its last pending token takes its next token from its own row;
    /// whatever goes wrong there fails that sequence alone.
    fn take_tokens(&mut self, out: &StepLogits, feeds: &[usize], report: &mut StepReport) {
        let now = std::time::Instant::now();
        let (tok, faults) = (self.tok, self.faults.as_deref());
        for (row, (s, &feed)) in self.running.iter_mut().zip(feeds).enumerate() {
            if feed < s.pending.len() {
                // Mid-prompt: the rest of the prompt goes in later steps; nothing is sampled.
                s.pending.drain(..feed);
                continue;
            }
            let fault = faults.and_then(|f| f.fault_for(&s.req.prompt_ids));
            let chosen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                out.choose(s, row, fault, tok)
            }));
            if let Err(e) = chosen.unwrap_or_else(|panic| Err(SequenceError::from_panic(panic))) {
                tracing::warn!(parent: &s.req.span, error = %e, "sequence failed; its batch continues");
                s.fail(e);
                report.failed += 1;
                continue;
            }
            // A sequence on probation that samples again has been recomputed successfully.
            s.suspect = false;
            match s.last_token_at {
                None => report.seen.first_token.push((now - s.submitted_at).as_secs_f64()),
                Some(prev) => report.seen.inter_token.push((now - prev).as_secs_f64()),
            }
            s.last_token_at = Some(now);
        }
    }
}

/// What one successful forward leaves for choosing tokens: per row (sequence), whether its
/// values stayed finite, and its logits as the rows that sample need them.
struct StepLogits {
    finite: Vec<bool>,
    /// Each row's argmax, when some row takes its plain argmax.
    argmax: Option<Vec<u32>>,
    /// The logits on the host, when some row samples or penalises.
    host: Option<Tensor>,
    /// Prompt log-probabilities computed this step: `(row, position, value)`.
    prompt: Vec<(usize, usize, super::PromptLogprob)>,
}

impl StepLogits {
    /// Row `row`'s next token for `s`.
    fn choose(
        &self,
        s: &mut Sequence,
        row: usize,
        fault: Option<FaultKind>,
        tok: &TextTokenizer,
    ) -> std::result::Result<(), SequenceError> {
        if fault == Some(FaultKind::RowNan) || !self.finite.get(row).copied().unwrap_or(false) {
            return Err(SequenceError::NonFinite { with_adapters: !s.req.mix.is_empty() });
        }
        match fault {
            Some(FaultKind::RowError) => return Err(SequenceError::Injected),
            Some(FaultKind::RowPanic) => panic!("injected row panic"),
            _ => {}
        }
        let bug = || SequenceError::Token("a sampled row without logits; this is a bug".into());
        match (&self.argmax, &self.host) {
            (Some(picks), _) if s.is_plain_greedy() => {
                s.accept_greedy(*picks.get(row).ok_or_else(bug)?, tok)
            }
            (_, Some(host)) => {
                s.accept(&host.get(row).map_err(|e| SequenceError::Token(e.to_string()))?, tok)
            }
            _ => Err(bug()),
        }
    }
}

/// The planner's view of a running sequence: the blocks this step needs, the blocks its
/// preemption would free (those nothing else holds: only its own, or shared with the prefix
/// cache alone), and the prefix blocks it is still computing.
fn running_view(s: &Sequence, caching: bool) -> RunningView {
    let blocks = s.cache.blocks();
    let frees = blocks
        .iter()
        .enumerate()
        .filter(|(i, b)| {
            let holders = Arc::strong_count(b);
            holders == 1 || (holders == 2 && *i < s.chain.hashes.len())
        })
        .count();
    let computing = match caching && s.is_prompt() {
        true => s.prompt_chain.iter().skip(s.chain.hashes.len()).copied().collect(),
        false => Vec::new(),
    };
    RunningView {
        need: blocks_for(s.cache.len() + s.pending.len()).saturating_sub(blocks.len()),
        frees,
        suspect: s.suspect,
        prompt: s.is_prompt(),
        pending: s.pending.len(),
        computing,
    }
}

/// The planner's view of a waiting sequence, from what the prefix cache holds for it (the last
/// token's block never counts: its logits are the first sample).
fn waiting_view(pool: &KvPool, s: &Sequence) -> WaitingView {
    // A sequence that reports its prompt's log-probabilities computes every position.
    let want = match s.req.prompt_logprobs {
        Some(_) => 0,
        None => s.pending.len().saturating_sub(1) / BLOCK_TOKENS,
    };
    let peek = pool.peek(&s.pending, &s.mix_key, want);
    let uncached = match pool.prefix_caching() && s.req.prompt_logprobs.is_none() {
        true => peek.hashes[peek.hits..].to_vec(),
        false => Vec::new(),
    };
    WaitingView {
        pending: s.pending.len(),
        max_blocks: blocks_for(s.max_len()),
        suspect: s.suspect,
        cached: peek.hits,
        idle_cached: peek.idle,
        uncached,
    }
}
