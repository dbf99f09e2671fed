//! What a completion request's answer looks like, in one place: the shape validation decides
//! ([`ResponseShape`]), the response id and timestamp, finish reasons, the one usage count
//! (JSON and SSE alike: each prompt's tokens once, every choice's generated tokens), the JSON
//! bodies of both endpoints, and each SSE chunk. `api::stream` only moves events.

use super::openai::*;
use crate::engine::{Collected, FinishReason, PromptLogprob, TokenEvent};
use crate::model::tokenizer::TextTokenizer;
use crate::structured::tools::{self, ToolFormat};
use actix_web::web::Bytes;
use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// Which endpoint's wire format the answer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completion,
    Chat,
    /// `/v1/responses`: validated as chat, answered in the Responses shape (`api::responses`).
    Responses,
}

impl Endpoint {
    /// The endpoint's label in metrics and the access log.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Completion => "completions",
            Endpoint::Chat => "chat_completions",
            Endpoint::Responses => "responses",
        }
    }
}

/// How to answer a validated request.
#[derive(Debug, Clone)]
pub struct ResponseShape {
    pub endpoint: Endpoint,
    /// The `model` the response names: the request's own, else the base model's id.
    pub model: String,
    /// The adapters (with versions) the request's mix applies.
    pub adapters: Vec<AppliedAdapter>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices per prompt; the sequences are prompt-major (prompt 0's `n` choices first).
    pub n: usize,
    /// Tokens of each prompt.
    pub prompt_lens: Vec<usize>,
    /// Completions with `echo`: each prompt's text, put before its choices' text.
    pub echo: Option<Vec<String>>,
    /// The request asked for log-probabilities.
    pub logprobs: bool,
    /// Completions with `echo` and `logprobs`: the prompt's tokens lead `logprobs` (OpenAI's
    /// legacy shape, the first one `null`).
    pub echo_logprobs: bool,
    /// vLLM's `prompt_logprobs` was asked for: each choice (chat: the response) carries them.
    pub prompt_logprobs: bool,
    /// Each prompt's token ids, when its log-probabilities are reported.
    pub prompt_ids: Vec<Vec<u32>>,
    /// Responses: what the `response` object repeats of its request.
    pub echoed: Option<serde_json::Value>,
    /// Chat with tools (and `tool_choice` other than `none`): calls are read out of the text
    /// in this format.
    pub tools: Option<crate::structured::tools::ToolFormat>,
}

impl ResponseShape {
    /// The usage of choices that generated `completion` tokens each (in choice order, some
    /// possibly missing when a stream ends early): each prompt counted once.
    pub fn usage(&self, completion: impl IntoIterator<Item = usize>) -> UsageOut {
        let prompt_tokens = self.prompt_lens.iter().sum();
        let completion_tokens = completion.into_iter().sum();
        UsageOut {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What every response or chunk of one request repeats, and how a stream reports itself.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub shape: ResponseShape,
    pub id: String,
    pub created: u64,
    /// How a stream records itself when it ends.
    pub obs: Option<super::observe::StreamObs>,
}

impl ResponseMeta {
    pub fn new(shape: ResponseShape) -> Self {
        let id = match shape.endpoint {
            Endpoint::Completion => format!("cmpl-{:016x}", rand::random::<u64>()),
            Endpoint::Chat => format!("chatcmpl-{:016x}", rand::random::<u64>()),
            Endpoint::Responses => format!("resp_{:032x}", rand::random::<u128>()),
        };
        Self { shape, id, created: now_secs(), obs: None }
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
            model: self.shape.model.clone(),
            choices,
            usage,
            adapters: Some(self.shape.adapters.clone()),
            prompt_logprobs: None,
        }
    }

    /// The `object` of this endpoint's stream chunks.
    pub fn chunk_object(&self) -> &'static str {
        match self.shape.endpoint {
            Endpoint::Completion => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Responses => "response",
        }
    }

    /// Choice `index`'s prompt ids and their log-probabilities, when they were computed.
    fn prompt_of<'r>(
        &'r self,
        index: usize,
        r: &'r Collected,
    ) -> Option<(&'r [u32], &'r [Option<PromptLogprob>])> {
        let ids = self.shape.prompt_ids.get(index / self.shape.n.max(1))?;
        Some((ids.as_slice(), r.prompt_logprobs.as_deref()?))
    }

