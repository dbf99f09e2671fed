//! Turning engine token events into responses: collected (JSON) or streamed as server-sent
//! events in OpenAI's chunk format, ending with `data: [DONE]`. A client that disconnects
//! drops the stream, which drops the event receivers, which cancels its sequences.

use super::error::ApiError;
use super::openai::*;
use crate::engine::{Collected, FinishReason, TokenEvent, Usage};
use crate::model::tokenizer::TextTokenizer;
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures_util::stream::{self, StreamExt};
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completion,
    Chat,
}

/// What every response or chunk of one request repeats.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub adapters: Vec<AppliedAdapter>,
    /// The request asked for log-probabilities.
    pub logprobs: bool,
    /// How a stream records itself when it ends.
    pub obs: Option<super::observe::StreamObs>,
    /// Prompt tokens of the request (each prompt once), for the access log of a stream that
    /// ends early.
    pub prompt_tokens: usize,
}

impl ResponseMeta {
    pub fn new(endpoint: Endpoint, model: String, adapters: Vec<AppliedAdapter>) -> Self {
        let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
        let id = format!("{prefix}-{:016x}", rand::random::<u64>());
        Self {
            endpoint,
            id,
            created: super::handlers::now_secs(),
            model,
            adapters,
            logprobs: false,
            obs: None,
            prompt_tokens: 0,
        }
    }

    pub fn envelope<C>(
        &self,
        object: &'static str,
        choices: Vec<C>,
        usage: Option<UsageOut>,
    ) -> Envelope<C> {
        Envelope {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            adapters: Some(self.adapters.clone()),
        }
    }
}

/// Everything one sequence produced.
pub type ChoiceResult = Collected;

fn finish_str(f: Option<FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// Response helpers on a collected sequence.
pub trait ChoiceExt {
    fn finish_str(&self) -> &'static str;
    fn completion_logprobs(&self, tok: &TextTokenizer) -> CompletionLogprobs;
    fn chat_logprobs(&self, tok: &TextTokenizer) -> ChatLogprobs;
}

impl ChoiceExt for ChoiceResult {
    fn finish_str(&self) -> &'static str {
        finish_str(self.finish_reason)
    }

    fn completion_logprobs(&self, tok: &TextTokenizer) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        let mut offset = 0;
        for (i, &id) in self.ids.iter().enumerate() {
            let t = token_text(tok, id);
            out.text_offset.push(offset);
            offset += t.len();
            out.tokens.push(t);
            out.token_logprobs.push(self.logprobs[i]);
            out.top_logprobs.push(top_map(tok, &self.top_logprobs[i]));
        }
        out
    }

    fn chat_logprobs(&self, tok: &TextTokenizer) -> ChatLogprobs {
        ChatLogprobs {
            content: self
                .ids
                .iter()
                .zip(&self.logprobs)
                .zip(&self.top_logprobs)
                .map(|((&id, &lp), top)| chat_token(tok, id, lp, top))
                .collect(),
        }
    }
}

fn token_text(tok: &TextTokenizer, id: u32) -> String {
    tok.decode(&[id]).unwrap_or_default()
}

fn top_map(tok: &TextTokenizer, top: &[(u32, f32)]) -> Map<String, Value> {
    top.iter().map(|&(id, lp)| (token_text(tok, id), Value::from(lp))).collect()
}

fn chat_token(tok: &TextTokenizer, id: u32, lp: f32, top: &[(u32, f32)]) -> ChatTokenLogprob {
    let token = token_text(tok, id);
    ChatTokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: lp,
        top_logprobs: top
            .iter()
            .map(|&(id, lp)| {
                let token = token_text(tok, id);
                TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob: lp }
            })
            .collect(),
    }
}

