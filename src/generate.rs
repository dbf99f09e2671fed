//! Batched generation over the model: prefill every prompt in one ragged forward, then decode
//! the running sequences together until each hits EOS, a stop string or its token limit.
//! Sequences that finish leave the batch; the LoRA operands are rebuilt only when the batch
//! composition changes.

use crate::adapters::AdapterMix;
use crate::model::sampling::{logprobs, Sampler, SamplingParams};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{BatchInput, Llama, Result, SeqCache, StepLora};
use candle_core::Tensor;
use serde::Serialize;

/// Which LoRA implementation a generation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    Batched,
    PerRow,
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt_ids: Vec<u32>,
    pub mix: AdapterMix,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// How many top alternatives to report per position (0 = none).
    pub top_logprobs: usize,
    /// Stop at the tokenizer's EOS ids.
    pub stop_at_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenOutput {
    /// Generated ids, including a final EOS if one stopped generation.
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Log-probability of each generated token.
    pub logprobs: Vec<f32>,
    /// Top alternatives at each generated position.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

struct Running {
    idx: usize,
    cache: SeqCache,
    sampler: Sampler,
    out: GenOutput,
    done: bool,
}

/// Generates for all requests at once (one batch) and returns outputs in request order.
/// Every request produces at least one token.
pub fn generate(model: &Llama, tok: &TextTokenizer, reqs: &[GenRequest], path: LoraPath) -> Result<Vec<GenOutput>> {
    let mut running: Vec<Running> = reqs
        .iter()
        .enumerate()
        .map(|(idx, r)| Running {
            idx,
            cache: SeqCache::new(model.cfg.num_layers, r.prompt_ids.len() + r.max_tokens),
            sampler: Sampler::new(&r.sampling),
            out: GenOutput { ids: vec![], text: String::new(), finish_reason: FinishReason::Length, logprobs: vec![], top_logprobs: vec![] },
            done: false,
        })
        .collect();
    let mut input = BatchInput::default();
    for r in reqs {
        input.push(&r.prompt_ids);
    }
    let mut lora = step_lora(model, reqs, &running, path)?;
    let mut finished: Vec<Running> = Vec::new();
    loop {
        if running.is_empty() || input.tokens.is_empty() {
            break;
        }
        let logits = {
            let mut caches: Vec<&mut SeqCache> = running.iter_mut().map(|r| &mut r.cache).collect();
            let hidden = model.forward(&input, Some(&mut caches), &lora)?;
            model.logits(&Llama::last_rows(&hidden, &input.seq_lens)?)?
        };
        let mut next = BatchInput::default();
        for (row, r) in running.iter_mut().enumerate() {
            let req = &reqs[r.idx];
            let token = advance(r, req, tok, &logits.get(row)?)?;
            if !r.done {
                next.push(&[token]);
            }
        }
        let before = running.len();
        let (done, keep): (Vec<_>, Vec<_>) = running.into_iter().partition(|r| r.done);
        finished.extend(done);
        running = keep;
        if running.len() != before {
            lora = step_lora(model, reqs, &running, path)?;
        }
        input = next;
    }
    finished.extend(running);
    finished.sort_by_key(|r| r.idx);
    Ok(finished.into_iter().map(|r| r.out).collect())
}

fn step_lora(model: &Llama, reqs: &[GenRequest], running: &[Running], path: LoraPath) -> Result<StepLora> {
    let mixes: Vec<&AdapterMix> = running.iter().map(|r| &reqs[r.idx].mix).collect();
    match path {
        LoraPath::Batched => StepLora::batched(&mixes, model.cfg.num_layers, model.dtype(), model.device()),
        LoraPath::PerRow => Ok(StepLora::per_row(&mixes)),
    }
}

/// Samples the next token of one sequence, records it, and decides whether it is finished.
fn advance(r: &mut Running, req: &GenRequest, tok: &TextTokenizer, logits: &Tensor) -> Result<u32> {
    let token = r.sampler.sample(logits)?;
    let (lp, top) = logprobs(logits, token, req.top_logprobs)?;
    r.out.ids.push(token);
    r.out.logprobs.push(lp);
    r.out.top_logprobs.push(top);
    let is_eos = req.stop_at_eos && tok.eos_ids.contains(&token);
    let text_ids = if is_eos { &r.out.ids[..r.out.ids.len() - 1] } else { &r.out.ids[..] };
    r.out.text = tok.decode(text_ids)?;
    if is_eos {
        r.out.finish_reason = FinishReason::Stop;
        r.done = true;
    } else if let Some(pos) = req.stop.iter().filter_map(|s| r.out.text.find(s.as_str())).min() {
        r.out.text.truncate(pos);
        r.out.finish_reason = FinishReason::Stop;
        r.done = true;
    } else if r.out.ids.len() >= req.max_tokens {
        r.done = true;
    }
    Ok(token)
}
