//! Token choice from logits: the rules that reshape one row's logits (`logit_bias`,
//! `min_tokens`, repetition / presence / frequency penalties), greedy or seeded temperature /
//! `min_p` / top-k / top-p sampling (candle's `LogitsProcessor` after our `min_p` cut), plus the
//! log-probabilities of the chosen token and its top alternatives.

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
    /// 0 = off: tokens less likely than `min_p` × the likeliest one (after temperature) are
    /// dropped (vLLM's and transformers' `min_p`).
    pub min_p: f32,
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
        Self { temperature: 0.0, top_p: 1.0, top_k: None, min_p: 0.0, seed: 0 }
    }
}

/// Per-sequence sampler state (its RNG advances with every sampled token).
pub struct Sampler {
    lp: LogitsProcessor,
    temperature: f32,
    min_p: f32,
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
        let temperature = if p.is_greedy() { 0.0 } else { t as f32 };
        Self { lp: LogitsProcessor::from_sampling(p.seed, sampling), temperature, min_p: p.min_p }
    }

    /// Picks the next token from one row of logits (`(vocab,)`, f32).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        if self.min_p > 0.0 && self.temperature > 0.0 {
            let mut v = logits.to_vec1::<f32>()?;
            min_p_cut(&mut v, self.temperature, self.min_p);
            return Ok(self.lp.sample(&Tensor::from_vec(v, logits.shape(), logits.device())?)?);
        }
        Ok(self.lp.sample(logits)?)
    }
}

/// `min_p` on logits: `softmax(l / T)[j] < min_p · max_k softmax(l / T)[k]` is
/// `l[j] < max(l) + T · ln(min_p)`, so the cut needs no softmax; those tokens get `-inf`.
pub fn min_p_cut(logits: &mut [f32], temperature: f32, min_p: f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let floor = max + temperature * min_p.ln();
    for x in logits.iter_mut().filter(|x| **x < floor) {
        *x = f32::NEG_INFINITY;
    }
}

/// What reshapes one row's logits before its sampler, applied in vLLM's order: `logit_bias`,
/// the `min_tokens` ban, then the penalties.
/// - `logit_bias` (OpenAI): `logit[j] += bias[j]`.
/// - `min_tokens` (vLLM): the `early_stop` tokens (EOS, `stop_token_ids`) get `-inf` while
///   fewer than `min_tokens` tokens have been generated.
/// - `repetition_penalty` (transformers, vLLM): for every token `j` of the prompt or the output,
///   `logit[j] /= r` when positive, `logit[j] *= r` otherwise.
/// - `presence_penalty`, `frequency_penalty` (OpenAI), over the generated tokens only:
///   `logit[j] -= count[j] · frequency + (count[j] > 0) · presence`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitRules {
    pub presence: f32,
    pub frequency: f32,
    /// 1 = off.
    pub repetition: f32,
    /// `(token, bias)` pairs, distinct tokens.
    pub bias: Vec<(u32, f32)>,
    pub min_tokens: usize,
}

impl Default for LogitRules {
    fn default() -> Self {
        Self { presence: 0.0, frequency: 0.0, repetition: 1.0, bias: Vec::new(), min_tokens: 0 }
    }
}

impl LogitRules {
    /// Whether no rule can change the logits, so that the row's argmax is its greedy token.
    pub fn is_none(&self) -> bool {
        self.presence == 0.0
            && self.frequency == 0.0
            && self.repetition == 1.0
            && self.bias.is_empty()
            && self.min_tokens == 0
    }