    /// The whole (non-streamed) answer, from every choice's collected events.
    pub fn body(&self, results: Vec<Collected>, tok: &TextTokenizer) -> (Value, UsageOut) {
        let usage = self.shape.usage(results.iter().map(|r| r.usage.completion_tokens));
        let body = match self.shape.endpoint {
            Endpoint::Responses => match results.into_iter().next() {
                Some(r) => Ok(super::responses::body(self, r)),
                None => serde_json::to_value(()),
            },
            Endpoint::Completion => {
                let choices: Vec<CompletionChoice> = results
                    .into_iter()
                    .enumerate()
                    .map(|(index, r)| {
                        let echo = self
                            .shape
                            .echo
                            .as_ref()
                            .map(|t| t[index / self.shape.n.max(1)].as_str());
                        let prompt = self.prompt_of(index, &r);
                        let mut logprobs = self.shape.logprobs.then(CompletionLogprobs::default);
                        if let (Some(lp), true) = (logprobs.as_mut(), self.shape.echo_logprobs) {
                            if let Some((ids, values)) = prompt {
                                push_prompt_logprobs(lp, tok, ids, values);
                            }
                        }
                        if let Some(lp) = logprobs.as_mut() {
                            push_completion_logprobs(lp, &r, tok);
                        }
                        CompletionChoice {
                            index,
                            text: format!("{}{}", echo.unwrap_or_default(), r.text),
                            logprobs,
                            finish_reason: Some(finish_str(r.finish_reason)),
                            prompt_logprobs: self
                                .shape
                                .prompt_logprobs
                                .then(|| prompt.map(|(ids, v)| vllm_prompt_logprobs(tok, ids, v)))
                                .flatten(),
                        }
                    })
                    .collect();
                serde_json::to_value(self.envelope("text_completion", choices, Some(usage.clone())))
            }
            Endpoint::Chat => {
                let prompt_logprobs = match (self.shape.prompt_logprobs, results.first()) {
                    (true, Some(r)) => {
                        self.prompt_of(0, r).map(|(ids, v)| vllm_prompt_logprobs(tok, ids, v))
                    }
                    _ => None,
                };
                let choices: Vec<ChatChoice> = results
                    .into_iter()
                    .enumerate()
                    .map(|(index, r)| {
                        let logprobs = self.shape.logprobs.then(|| chat_logprobs(&r, tok));
                        let finish = finish_str(r.finish_reason);
                        let (message, finish_reason) = match self.shape.tools {
                            Some(format) => answer_with_calls(&r.text, format, finish, false),
                            None => (
                                ChatMessageOut {
                                    role: "assistant",
                                    content: Some(r.text),
                                    refusal: (),
                                    tool_calls: None,
                                },
                                finish,
                            ),
                        };
                        ChatChoice { index, logprobs, finish_reason: Some(finish_reason), message }
                    })
                    .collect();
                let mut envelope = self.envelope("chat.completion", choices, Some(usage.clone()));
                envelope.prompt_logprobs = prompt_logprobs;
                serde_json::to_value(envelope)
            }
        };
        (body.unwrap_or_default(), usage)
    }

    /// One SSE chunk for choice `index` from one event (`None` for events that print nothing).
    pub fn chunk(
        &self,
        tok: &TextTokenizer,
        index: usize,
        ev: &TokenEvent,
        first: bool,
    ) -> Option<Bytes> {
        let (text, finish, lp) = match ev {
            // Without log-probabilities a token that prints nothing (EOS, a held-back stop
            // prefix) needs no chunk.
            TokenEvent::Token { text, .. } if text.is_empty() && !self.shape.logprobs => {
                return None
            }
            TokenEvent::Token { id, text, logprob, top } => {
                (text.clone(), None, Some((*id, *logprob, top)))
            }
            TokenEvent::Done { reason, .. } => {
                (String::new(), Some(finish_str(Some(*reason))), None)
            }
            TokenEvent::Prompt(_) | TokenEvent::Error(_) => return None,
        };
        let lp = lp.filter(|_| self.shape.logprobs);
        Some(match self.shape.endpoint {
            // Its events are `api::responses`'s.
            Endpoint::Responses => return None,
            Endpoint::Completion => {
                let logprobs = lp.map(|(id, l, top)| CompletionLogprobs {
                    tokens: vec![token_text(tok, id)],
                    token_logprobs: vec![Some(l)],
                    top_logprobs: vec![Some(top_map(tok, top))],
                    text_offset: vec![0],
                });
                let choice = CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: finish,
                    prompt_logprobs: None,
                };
                sse(&self.envelope("text_completion", vec![choice], None))
            }
            Endpoint::Chat => {
                let logprobs = lp.map(|(id, l, top)| ChatLogprobs {
                    content: vec![chat_token(tok, id, l, top)],
                    refusal: (),
                });
                let delta = ChatDelta {
                    role: first.then_some("assistant"),
                    content: finish.is_none().then_some(text),
                    tool_calls: None,
                };
                let choice = ChatChunkChoice { index, delta, logprobs, finish_reason: finish };
                sse(&self.envelope("chat.completion.chunk", vec![choice], None))
            }
        })
    }
}

