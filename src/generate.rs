//! Synchronous batched generation on the caller's thread (the CLI and tests): the same
//! [`Batcher`] the engine thread runs, fed all requests at once, results collected in order.

use crate::engine::sequence::Sequence;
use crate::engine::{Batcher, FinishReason, LoraPath, Request, TokenEvent};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{Llama, ModelError, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct GenOutput {
    /// Generated ids, including a final EOS if one stopped generation.
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Log-probability of each generated token (when asked for).
    pub logprobs: Vec<f32>,
    /// Top alternatives at each generated position (when asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

/// Generates for every request in one batch; outputs come back in request order.
pub fn generate(model: &Llama, tok: &TextTokenizer, reqs: &[Request], path: LoraPath) -> Result<Vec<GenOutput>> {
    let mut batcher = Batcher::new(model, tok, path);
    let mut receivers = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut r = r.clone();
        r.max_tokens = r.max_tokens.max(1);
        batcher.add(Sequence::new(i as u64, r, model.cfg.num_layers, tx));
        receivers.push(rx);
    }
    while !batcher.is_empty() {
        batcher.step();
    }
    receivers.into_iter().map(collect).collect()
}

fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<TokenEvent>) -> Result<GenOutput> {
    let mut out = GenOutput { ids: vec![], text: String::new(), finish_reason: FinishReason::Length, logprobs: vec![], top_logprobs: vec![] };
    while let Ok(ev) = rx.try_recv() {
        match ev {
            TokenEvent::Token { id, text, logprob, top } => {
                out.ids.push(id);
                out.text.push_str(&text);
                out.logprobs.push(logprob);
                out.top_logprobs.push(top);
            }
            TokenEvent::Done { reason, .. } => out.finish_reason = reason,
            TokenEvent::Error(e) => return Err(ModelError::Generation(e)),
        }
    }
    Ok(out)
}
