//! One sequence's life: prompt → prefill → decode → finished. It reshapes its logits row (the
//! request's logit rules, then its grammar's mask), samples, applies stop conditions (EOS,
//! `stop_token_ids`, a finished grammar, stop strings, token limit), and streams text deltas
//! that never include (part of) a stop string or half a UTF-8 character.

use super::kv_pool::{MixKey, PrefixChain};
use super::masks::Constrained;
use super::{FinishReason, Request, SequenceError, TokenEvent, Usage};
use crate::model::sampling::{logprobs, Sampler};
use crate::model::tokenizer::TextTokenizer;
use crate::model::SeqCache;
use crate::structured::Matcher;
use candle_core::Tensor;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

pub struct Sequence {
    pub id: u64,
    pub req: Request,
    /// Blocks reserved by the batcher from its pool.
    pub cache: SeqCache,
    /// The prefix-cache identity of the request's adapter mix.
    pub mix_key: Arc<MixKey>,
    /// The leading full blocks of `cache` the prefix cache knows.
    pub chain: PrefixChain,
    /// Chain hashes of every full block of the tokens fed since admission (cached ones
    /// included): the blocks past `chain` are the ones this sequence is still computing, which
    /// a waiting sequence with the same prefix waits for instead of computing them again.
    pub prompt_chain: Vec<u64>,
    /// On probation: a forward step failed with this sequence in it, and it has not sampled a
    /// token since. A step that fails again while it runs fails it (see `Batcher`).
    pub suspect: bool,
    /// Structured outputs: the grammar's state and this step's mask.
    pub constraint: Option<Constrained>,
    sampler: Sampler,
    /// Tokens to feed at the next step: the prompt first, then the last sampled token.
    pub pending: Vec<u32>,
    generated: Vec<u32>,
    /// Bytes of the decoded text already sent.
    emitted: usize,
    events: UnboundedSender<TokenEvent>,
    /// `Done` or `Error`, sent by [`Sequence::retire`] once the sequence is gone.
    final_event: Option<TokenEvent>,
    pub finished: Option<FinishReason>,
    /// When the request was submitted (for time to first token).
    pub submitted_at: std::time::Instant,
    /// When the last token was produced (for inter-token latency).
    pub last_token_at: Option<std::time::Instant>,
    /// The prompt's log-probabilities by position, filled as the prefill computes them (when
    /// asked for), sent before the first token.
    prompt_lps: Vec<Option<super::PromptLogprob>>,
    prompt_sent: bool,
}

impl Sequence {
    pub fn new(
        id: u64,
        req: Request,
        num_layers: usize,
        events: UnboundedSender<TokenEvent>,
    ) -> Self {
        let cache = SeqCache::pooled(num_layers, req.prompt_ids.len() + req.max_tokens);
        let (req_prompt_lps, prompt_len) = (req.prompt_logprobs.is_some(), req.prompt_ids.len());
        Self {
            id,
            mix_key: Arc::new(MixKey::of(&req.mix)),
            chain: PrefixChain::default(),
            prompt_chain: Vec::new(),
            suspect: false,
            constraint: req.constraint.as_ref().map(|g| Constrained::new(g.matcher())),
            sampler: Sampler::new(&req.sampling),
            pending: req.prompt_ids.clone(),
            cache,
            req,
            generated: Vec::new(),
            emitted: 0,
            events,
            final_event: None,
            finished: None,
            submitted_at: std::time::Instant::now(),
            last_token_at: None,
            prompt_lps: match req_prompt_lps {
                true => vec![None; prompt_len],
                false => Vec::new(),
            },
            prompt_sent: false,
        }
    }

    /// Records the log-probability of prompt token `pos` (given the tokens before it). A
    /// recomputation after a preemption writes the same values again.
    pub fn record_prompt_logprob(&mut self, pos: usize, lp: super::PromptLogprob) {
        if let Some(slot) = self.prompt_lps.get_mut(pos) {
            *slot = Some(lp);
        }
    }

    /// Tokens generated so far.
    pub fn generated_len(&self) -> usize {
        self.generated.len()
    }

    /// The client has gone away (its receiver was dropped).
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Still feeding its prompt (or recomputing it after a preemption): the chunked-prefill
    /// budget applies.
    pub fn is_prompt(&self) -> bool {
        self.generated.is_empty() || self.pending.len() > 1
    }

