//! Moving a request's token events to its client: collected into one JSON answer, or streamed
//! as server-sent events ending with `data: [DONE]`, choices interleaved as their tokens come.
//! What the answer and each chunk contain is `api::response`'s. A client that disconnects
//! drops the stream, which drops the event receivers, which cancels its sequences.

use super::error::ApiError;
use super::observe::StreamGuard;
use super::response::{sse, ResponseMeta};
use crate::engine::{Collected, TokenEvent};
use crate::model::tokenizer::TextTokenizer;
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// Waits for every sequence to finish. A sequence's failure fails the request with that
/// sequence's error (its other sequences are cancelled as their receivers drop).
pub async fn collect(rxs: Vec<UnboundedReceiver<TokenEvent>>) -> Result<Vec<Collected>, ApiError> {
    let mut out = Vec::with_capacity(rxs.len());
    for mut rx in rxs {
        let mut r = Collected::default();
        while r.finish_reason.is_none() {
            match rx.recv().await {
                Some(ev) => r.push(ev).map_err(ApiError::from)?,
                None => return Err(ApiError::internal("the engine dropped a sequence")),
            }
        }
        out.push(r);
    }
    Ok(out)
}

/// Where a stream stands: which choices have sent their first chunk, each choice's tokens so
/// far, how many are done, and the guard that records the stream when it ends.
struct Progress {
    first: Vec<bool>,
    /// Each choice's prompt chunk (echo, prompt log-probabilities) has been sent, or was not due.
    prompt_sent: Vec<bool>,
    /// Each choice's held text when its answer may be tool calls.
    tool_streams: Vec<super::response::ToolStream>,
    tokens: Vec<usize>,
    done: usize,
    ended: bool,
    guard: StreamGuard,
}

impl Progress {
    /// The bytes `ev` of choice `i` adds to the stream (possibly none).
    fn on_event(
        &mut self,
        meta: &ResponseMeta,
        tok: &TextTokenizer,
        i: usize,
        ev: &TokenEvent,
    ) -> Vec<u8> {
        if let TokenEvent::Error(e) = ev {
            let err = ApiError::from(e.clone());
            self.guard.error_status = Some(err.status.as_u16());
            self.ended = true;
            let mut out = sse(&err.body()).to_vec();
            out.extend_from_slice(b"data: [DONE]\n\n");
            return out;
        }
        // A completion's prompt (`echo`, prompt log-probabilities) leads its choice's chunks.
        let mut out = Vec::new();
        if !self.prompt_sent[i] {
            self.prompt_sent[i] = true;
            let values = match ev {
                TokenEvent::Prompt(v) => Some(v.as_slice()),
                _ => None,
            };
            if let Some(b) = meta.prompt_chunk(tok, i, values) {
                out.extend_from_slice(&b);
            }
        }
        match ev {
            TokenEvent::Token { .. } => self.tokens[i] += 1,
            TokenEvent::Done { usage, .. } => {
                self.tokens[i] = usage.completion_tokens;
                self.done += 1;
            }
            TokenEvent::Prompt(_) => return out,
            TokenEvent::Error(_) => {}
        }
        let usage = meta.shape.usage(self.tokens.iter().copied());
        self.guard.usage = (usage.prompt_tokens, usage.completion_tokens);
        let is_first = std::mem::replace(&mut self.first[i], false);
        let chunk = match meta.shape.tools {
            Some(_) => meta.tool_chunk(i, ev, &mut self.tool_streams[i]),
            None => meta.chunk(tok, i, ev, is_first),
        };
        out.extend(chunk.map(|b| b.to_vec()).unwrap_or_default());
        if self.done == self.tokens.len() {
            if meta.shape.include_usage {
                out.extend_from_slice(&sse(&meta.envelope::<Value>(
                    meta.chunk_object(),
                    vec![],
                    Some(usage),
                )));
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
            self.guard.completed = true;
            self.ended = true;
        }
        out
    }
}

/// The SSE response for all sequences of a request, interleaved as their tokens arrive.
pub fn sse_response(
    rxs: Vec<UnboundedReceiver<TokenEvent>>,
    meta: ResponseMeta,
    tok: Arc<TextTokenizer>,
) -> HttpResponse {
    let n = rxs.len();
    let tagged = rxs.into_iter().enumerate().map(|(i, rx)| {
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |ev| (i, ev))
    });
    let events = stream::select_all(tagged);
    let prompt_tokens = meta.shape.prompt_lens.iter().sum();
    let guard = StreamGuard {
        obs: meta.obs.clone(),
        completed: false,
        error_status: None,
        usage: (prompt_tokens, 0),
    };
    let progress = Progress {
        first: vec![true; n],
        prompt_sent: vec![false; n],
        tool_streams: (0..n).map(|_| Default::default()).collect(),
        tokens: vec![0; n],
        done: 0,
        ended: false,
        guard,
    };
    let body = stream::unfold((events, progress), move |(mut events, mut progress)| {
        let (meta, tok) = (meta.clone(), tok.clone());
        async move {
            while !progress.ended {
                let (i, ev) = events.next().await?;
                let out = progress.on_event(&meta, &tok, i, &ev);
                if !out.is_empty() {
                    return Some((Ok::<_, actix_web::Error>(Bytes::from(out)), (events, progress)));
                }
            }
            None
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body)
}
