//! SQuAD evaluation: batched greedy answers for the base model or any adapter mix, scored
//! with the official EM/F1 (best over the references), as a JSON report and a short table.

use super::metrics::score;
use super::params::LoraParams;
use super::squad::{self, QaExample};
use crate::engine::kv_pool::KvPool;
use crate::engine::Batcher;
use crate::engine::{LoraPath, Request};
use crate::generate::run_all;
use crate::model::kv_cache::blocks_for;
use crate::model::lora::AdapterMix;
use crate::model::tokenizer::TextTokenizer;
use crate::model::Decoder;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// Generation stops at EOS, a new `###` section, or a blank line.
pub const STOPS: [&str; 2] = ["\n###", "\n\n"];
pub const MAX_NEW_TOKENS: usize = 32;

#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub id: String,
    pub prediction: String,
    pub answers: Vec<String>,
    pub exact_match: f64,
    pub f1: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub n: usize,
    /// Percentages, as the official script prints them.
    pub exact_match: f64,
    pub f1: f64,
    pub seconds: f64,
    /// Prompt tokens looked up in the prefix cache, and those found there (0 with it off).
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub predictions: Vec<Prediction>,
}

/// Answers and scores `examples` with `mix`, `batch` questions decoding at a time
/// (continuous batching, in order). With `prefix_cache`, a question reuses the KV blocks of
/// its passage computed for an earlier question of the same passage.
pub fn evaluate(
    model: &Decoder,
    tok: &TextTokenizer,
    examples: &[QaExample],
    mix: &AdapterMix,
    batch: usize,
    prefix_cache: bool,
) -> anyhow::Result<EvalReport> {
    let started = std::time::Instant::now();
    let reqs: Vec<Request> = examples
        .iter()
        .map(|ex| {
            let ids = tok.encode(&squad::prompt(ex))?;
            Ok(Request {
                stop: STOPS.iter().map(|s| s.to_string()).collect(),
                ..Request::greedy(ids, mix.clone(), MAX_NEW_TOKENS)
            })
        })
        .collect::<crate::model::Result<_>>()?;
    // Room for the batch and, as much again, for cached passages (LRU beyond that).
    let longest = reqs.iter().map(|r| r.prompt_ids.len() + r.max_tokens).max().unwrap_or(1);
    let blocks = 2 * batch.max(1) * blocks_for(longest);
    let pool =
        KvPool::new(blocks, model.cfg.num_layers, model.kv_width(), model.host_kv(), prefix_cache);
    let mut batcher = Batcher::with_pool(model, tok, LoraPath::Batched, pool);
    batcher.max_batch = batch.max(1);
    let outs = run_all(&mut batcher, &reqs)?;
    let mut predictions = Vec::with_capacity(examples.len());
    for (ex, out) in examples.iter().zip(outs) {
        let prediction = out.text.trim().to_string();
        let (em, f1) = score(&prediction, &ex.answers);
        predictions.push(Prediction {
            id: ex.id.clone(),
            prediction,
            answers: ex.answers.clone(),
            exact_match: em,
            f1,
        });
    }
    let n = predictions.len().max(1) as f64;
    Ok(EvalReport {
        n: predictions.len(),
        exact_match: 100.0 * predictions.iter().map(|p| p.exact_match).sum::<f64>() / n,
        f1: 100.0 * predictions.iter().map(|p| p.f1).sum::<f64>() / n,
        seconds: started.elapsed().as_secs_f64(),
        prompt_tokens: reqs.iter().map(|r| r.prompt_ids.len() as u64).sum(),
        cached_prompt_tokens: batcher.pool.counters.hit_tokens,
        predictions,
    })
}

/// A dev-slice evaluation of parameters in training (used by `--eval-every`).
pub fn evaluate_params(
    model: &Decoder,
    tok: &TextTokenizer,
    params: &LoraParams,
    data: &Path,
    limit: usize,
) -> anyhow::Result<EvalReport> {
    let examples: Vec<QaExample> = squad::load(data)?.into_iter().take(limit).collect();
    let adapter = Arc::new(params.detached_adapter(&model.cfg, "in-training")?);
    evaluate(model, tok, &examples, &AdapterMix::single(adapter, 1.0), 16, true)
}