    /// Every token of the sequence so far: the prompt, then the generated ones.
    pub fn tokens(&self) -> Vec<u32> {
        [&self.req.prompt_ids[..], &self.generated[..]].concat()
    }

    /// Total tokens the sequence may reach (prompt + `max_tokens`).
    pub fn max_len(&self) -> usize {
        self.req.prompt_ids.len() + self.req.max_tokens
    }

    /// Gives up the KV cache (its blocks return to the pool or its prefix cache): the
    /// sequence will recompute everything it has — prompt and generated tokens — when it is
    /// admitted again, and then sample its next token as if nothing had happened.
    pub fn preempt(&mut self) {
        self.cache.clear();
        self.chain = PrefixChain::default();
        self.prompt_chain.clear();
        self.pending = self.tokens();
    }

    /// Ends this sequence (only this one) with `error`: the client gets it as the final event
    /// when the sequence retires, after its blocks are freed.
    pub fn fail(&mut self, error: SequenceError) {
        self.final_event = Some(TokenEvent::Error(error));
        self.finished = Some(FinishReason::Stop);
    }

    /// Ended by [`Sequence::fail`].
    pub fn has_failed(&self) -> bool {
        matches!(self.final_event, Some(TokenEvent::Error(_)))
    }

    /// Ends a finished sequence: its KV cache and adapter references are dropped before the
    /// client hears `Done`, so a client that reacts at once (e.g. with a request that needs
    /// the adapter budget this one held) finds them released.
    pub fn retire(mut self) {
        let event = self.final_event.take();
        let events = self.events.clone();
        drop(self);
        if let Some(e) = event {
            let _ = events.send(e);
        }
    }

    /// Whether the next token is the plain argmax of the logits (greedy, no logit rules, no
    /// grammar, no log-probabilities), which the batcher takes for all such rows in one device
    /// op.
    pub fn is_plain_greedy(&self) -> bool {
        self.req.sampling.is_greedy()
            && self.req.rules.is_none()
            && self.constraint.is_none()
            && self.req.logprobs.is_none()
    }

    /// Tokens that end the sequence: EOS (unless ignored) and `stop_token_ids`.
    fn ends(&self, tok: &TextTokenizer, token: u32) -> bool {
        (self.req.stop_at_eos && tok.eos_ids.contains(&token))
            || self.req.stop_token_ids.contains(&token)
    }

