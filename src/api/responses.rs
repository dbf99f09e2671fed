//! Stateless `/v1/responses` (OpenAI's Responses API): the request is translated into a chat
//! request and validated as one (`input` text or items — messages, `function_call`,
//! `function_call_output` — `instructions`, function `tools`, `tool_choice`,
//! `max_output_tokens`, `text.format`, the `adapters` extension), run as one sequence, and
//! answered as a `response` object, or streamed with the Responses event types. Nothing is
//! stored: `store: true`, `previous_response_id` and `background` are refused by name.

use super::error::ApiError;
use super::observe::StreamGuard;
use super::openai::{ChatRequest, UsageOut};
use super::response::ResponseMeta;
use crate::engine::{Collected, FinishReason, TokenEvent};
use crate::structured::tools::{self, ToolFormat};
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

/// Fields that pass through to the chat request unchanged.
const SAME: [&str; 9] = [
    "model",
    "temperature",
    "top_p",
    "stream",
    "parallel_tool_calls",
    "user",
    "adapters",
    "seed",
    "top_k",
];
/// Fields clients send that change nothing in a stateless answer.
const IGNORED: [&str; 3] = ["metadata", "include", "service_tier"];

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).with_param(param)
}

/// The text of a content field: a string, or `input_text` / `output_text` parts.
fn text_of(param: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for (i, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str))
                {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => s.push_str(t),
                    (kind, _) => {
                        let msg = format!(
                            "content part of type `{}` is not supported; only input_text and output_text",
                            kind.unwrap_or("?")
                        );
                        return Err(bad(&format!("{param}[{i}]"), msg));
                    }
                }
            }
            Ok(s)
        }
        _ => Err(bad(param, format!("`{param}` must be a string or a list of content parts"))),
    }
}

/// `input` (and `instructions`) → chat messages.
fn messages(body: &Map<String, Value>) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    if let Some(i) = body.get("instructions").filter(|v| !v.is_null()) {
        out.push(json!({"role": "system", "content": text_of("instructions", i)?}));
    }
    match body.get("input") {
        Some(Value::String(s)) => out.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("input[{i}]");
                let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
                match kind {
                    "message" => {
                        let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                        let content = text_of(
                            &format!("{p}.content"),
                            item.get("content").unwrap_or(&Value::Null),
                        )?;
                        out.push(json!({"role": role, "content": content}));
                    }
                    "function_call" => {
                        let field = |k: &str| {
                            item.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(
                                || bad(&format!("{p}.{k}"), format!("`{p}.{k}` is missing")),
                            )
                        };
                        let call = json!({"id": field("call_id")?, "type": "function",
                            "function": {"name": field("name")?, "arguments": field("arguments")?}});
                        // Consecutive calls are one assistant turn.
                        match out
                            .last_mut()
                            .filter(|m| m["role"] == "assistant" && m.get("tool_calls").is_some())
                        {
                            Some(last) => last["tool_calls"]
                                .as_array_mut()
                                .into_iter()
                                .for_each(|a| a.push(call.clone())),
                            None => out.push(
                                json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                            ),
                        }
                    }
                    "function_call_output" => {
                        let id = item.get("call_id").and_then(Value::as_str);
                        let output = item.get("output").map(|o| match o {
                            Value::String(s) => Ok(s.clone()),
                            o => text_of(&format!("{p}.output"), o),
                        });
                        let (Some(id), Some(output)) = (id, output) else {
                            return Err(bad(&p, format!("`{p}` needs `call_id` and `output`")));
                        };
                        out.push(json!({"role": "tool", "tool_call_id": id, "content": output?}));
                    }
                    other => {
                        let msg = format!("input items of type `{}` are not supported (message, function_call, function_call_output)", other.escape_debug());
                        return Err(bad(&format!("{p}.type"), msg));
                    }
                }
            }
        }
        _ => return Err(bad("input", "`input` must be a string or a list of items")),
    }
    Ok(out)
}

