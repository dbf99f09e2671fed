//! Synchronous batched generation on the caller's thread (the CLI and tests): the same
//! [`Batcher`] the engine thread runs, fed all requests at once, results collected in order.

use crate::engine::sequence::Sequence;
use crate::engine::{Batcher, Collected, LoraPath, Request, TokenEvent};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{Decoder, ModelError, Result};

/// One sequence's result.
pub type GenOutput = Collected;

/// Generates for every request in one batch; outputs come back in request order.
pub fn generate(
    model: &Decoder,
    tok: &TextTokenizer,
    reqs: &[Request],
    path: LoraPath,
) -> Result<Vec<GenOutput>> {
    generate_chunked(model, tok, reqs, path, usize::MAX)
}

/// [`generate`] with prompts fed at most `prefill_chunk` tokens per step (chunked prefill).
pub fn generate_chunked(
    model: &Decoder,
    tok: &TextTokenizer,
    reqs: &[Request],
    path: LoraPath,
    prefill_chunk: usize,
) -> Result<Vec<GenOutput>> {
    let mut batcher = Batcher::new(model, tok, path);
    batcher.prefill_chunk = prefill_chunk;
    run_all(&mut batcher, reqs)
}

/// Queues every request on `batcher` (with its pool, budget and prefix cache), steps until
/// all are done, and collects the results in request order.
pub fn run_all(batcher: &mut Batcher<'_>, reqs: &[Request]) -> Result<Vec<GenOutput>> {
    let mut receivers = Vec::with_capacity(reqs.len());
    for r in reqs {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut r = r.clone();
        r.max_tokens = r.max_tokens.max(1);
        let id = batcher.fresh_id();
        batcher.add(Sequence::new(id, r, batcher.num_layers(), tx));
        receivers.push(rx);
    }
    while !batcher.is_empty() {
        batcher.step();
    }
    receivers.into_iter().map(collect).collect()
}

fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<TokenEvent>) -> Result<GenOutput> {
    let mut out = Collected::default();
    while let Ok(ev) = rx.try_recv() {
        out.push(ev).map_err(|e| ModelError::Generation(e.to_string()))?;
    }
    Ok(out)
}
