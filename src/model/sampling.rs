//! Token choice from logits: greedy or seeded temperature / top-k / top-p sampling (candle's
//! `LogitsProcessor`), plus the log-probabilities of the chosen token and its top alternatives.

use super::Result;
use candle_core::{Tensor, D};
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// Validated sampling settings of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// 1.0 = off.
    pub top_p: f64,
    /// `None` = off.
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl SamplingParams {
    /// Whether the token is the plain argmax of the (penalised) logits.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: None, seed: 0 }
    }
}

/// Per-sequence sampler state (its RNG advances with every sampled token).
pub struct Sampler {
    lp: LogitsProcessor,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let t = p.temperature;
        let sampling = if p.is_greedy() {
            Sampling::ArgMax
        } else {
            match (p.top_k, p.top_p < 1.0) {
                (None, false) => Sampling::All { temperature: t },
                (Some(k), false) => Sampling::TopK { k, temperature: t },
                (None, true) => Sampling::TopP { p: p.top_p, temperature: t },
                (Some(k), true) => Sampling::TopKThenTopP { k, p: p.top_p, temperature: t },
            }
        };
        Self { lp: LogitsProcessor::from_sampling(p.seed, sampling) }
    }

    /// Picks the next token from one row of logits (`(vocab,)`, f32).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        Ok(self.lp.sample(logits)?)
    }
}

/// OpenAI's presence and frequency penalties over the tokens generated so far:
/// `logit[j] -= count[j] · frequency + (count[j] > 0) · presence`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Penalties {
    pub presence: f32,
    pub frequency: f32,
}

impl Penalties {
    /// Whether both penalties are off, so that [`Penalties::apply`] leaves the logits as they are.
    pub fn is_none(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0
    }

    /// The logits row with penalties applied (the same tensor when both are zero).
    pub fn apply(&self, logits: &Tensor, generated: &[u32]) -> Result<Tensor> {
        if self.is_none() || generated.is_empty() {
            return Ok(logits.clone());
        }
        let mut v = logits.to_vec1::<f32>()?;
        let mut counts = std::collections::HashMap::<u32, f32>::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1.0;
        }
        for (t, c) in counts {
            if let Some(x) = v.get_mut(t as usize) {
                *x -= c * self.frequency + self.presence;
            }
        }
        Ok(Tensor::from_vec(v, logits.shape(), logits.device())?)
    }
}

/// Log-probability of `chosen` and the `k` most likely tokens (descending) under the model's
/// raw distribution (before temperature), from one row of logits.
pub fn logprobs(logits: &Tensor, chosen: u32, k: usize) -> Result<(f32, Vec<(u32, f32)>)> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?.to_vec1::<f32>()?;
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
    }
    let mut top: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i, lp[i as usize])).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok((lp.get(chosen as usize).copied().unwrap_or(f32::NEG_INFINITY), top))
}