/// A chat answer read for tool calls: the text before the first call as content (`null` when
/// there is none) and the calls, with `finish_reason: "tool_calls"` when there are calls —
/// unless the token limit cut the answer: then it is `length` (as OpenAI says), with the calls
/// completed before the cut. Streamed calls carry their `index`.
fn answer_with_calls(
    text: &str,
    format: ToolFormat,
    finish: &'static str,
    indexed: bool,
) -> (ChatMessageOut, &'static str) {
    let (content, calls) = tools::parse(text, format, finish == "length");
    if calls.is_empty() {
        return (
            ChatMessageOut { role: "assistant", content, refusal: (), tool_calls: None },
            finish,
        );
    }
    let calls = calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| ToolCallOut {
            index: indexed.then_some(i),
            id: format!("call_{:024x}", rand::random::<u128>() >> 32),
            kind: "function",
            function: FunctionOut { name: c.name, arguments: c.arguments.to_string() },
        })
        .collect();
    let finish = if finish == "length" { "length" } else { "tool_calls" };
    (ChatMessageOut { role: "assistant", content, refusal: (), tool_calls: Some(calls) }, finish)
}

/// One streamed chat choice while tool calls are possible: answer text passes through as soon
/// as it cannot start a call; a call is held and sent whole, parsed, when the choice ends.
#[derive(Debug, Default)]
pub struct ToolStream {
    held: String,
    /// Decided: `Some(true)` the text is calls, `Some(false)` an answer.
    calls: Option<bool>,
    sent_role: bool,
}

impl ToolStream {
    /// The answer text `text` adds now: `None` while the text may still start a call, or is
    /// one (then it is held).
    pub fn answer_text(&mut self, text: &str, format: ToolFormat) -> Option<String> {
        match self.calls {
            Some(false) => Some(text.to_string()),
            Some(true) => {
                self.held.push_str(text);
                None
            }
            None => {
                self.held.push_str(text);
                let t = self.held.trim_start();
                let opener = format.opener();
                if t.is_empty() || (opener.starts_with(t) && t.len() < opener.len()) {
                    return None;
                }
                let is_call = t.starts_with(opener);
                self.calls = Some(is_call);
                (!is_call).then(|| std::mem::take(&mut self.held))
            }
        }
    }

    /// The held text (calls, or an answer too short to tell), taken.
    pub fn take_held(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

impl ResponseMeta {
    /// The chunks `ev` of choice `index` adds when the answer may hold tool calls.
    pub fn tool_chunk(&self, index: usize, ev: &TokenEvent, s: &mut ToolStream) -> Option<Bytes> {
        let format = self.shape.tools?;
        fn role(s: &mut ToolStream) -> Option<&'static str> {
            (!std::mem::replace(&mut s.sent_role, true)).then_some("assistant")
        }
        let chunk = |delta: ChatDelta, finish: Option<&'static str>| {
            let choice = ChatChunkChoice { index, delta, logprobs: None, finish_reason: finish };
            sse(&self.envelope("chat.completion.chunk", vec![choice], None))
        };
        match ev {
            TokenEvent::Token { text, .. } => {
                let out = s.answer_text(text, format)?;
                (!out.is_empty()).then(|| {
                    chunk(ChatDelta { role: role(s), content: Some(out), tool_calls: None }, None)
                })
            }
            TokenEvent::Done { reason, .. } => {
                let held = s.take_held();
                let (msg, finish) =
                    answer_with_calls(&held, format, finish_str(Some(*reason)), true);
                let mut out = Vec::new();
                let content = msg.content.filter(|c| !c.is_empty());
                if content.is_some() || msg.tool_calls.is_some() {
                    let delta = ChatDelta { role: role(s), content, tool_calls: msg.tool_calls };
                    out.extend_from_slice(&chunk(delta, None));
                }
                let end = ChatDelta { role: role(s), content: None, tool_calls: None };
                out.extend_from_slice(&chunk(end, Some(finish)));
                Some(Bytes::from(out))
            }
            TokenEvent::Prompt(_) | TokenEvent::Error(_) => None,
        }
    }