/// Waits for every sequence to finish. A sequence's failure fails the request with that
/// sequence's error (its other sequences are cancelled as their receivers drop).
pub async fn collect(
    rxs: Vec<UnboundedReceiver<TokenEvent>>,
) -> Result<Vec<ChoiceResult>, ApiError> {
    let mut out = Vec::with_capacity(rxs.len());
    for mut rx in rxs {
        let mut r = ChoiceResult::default();
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

fn sse(v: &impl serde::Serialize) -> Bytes {
    Bytes::from(format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default()))
}

/// One chunk for choice `index` from one event (`None` for events that print nothing).
fn chunk(
    meta: &ResponseMeta,
    tok: &TextTokenizer,
    index: usize,
    ev: &TokenEvent,
    first: bool,
) -> Option<Bytes> {
    let (text, finish, lp) = match ev {
        // Without log-probabilities a token that prints nothing (EOS, a held-back stop prefix)
        // needs no chunk.
        TokenEvent::Token { text, .. } if text.is_empty() && !meta.logprobs => return None,
        TokenEvent::Token { id, text, logprob, top } => {
            (text.clone(), None, Some((*id, *logprob, top)))
        }
        TokenEvent::Done { reason, .. } => (String::new(), Some(finish_str(Some(*reason))), None),
        TokenEvent::Error(_) => return None,
    };
    let wants_lp = meta.logprobs;
    Some(match meta.endpoint {
        Endpoint::Completion => {
            let logprobs = lp.filter(|_| wants_lp).map(|(id, l, top)| CompletionLogprobs {
                tokens: vec![token_text(tok, id)],
                token_logprobs: vec![l],
                top_logprobs: vec![top_map(tok, top)],
                text_offset: vec![0],
            });
            sse(&meta.envelope(
                "text_completion",
                vec![CompletionChoice { index, text, logprobs, finish_reason: finish }],
                None,
            ))
        }
        Endpoint::Chat => {
            let logprobs = lp
                .filter(|_| wants_lp)
                .map(|(id, l, top)| ChatLogprobs { content: vec![chat_token(tok, id, l, top)] });
            let delta = ChatDelta {
                role: first.then_some("assistant"),
                content: (finish.is_none()).then_some(text),
            };
            sse(&meta.envelope(
                "chat.completion.chunk",
                vec![ChatChunkChoice { index, delta, logprobs, finish_reason: finish }],
                None,
            ))
        }
    })
}

/// The SSE response for all sequences of a request, interleaved as their tokens arrive.
/// `n_per_prompt` choices share each prompt (its tokens are counted once in the usage).
pub fn sse_response(
    rxs: Vec<UnboundedReceiver<TokenEvent>>,
    meta: ResponseMeta,
    tok: Arc<TextTokenizer>,
    include_usage: bool,
    n_per_prompt: usize,
) -> HttpResponse {
    let n = rxs.len();
    let tagged = rxs.into_iter().enumerate().map(|(i, rx)| {
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |ev| (i, ev))
    });
    let events = stream::select_all(tagged);
    let guard = super::observe::StreamGuard {
        obs: meta.obs.clone(),
        completed: false,
        error_status: None,
        usage: (meta.prompt_tokens, 0),
    };
    let state = (events, vec![true; n], 0usize, Usage::default(), false, guard);
    let body = stream::unfold(
        state,
        move |(mut events, mut first, mut done, mut usage, ended, mut guard)| {
            let meta = meta.clone();
            let tok = tok.clone();
            async move {
                if ended {
                    return None;
                }
                loop {
                    match events.next().await {
                        Some((i, ev)) => {
                            if let TokenEvent::Error(e) = &ev {
                                let err = ApiError::from(e.clone());
                                let mut out = sse(&err.body()).to_vec();
                                out.extend_from_slice(b"data: [DONE]\n\n");
                                guard.error_status = Some(err.status.as_u16());
                                return Some((
                                    Ok::<_, actix_web::Error>(Bytes::from(out)),
                                    (events, first, done, usage, true, guard),
                                ));
                            }
                            if let TokenEvent::Token { .. } = &ev {
                                guard.usage.1 += 1;
                            }
                            if let TokenEvent::Done { usage: u, .. } = &ev {
                                done += 1;
                                if i % n_per_prompt.max(1) == 0 {
                                    usage.prompt_tokens += u.prompt_tokens;
                                }
                                usage.completion_tokens += u.completion_tokens;
                            }
                            let is_first = std::mem::replace(&mut first[i], false);
                            let mut out = chunk(&meta, &tok, i, &ev, is_first)
                                .map(|b| b.to_vec())
                                .unwrap_or_default();
                            if done == n {
                                if include_usage {
                                    let u = UsageOut {
                                        prompt_tokens: usage.prompt_tokens,
                                        completion_tokens: usage.completion_tokens,
                                        total_tokens: usage.prompt_tokens + usage.completion_tokens,
                                    };
                                    let object = if meta.endpoint == Endpoint::Chat {
                                        "chat.completion.chunk"
                                    } else {
                                        "text_completion"
                                    };
                                    out.extend_from_slice(&sse(&meta.envelope::<Value>(
                                        object,
                                        vec![],
                                        Some(u),
                                    )));
                                }
                                out.extend_from_slice(b"data: [DONE]\n\n");
                                guard.completed = true;
                                guard.usage = (usage.prompt_tokens, usage.completion_tokens);
                                return Some((
                                    Ok(Bytes::from(out)),
                                    (events, first, done, usage, true, guard),
                                ));
                            }
                            if !out.is_empty() {
                                return Some((
                                    Ok(Bytes::from(out)),
                                    (events, first, done, usage, false, guard),
                                ));
                            }
                        }
                        None => return None,
                    }
                }
            }
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body)
}