    /// Consumes this step's logits row (finite: the batcher checked): reshapes it, samples,
    /// streams, and decides whether to stop. An error is this sequence's alone.
    pub fn accept(&mut self, logits: &Tensor, tok: &TextTokenizer) -> Result<(), SequenceError> {
        let token_err = |e: crate::model::ModelError| SequenceError::Token(e.to_string());
        let candle_err = |e: candle_core::Error| SequenceError::Token(e.to_string());
        if self.req.rules.is_none() && self.constraint.is_none() {
            // Nothing reshapes the row: the sampler reads it as it is.
            let token = self.sampler.sample(logits).map_err(token_err)?;
            let (lp, top) = match self.req.logprobs {
                Some(k) => logprobs(logits, token, k).map_err(token_err)?,
                None => (0.0, Vec::new()),
            };
            return self.push_token(token, lp, top, tok);
        }
        let mut row = logits.to_vec1::<f32>().map_err(candle_err)?;
        let mut early: Vec<u32> = self.req.stop_token_ids.clone();
        if self.req.stop_at_eos {
            early.extend(&tok.eos_ids);
        }
        self.req.rules.apply(&mut row, &self.req.prompt_ids, &self.generated, &early);
        // Log-probabilities are the model's after the request's rules, before the grammar.
        let ruled = self.req.logprobs.map(|_| row.clone());
        if let Some(c) = &self.constraint {
            let mask = match &c.mask {
                Some(Ok(mask)) => mask,
                Some(Err(e)) => return Err(SequenceError::Grammar(e.clone())),
                None => return Err(SequenceError::Grammar("no token mask this step".into())),
            };
            for (j, x) in row.iter_mut().enumerate() {
                if !mask.is_allowed(j as u32) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        if row.iter().all(|x| *x == f32::NEG_INFINITY) {
            let why = "no token is allowed: the grammar, `logit_bias` and `min_tokens` exclude all";
            return Err(SequenceError::Grammar(why.into()));
        }
        let shape = logits.shape().clone();
        let row = Tensor::from_vec(row, shape.clone(), logits.device()).map_err(candle_err)?;
        let token = self.sampler.sample(&row).map_err(token_err)?;
        let (lp, top) = match (self.req.logprobs, ruled) {
            (Some(k), Some(r)) => {
                let r = Tensor::from_vec(r, shape, logits.device()).map_err(candle_err)?;
                logprobs(&r, token, k).map_err(token_err)?
            }
            _ => (0.0, Vec::new()),
        };
        if let Some(m) = self.constraint.as_mut().and_then(|c| c.matcher.as_mut()) {
            m.consume_token(token).map_err(|e| {
                SequenceError::Grammar(crate::structured::compiler::one_line(&e.to_string()))
            })?;
        }
        self.push_token(token, lp, top, tok)
    }

    /// The grammar has reached its end (its last token, or EOS after a complete text).
    fn grammar_done(&self) -> bool {
        self.constraint.as_ref().and_then(|c| c.matcher.as_ref()).is_some_and(Matcher::is_stopped)
    }

    /// Takes `token`, already chosen as this row's argmax (see [`Sequence::is_plain_greedy`]).
    pub fn accept_greedy(&mut self, token: u32, tok: &TextTokenizer) -> Result<(), SequenceError> {
        self.push_token(token, 0.0, Vec::new(), tok)
    }

    fn push_token(
        &mut self,
        token: u32,
        lp: f32,
        top: Vec<(u32, f32)>,
        tok: &TextTokenizer,
    ) -> Result<(), SequenceError> {
        self.generated.push(token);
        let grammar_done = self.grammar_done();
        let is_eos = self.ends(tok, token) || (grammar_done && tok.eos_ids.contains(&token));
        let text_ids =
            if is_eos { &self.generated[..self.generated.len() - 1] } else { &self.generated[..] };
        let text = tok.decode(text_ids).map_err(|e| SequenceError::Token(e.to_string()))?;
        let mut finish = None;
        let mut end = safe_prefix_len(&text, &self.req.stop);
        if is_eos || grammar_done {
            finish = Some(FinishReason::Stop);
            end = text.len();
        }
        // Stop strings count once `min_tokens` tokens are out (vLLM).
        let stops_live = self.generated.len() >= self.req.rules.min_tokens;
        if let Some(pos) = self
            .req
            .stop
            .iter()
            .filter(|s| stops_live && !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            finish = Some(FinishReason::Stop);
            end = pos;
        } else if finish.is_none() && self.generated.len() >= self.req.max_tokens {
            finish = Some(FinishReason::Length);
            end = text.len();
        }
        let end = end.max(self.emitted);
        let delta = text.get(self.emitted..end).unwrap_or_default().to_string();
        self.emitted = end;
        if self.req.prompt_logprobs.is_some() && !std::mem::replace(&mut self.prompt_sent, true) {
            let _ = self.events.send(TokenEvent::Prompt(std::mem::take(&mut self.prompt_lps)));
        }
        let _ = self.events.send(TokenEvent::Token { id: token, text: delta, logprob: lp, top });
        if let Some(reason) = finish {
            let usage = Usage {
                prompt_tokens: self.req.prompt_ids.len(),
                completion_tokens: self.generated.len(),
            };
            self.final_event = Some(TokenEvent::Done { reason, usage });
            self.finished = Some(reason);
        }
        self.pending = vec![token];
        Ok(())
    }
}

/// How much of `text` can be sent now: not an incomplete UTF-8 tail (the tokenizer renders it
/// as U+FFFD) and not a suffix that could still grow into a stop string.
fn safe_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    for stop in stops.iter().filter(|s| !s.is_empty()) {
        // The longest proper prefix of `stop` that `text[..end]` ends with must be held back.
        for (cut, _) in stop.char_indices().rev().filter(|(c, _)| *c > 0) {
            if text[..end].ends_with(&stop[..cut]) {
                end = end.min(text[..end].len() - cut);
                break;
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::safe_prefix_len;

    #[test]
    fn holds_back_a_possible_stop_prefix_and_broken_utf8() {
        let stops = vec!["\n###".to_string()];
        assert_eq!(safe_prefix_len("answer\n#", &stops), "answer".len());
        assert_eq!(safe_prefix_len("answer\n##", &stops), "answer".len());
        assert_eq!(safe_prefix_len("answer.", &stops), "answer.".len());
        assert_eq!(safe_prefix_len("caf\u{FFFD}", &[]), 3);
    }
}