    /// A completion stream's first chunk for choice `index` under `echo` or `prompt_logprobs`:
    /// the prompt's text (with `echo`) and its log-probabilities (when they were computed).
    pub fn prompt_chunk(
        &self,
        tok: &TextTokenizer,
        index: usize,
        values: Option<&[Option<PromptLogprob>]>,
    ) -> Option<Bytes> {
        if self.shape.endpoint != Endpoint::Completion {
            return None;
        }
        let prompt = self.shape.echo.as_ref().map(|t| t[index / self.shape.n.max(1)].clone());
        let ids = self.shape.prompt_ids.get(index / self.shape.n.max(1));
        let logprobs = match (values, ids, self.shape.echo_logprobs) {
            (Some(v), Some(ids), true) => {
                let mut lp = CompletionLogprobs::default();
                push_prompt_logprobs(&mut lp, tok, ids, v);
                Some(lp)
            }
            _ => None,
        };
        let prompt_logprobs = match (values, ids, self.shape.prompt_logprobs) {
            (Some(v), Some(ids), true) => Some(vllm_prompt_logprobs(tok, ids, v)),
            _ => None,
        };
        if prompt.is_none() && prompt_logprobs.is_none() {
            return None;
        }
        let choice = CompletionChoice {
            index,
            text: prompt.unwrap_or_default(),
            logprobs,
            finish_reason: None,
            prompt_logprobs,
        };
        Some(sse(&self.envelope("text_completion", vec![choice], None)))
    }
}

/// One `data:` line of a server-sent event stream.
pub fn sse(v: &impl serde::Serialize) -> Bytes {
    Bytes::from(format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default()))
}

/// OpenAI's `finish_reason` for a sequence's end.
pub fn finish_str(f: Option<FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// The generated tokens' entries of OpenAI's legacy `logprobs`, after whatever `out` holds.
fn push_completion_logprobs(out: &mut CompletionLogprobs, r: &Collected, tok: &TextTokenizer) {
    let mut offset =
        out.text_offset.last().copied().unwrap_or(0) + out.tokens.last().map_or(0, |t| t.len());
    for (i, &id) in r.ids.iter().enumerate() {
        let t = token_text(tok, id);
        out.text_offset.push(offset);
        offset += t.len();
        out.tokens.push(t);
        out.token_logprobs.push(r.logprobs.get(i).copied());
        out.top_logprobs.push(r.top_logprobs.get(i).map(|top| top_map(tok, top)));
    }
}

/// The prompt tokens' entries of OpenAI's legacy `logprobs` (`echo`): the first token's
/// log-probability and alternatives are `null`, nothing predicts it.
fn push_prompt_logprobs(
    out: &mut CompletionLogprobs,
    tok: &TextTokenizer,
    ids: &[u32],
    values: &[Option<PromptLogprob>],
) {
    let mut offset = 0;
    for (i, &id) in ids.iter().enumerate() {
        let t = token_text(tok, id);
        out.text_offset.push(offset);
        offset += t.len();
        out.tokens.push(t);
        let v = values.get(i).and_then(Option::as_ref);
        out.token_logprobs.push(v.map(|v| v.logprob));
        out.top_logprobs.push(v.map(|v| top_map(tok, &v.top)));
    }
}

/// vLLM's `prompt_logprobs`: per prompt token `null` (the first) or
/// `{"<id>": {"logprob", "rank", "decoded_token"}}` for the token and its top alternatives.
fn vllm_prompt_logprobs(
    tok: &TextTokenizer,
    ids: &[u32],
    values: &[Option<PromptLogprob>],
) -> Vec<Option<Map<String, Value>>> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            let v = values.get(i).and_then(Option::as_ref)?;
            let mut m = Map::new();
            let entry = |lp: f32, rank: usize, id: u32| {
                serde_json::json!({"logprob": lp, "rank": rank, "decoded_token": token_text(tok, id)})
            };
            m.insert(id.to_string(), entry(v.logprob, v.rank, id));
            for (rank, &(alt, lp)) in v.top.iter().enumerate() {
                m.entry(alt.to_string()).or_insert_with(|| entry(lp, rank + 1, alt));
            }
            Some(m)
        })
        .collect()
}

fn chat_logprobs(r: &Collected, tok: &TextTokenizer) -> ChatLogprobs {
    ChatLogprobs {
        content: r
            .ids
            .iter()
            .zip(&r.logprobs)
            .zip(&r.top_logprobs)
            .map(|((&id, &lp), top)| chat_token(tok, id, lp, top))
            .collect(),
        refusal: (),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_each_prompt_once_and_every_choice() {
        let shape = ResponseShape {
            endpoint: Endpoint::Completion,
            model: "m".into(),
            adapters: vec![],
            stream: false,
            include_usage: false,
            n: 3,
            prompt_lens: vec![5, 7],
            echo: None,
            logprobs: false,
            echo_logprobs: false,
            prompt_logprobs: false,
            prompt_ids: vec![],
            echoed: None,
            tools: None,
        };
        let u = shape.usage([1, 2, 3, 4, 5, 6]);
        assert_eq!((u.prompt_tokens, u.completion_tokens, u.total_tokens), (12, 21, 33));
    }
}