    /// Applies every rule to one row of logits, given the prompt, the tokens generated so far
    /// and the tokens that would end the sequence early.
    pub fn apply(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32], early_stop: &[u32]) {
        for &(t, b) in &self.bias {
            if let Some(x) = logits.get_mut(t as usize) {
                *x += b;
            }
        }
        if generated.len() < self.min_tokens {
            for &t in early_stop {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        if self.repetition != 1.0 {
            let seen: std::collections::HashSet<u32> =
                prompt.iter().chain(generated).copied().collect();
            for t in seen {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / self.repetition } else { *x * self.repetition };
                }
            }
        }
        if self.presence != 0.0 || self.frequency != 0.0 {
            let mut counts = std::collections::HashMap::<u32, f32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1.0;
            }
            for (t, c) in counts {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x -= c * self.frequency + self.presence;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (no dependency on the sampler's RNG).
    fn logits(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x % 20_000) as f32 / 1000.0) - 10.0
            })
            .collect()
    }

    /// transformers' `RepetitionPenaltyLogitsProcessor`: gather the scores of the tokens in
    /// `input_ids`, `where(score < 0, score * p, score / p)`, scatter back.
    fn reference_repetition(scores: &[f32], input_ids: &[u32], p: f32) -> Vec<f32> {
        let mut out = scores.to_vec();
        let gathered: Vec<(usize, f32)> =
            input_ids.iter().map(|&i| (i as usize, scores[i as usize])).collect();
        for (i, s) in gathered {
            out[i] = if s < 0.0 { s * p } else { s / p };
        }
        out
    }

    /// OpenAI's documented penalties: `mu[j] - c[j] * alpha_frequency - (c[j] > 0) *
    /// alpha_presence`, `c` counting the sampled tokens.
    fn reference_openai(
        scores: &[f32],
        sampled: &[u32],
        presence: f32,
        frequency: f32,
    ) -> Vec<f32> {
        (0..scores.len())
            .map(|j| {
                let c = sampled.iter().filter(|&&t| t as usize == j).count() as f32;
                scores[j] - c * frequency - if c > 0.0 { presence } else { 0.0 }
            })
            .collect()
    }

    /// transformers' `MinPLogitsWarper` after temperature: softmax, keep `p >= min_p · p_max`.
    fn reference_min_p(scores: &[f32], t: f32, min_p: f32) -> Vec<bool> {
        let scaled: Vec<f64> = scores.iter().map(|&s| (s / t) as f64).collect();
        let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scaled.iter().map(|s| (s - max).exp()).sum();
        let probs: Vec<f64> = scaled.iter().map(|s| (s - max).exp() / z).collect();
        let top = probs.iter().copied().fold(0.0, f64::max);
        probs.iter().map(|&p| p >= min_p as f64 * top).collect()
    }

    #[test]
    fn repetition_penalty_matches_transformers_over_prompt_and_output() {
        for seed in 1..20 {
            let l = logits(seed, 64);
            let (prompt, generated) = ([3u32, 9, 9, 40], [9u32, 17, 63, 3]);
            let rules = LogitRules { repetition: 1.3, ..Default::default() };
            let mut got = l.clone();
            rules.apply(&mut got, &prompt, &generated, &[]);
            let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
            assert_eq!(got, reference_repetition(&l, &all, 1.3), "seed {seed}");
        }
    }

    #[test]
    fn presence_and_frequency_match_openai_over_the_output_only() {
        let l = logits(7, 32);
        let rules = LogitRules { presence: 0.5, frequency: 0.3, ..Default::default() };
        let mut got = l.clone();
        rules.apply(&mut got, &[1, 2, 3], &[5, 5, 6, 31], &[]);
        let want = reference_openai(&l, &[5, 5, 6, 31], 0.5, 0.3);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn logit_bias_adds_and_min_tokens_bans_early_stops_until_reached() {
        let l = logits(3, 16);
        let rules =
            LogitRules { bias: vec![(2, 5.0), (4, -100.0)], min_tokens: 2, ..Default::default() };
        let mut got = l.clone();
        rules.apply(&mut got, &[], &[1], &[0, 7]);
        assert_eq!(got[2], l[2] + 5.0);
        assert_eq!(got[4], l[4] - 100.0);
        assert_eq!((got[0], got[7]), (f32::NEG_INFINITY, f32::NEG_INFINITY));
        let mut later = l.clone();
        rules.apply(&mut later, &[], &[1, 1], &[0, 7]);
        assert_eq!((later[0], later[7]), (l[0], l[7]), "the ban ends at min_tokens");
        // Out-of-range ids (validated away at the edge) change nothing.
        let mut same = l.clone();
        LogitRules { bias: vec![(99, 1.0)], ..Default::default() }.apply(&mut same, &[], &[], &[]);
        assert_eq!(same, l);
    }

    #[test]
    fn min_p_cut_keeps_exactly_what_transformers_keeps() {
        for seed in 1..30 {
            let l = logits(seed, 200);
            for (t, p) in [(1.0, 0.05), (0.7, 0.2), (1.5, 0.01), (0.3, 0.9)] {
                let mut got = l.clone();
                min_p_cut(&mut got, t, p);
                let kept: Vec<bool> = got.iter().map(|x| x.is_finite()).collect();
                let want = reference_min_p(&l, t, p);
                // The two can only disagree within float rounding of the threshold.
                for (j, (k, w)) in kept.iter().zip(&want).enumerate() {
                    if k != w {
                        let margin = (l[j]
                            - (l.iter().copied().fold(f32::MIN, f32::max) + t * p.ln()))
                        .abs();
                        assert!(margin < 1e-4, "seed {seed} t {t} p {p} token {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn min_p_sampling_never_picks_a_cut_token() {
        let l = logits(11, 100);
        let p = SamplingParams { temperature: 1.0, min_p: 0.3, seed: 5, ..Default::default() };
        let mut s = Sampler::new(&p);
        let keep = reference_min_p(&l, 1.0, 0.3);
        let t = Tensor::new(l.as_slice(), &candle_core::Device::Cpu).unwrap();
        for _ in 0..200 {
            let tok = s.sample(&t).unwrap() as usize;
            assert!(keep[tok], "picked {tok}, which min_p cuts");
        }
    }
}