/// Responses tools (`{type, name, description, parameters, strict}`) → chat tools.
fn chat_tools(v: &Value) -> Result<Value, ApiError> {
    let list = v.as_array().ok_or_else(|| bad("tools", "`tools` must be a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind != "function" {
            let msg = format!(
                "tools of type `{}` are not supported; only function tools",
                kind.escape_debug()
            );
            return Err(bad(&format!("tools[{i}].type"), msg));
        }
        let mut f = t.as_object().cloned().unwrap_or_default();
        f.remove("type");
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

/// The request as the chat request it amounts to, and whether it streams.
pub fn to_chat(body: &Value) -> Result<ChatRequest, ApiError> {
    let obj =
        body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let mut chat = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            k if SAME.contains(&k) => {
                chat.insert(k.to_string(), v.clone());
            }
            k if IGNORED.contains(&k) || v.is_null() => {}
            "input" | "instructions" => {}
            "store" if v == &Value::Bool(false) => {}
            "store" => {
                return Err(bad("store", "this server keeps no responses: send `store: false`"))
            }
            "previous_response_id" | "background" | "conversation" | "prompt" => {
                let msg =
                    format!("`{k}` is not supported: this server keeps no state between requests");
                return Err(bad(k, msg));
            }
            "max_output_tokens" => {
                chat.insert("max_completion_tokens".into(), v.clone());
            }
            "tools" => {
                chat.insert("tools".into(), chat_tools(v)?);
            }
            "tool_choice" => {
                let c = match v.get("name") {
                    Some(name) => json!({"type": "function", "function": {"name": name}}),
                    None => v.clone(),
                };
                chat.insert("tool_choice".into(), c);
            }
            "text" => {
                let Some(format) = v.get("format") else { continue };
                let mut f = format.as_object().cloned().unwrap_or_default();
                let rf = match f.get("type").and_then(Value::as_str) {
                    Some("json_schema") => {
                        f.remove("type");
                        json!({"type": "json_schema", "json_schema": f})
                    }
                    _ => format.clone(),
                };
                chat.insert("response_format".into(), rf);
            }
            "truncation" if v == "disabled" => {}
            other => {
                let msg = format!("unknown or unsupported field `{}`", other.escape_debug());
                return Err(bad(other, msg));
            }
        }
    }
    chat.insert("messages".into(), Value::Array(messages(obj)?));
    serde_json::from_value(Value::Object(chat)).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn usage(u: &UsageOut) -> Value {
    json!({"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens})
}

/// What a `response` object repeats of its request (OpenAI's required `instructions`, `tools`,
/// `tool_choice`, `parallel_tool_calls`, `metadata`, `temperature`, `top_p`, …), with
/// OpenAI's defaults for what the request left out.
fn echoed(body: &Value) -> Value {
    let get = |k: &str| body.get(k).filter(|v| !v.is_null()).cloned();
    let format =
        get("text").and_then(|t| t.get("format").cloned()).unwrap_or(json!({"type": "text"}));
    // Tools as OpenAI lists them back: `strict` and `description` always present.
    let tools: Vec<Value> = get("tools")
        .and_then(|t| t.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .map(|mut t| {
            if let Some(o) = t.as_object_mut() {
                o.entry("strict").or_insert(json!(false));
                o.entry("description").or_insert(Value::Null);
            }
            t
        })
        .collect();
    let mut v = json!({
        "instructions": get("instructions").unwrap_or(Value::Null),
        "tools": tools,
        "tool_choice": get("tool_choice").unwrap_or(json!("auto")),
        "parallel_tool_calls": get("parallel_tool_calls").unwrap_or(json!(true)),
        "metadata": get("metadata").unwrap_or(json!({})),
        "temperature": get("temperature").unwrap_or(json!(1.0)),
        "top_p": get("top_p").unwrap_or(json!(1.0)),
        "max_output_tokens": get("max_output_tokens").unwrap_or(Value::Null),
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "text": {"format": format},
        "truncation": get("truncation").unwrap_or(json!("disabled")),
    });
    if let Some(user) = get("user") {
        v["user"] = user;
    }
    v
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", rand::random::<u128>())
}

/// The output items of a finished text: a message, or function calls (with any text before
/// them as a message first).
fn output_items(text: &str, format: Option<ToolFormat>, truncated: bool) -> Vec<Value> {
    let (content, calls) = match format {
        Some(f) => tools::parse(text, f, truncated),
        None => (Some(text.to_string()), Vec::new()),
    };
    let mut items = Vec::new();
    if let Some(c) = content.filter(|c| !c.is_empty() || calls.is_empty()) {
        items.push(message_item(&new_id("msg"), &c, "completed"));
    }
    for c in calls {
        items.push(json!({"type": "function_call", "id": new_id("fc"), "call_id": new_id("call"),
            "name": c.name, "arguments": c.arguments.to_string(), "status": "completed"}));
    }
    items
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = match status {
        "in_progress" => json!([]),
        _ => json!([{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]),
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

/// The `response` object; `output` and `usage` once finished.
fn response_object(
    meta: &ResponseMeta,
    status: &str,
    output: Vec<Value>,
    u: Option<&UsageOut>,
) -> Value {
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    let mut v = json!({
        "id": meta.id, "object": "response", "created_at": meta.created, "status": status,
        "model": meta.shape.model, "output": output,
        "incomplete_details": incomplete, "error": null, "store": false,
        "adapters": meta.shape.adapters,
    });
    // Present once the answer is finished (OpenAI omits it before).
    if let Some(u) = u {
        v["usage"] = usage(u);
    }
    // The request's own settings, as OpenAI echoes them.
    if let (Some(o), Some(Value::Object(echo))) = (v.as_object_mut(), &meta.shape.echoed) {
        o.extend(echo.clone());
    }
    v
}

/// The whole answer.
pub fn body(meta: &ResponseMeta, r: Collected) -> Value {
    let u = meta.shape.usage([r.usage.completion_tokens]);
    let truncated = r.finish_reason == Some(FinishReason::Length);
    let items = output_items(&r.text, meta.shape.tools, truncated);
    // A cut text or call is `incomplete`, whatever calls were completed before the cut.
    let status = if truncated { "incomplete" } else { "completed" };
    response_object(meta, status, items, Some(&u))
}

/// A streamed answer's state: its events so far and its one output message while text flows.
struct Events {
    seq: u64,
    msg_id: String,
    /// Text sent as `output_text.delta` (an answer), or held (possibly calls).
    tools: super::response::ToolStream,
    text: String,
    opened: bool,
    guard: StreamGuard,
    tokens: usize,
}

type Data = actix_web::web::Data<super::AppState>;

/// `POST /v1/responses`.
pub async fn create(
    req: actix_web::HttpRequest,
    state: Data,
    payload: actix_web::web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: Value = super::body::json_body(&req, payload, &state.limits).await?;
    let chat = to_chat(&body)?;
    let mut valid =
        super::handlers::validated(&state, move |mv| super::validate::chat(&chat, mv)).await?;
    valid.response.endpoint = super::response::Endpoint::Responses;
    valid.response.echoed = Some(echoed(&body));
    super::handlers::respond(&req, &state, valid).await
}

impl Events {
    fn event(&mut self, kind: &str, mut v: Value) -> Vec<u8> {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        format!("event: {kind}\ndata: {v}\n\n").into_bytes()
    }

    /// Opens the output message (first text of an answer).
    fn open(&mut self) -> Vec<u8> {
        self.opened = true;
        let item = message_item(&self.msg_id, "", "in_progress");
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        let mut out =
            self.event("response.output_item.added", json!({"output_index": 0, "item": item}));
        out.extend(self.event(
            "response.content_part.added",
            json!({"item_id": self.msg_id, "output_index": 0, "content_index": 0, "part": part}),
        ));
        out
    }

    fn on(&mut self, meta: &ResponseMeta, ev: TokenEvent) -> (Vec<u8>, bool) {
        match ev {
            TokenEvent::Token { text, .. } => {
                self.tokens += 1;
                self.guard.usage.1 = self.tokens;
                let delta = match meta.shape.tools {
                    Some(format) => self.tools.answer_text(&text, format),
                    None => Some(text),
                };
                let Some(delta) = delta.filter(|d| !d.is_empty()) else {
                    return (Vec::new(), false);
                };
                let mut out = if self.opened { Vec::new() } else { self.open() };
                self.text.push_str(&delta);
                out.extend(self.event("response.output_text.delta", json!({"item_id": self.msg_id, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []})));
                (out, false)
            }
            TokenEvent::Done { reason, usage: used } => {
                let u = meta.shape.usage([used.completion_tokens]);
                self.guard.usage = (u.prompt_tokens, u.completion_tokens);
                self.guard.completed = true;
                let truncated = reason == FinishReason::Length;
                let mut out = Vec::new();
                let mut items = Vec::new();
                if self.opened {
                    let part = json!({"type": "output_text", "text": self.text, "annotations": [], "logprobs": []});
                    let text = self.text.clone();
                    out.extend(self.event("response.output_text.done", json!({"item_id": self.msg_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []})));
                    out.extend(self.event("response.content_part.done", json!({"item_id": self.msg_id, "output_index": 0, "content_index": 0, "part": part})));
                    let item = message_item(&self.msg_id, &self.text, "completed");
                    out.extend(self.event(
                        "response.output_item.done",
                        json!({"output_index": 0, "item": item}),
                    ));
                    items.push(item);
                }
                let held = self.tools.take_held();
                for item in output_items(&held, meta.shape.tools, truncated)
                    .into_iter()
                    .filter(|_| !held.is_empty())
                {
                    let index = items.len();
                    let added = match item["type"].as_str() {
                        Some("function_call") => {
                            let mut a = item.clone();
                            a["arguments"] = json!("");
                            a["status"] = json!("in_progress");
                            a
                        }
                        _ => item.clone(),
                    };
                    out.extend(self.event(
                        "response.output_item.added",
                        json!({"output_index": index, "item": added}),
                    ));
                    if item["type"] == "function_call" {
                        let id = item["id"].clone();
                        out.extend(self.event("response.function_call_arguments.delta", json!({"item_id": id, "output_index": index, "delta": item["arguments"]})));
                        out.extend(self.event("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": item["name"], "arguments": item["arguments"]})));
                    }
                    out.extend(self.event(
                        "response.output_item.done",
                        json!({"output_index": index, "item": item}),
                    ));
                    items.push(item);
                }
                let (kind, status) = match truncated {
                    true => ("response.incomplete", "incomplete"),
                    false => ("response.completed", "completed"),
                };
                let resp = response_object(meta, status, items, Some(&u));
                out.extend(self.event(kind, json!({"response": resp})));
                (out, true)
            }
            TokenEvent::Prompt(_) => (Vec::new(), false),
            TokenEvent::Error(e) => {
                let err = ApiError::from(e);
                self.guard.error_status = Some(err.status.as_u16());
                let mut resp = response_object(meta, "failed", Vec::new(), None);
                resp["error"] =
                    json!({"code": err.code.unwrap_or("server_error"), "message": err.message});
                (self.event("response.failed", json!({"response": resp})), true)
            }
        }
    }
}

/// The streamed answer: `response.created`, `response.in_progress`, the output events, then
/// `response.completed` (or `incomplete`, or `failed`).
pub fn sse(rx: UnboundedReceiver<TokenEvent>, meta: ResponseMeta) -> HttpResponse {
    let guard = StreamGuard {
        obs: meta.obs.clone(),
        completed: false,
        error_status: None,
        usage: (meta.shape.prompt_lens.iter().sum(), 0),
    };
    let mut events = Events {
        seq: 0,
        msg_id: new_id("msg"),
        tools: Default::default(),
        text: String::new(),
        opened: false,
        guard,
        tokens: 0,
    };
    let start = response_object(&meta, "in_progress", Vec::new(), None);
    let mut head = events.event("response.created", json!({"response": start}));
    head.extend(events.event("response.in_progress", json!({"response": start})));
    let first = stream::once(async move { Ok::<_, actix_web::Error>(Bytes::from(head)) });
    let rest = stream::unfold((events, rx, false), move |(mut events, mut rx, ended)| {
        let meta = meta.clone();
        async move {
            if ended {
                return None;
            }
            loop {
                let ev = rx.recv().await?;
                let (out, done) = events.on(&meta, ev);
                if !out.is_empty() || done {
                    return Some((Ok(Bytes::from(out)), (events, rx, done)));
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(first.chain(rest))
}
