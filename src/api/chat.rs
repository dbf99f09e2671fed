//! A chat request's prompt: its messages (text content, assistant tool calls, `tool` results)
//! and its tools (`tools`, `tool_choice`, `parallel_tool_calls`) rendered through the model's
//! chat template — natively where the template handles tools, with the generic tool prompt of
//! [`crate::structured::tools`] where it does not — and the grammar a forced call needs.

use super::context::ModelView;
use super::error::ApiError;
use super::openai::{ChatRequest, MessageContent, WireMessage};
use crate::model::tokenizer::{ChatMessage, ChatPrompt, ToolCallMessage};
use crate::structured::tools::{self, TemplateTools, Tool, ToolChoice, ToolFormat};
use crate::structured::{ConstraintSpec, Grammar};
use serde_json::Value;
use std::sync::Arc;

/// A request's tools, checked.
pub struct ToolPlan {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub template: TemplateTools,
    /// The constraint on the answer (`None` for `tool_choice: none`).
    pub grammar: Option<Arc<Grammar>>,
    /// How calls are read back (`None` for `tool_choice: none`).
    pub parse: Option<ToolFormat>,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).with_param(param)
}

/// OpenAI's rule for function names.
fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn tool(i: usize, v: &Value) -> Result<Tool, ApiError> {
    let p = format!("tools[{i}]");
    let obj = v.as_object().ok_or_else(|| bad(&p, format!("`{p}` must be an object")))?;
    if obj.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(&format!("{p}.type"), format!("`{p}.type` must be `function`")));
    }
    if let Some(k) = obj.keys().find(|k| !["type", "function"].contains(&k.as_str())) {
        return Err(bad(&format!("{p}.{k}"), format!("`{p}.{k}` is not supported")));
    }
    let p = format!("{p}.function");
    let f = obj
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(&p, format!("`{p}` must be an object")))?;
    if let Some(k) =
        f.keys().find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
    {
        return Err(bad(&format!("{p}.{k}"), format!("`{p}.{k}` is not supported")));
    }
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    if !valid_name(name) {
        let msg = format!(
            "`{p}.name` must be 1-64 letters, digits, `_` or `-`, got `{}`",
            name.escape_debug()
        );
        return Err(bad(&format!("{p}.name"), msg));
    }
    let pp = format!("{p}.parameters");
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
        Some(v @ Value::Object(o)) => {
            if o.get("type").is_some_and(|t| t != "object") {
                return Err(bad(&pp, format!("`{pp}` must be a JSON schema of an object")));
            }
            crate::structured::keywords::check(v).map_err(|e| bad(&pp, format!("`{pp}`: {e}")))?;
            v.clone()
        }
        Some(_) => return Err(bad(&pp, format!("`{pp}` must be a JSON schema (an object)"))),
    };
    let description = f.get("description").and_then(Value::as_str).map(str::to_string);
    Ok(Tool { name: name.to_string(), description, parameters })
}

fn choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
    let p = "tool_choice";
    fn named(v: &Value) -> Option<&str> {
        let f = v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
        (v.get("type").and_then(Value::as_str) == Some("function")).then_some(f).flatten()
    }
    let c = match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(v) => match named(v) {
            Some(n) if tools.iter().any(|t| t.name == n) => ToolChoice::Named(n.to_string()),
            Some(n) => {
                let msg =
                    format!("`tool_choice` names `{}`, which is not in `tools`", n.escape_debug());
                return Err(bad(p, msg).with_code("unknown_tool"));
            }
            None => {
                let msg = "`tool_choice` must be `none`, `auto`, `required` or {\"type\": \"function\", \"function\": {\"name\": …}}";
                return Err(bad(p, msg));
            }
        },
    };
    Ok(c)
}

/// The request's tools, their choice and the grammar it needs (with `answer`, the format a
/// text answer must follow, when the choice lets the model answer); `None` without `tools`.
pub fn tools(
    req: &ChatRequest,
    answer: Option<&(ConstraintSpec, String)>,
    mv: &ModelView<'_>,
) -> Result<Option<ToolPlan>, ApiError> {
    let wire = req.tools.as_deref().unwrap_or_default();
    if wire.is_empty() {
        if req.tool_choice.as_ref().is_some_and(|c| !c.is_null() && c != "none") {
            return Err(bad("tool_choice", "`tool_choice` needs `tools`"));
        }
        return Ok(None);
    }
    use crate::structured::limits::{max, SchemaSize};
    if wire.len() > max::TOOLS {
        let msg = format!("at most {} tools, got {}", max::TOOLS, wire.len());
        return Err(bad("tools", msg).with_code("grammar_too_large"));
    }
    let mut list: Vec<Tool> = Vec::with_capacity(wire.len());
    // The tools' schemas together bound the grammar they make.
    let mut size = SchemaSize::default();
    for (i, v) in wire.iter().enumerate() {
        let t = tool(i, v)?;
        let p = format!("tools[{i}].function.parameters");
        size = size.with(&t.parameters).map_err(|e| super::structured::limit_refusal(&e, &p))?;
        if list.iter().any(|o| o.name == t.name) {
            let msg = format!("two tools are named `{}`", t.name);
            return Err(bad(&format!("tools[{i}].function.name"), msg));
        }
        list.push(t);
    }
    let choice = choice(req.tool_choice.as_ref(), &list)?;
    let template = TemplateTools::of(mv.tokenizer.chat_template.as_deref());
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    // The answer's format joins the bounds the tools' schemas are checked against.
    if let Some((spec, param)) = answer.filter(|_| choice == ToolChoice::Auto) {
        crate::structured::limits::check(spec)
            .map_err(|e| super::structured::limit_refusal(&e, param))?;
        if let ConstraintSpec::JsonSchema(text) = spec {
            if let Ok(v) = serde_json::from_str::<Value>(text) {
                size.with(&v).map_err(|e| super::structured::limit_refusal(&e, param))?;
            }
        }
    }
    let answer_spec = answer.map(|(s, _)| s).filter(|_| choice == ToolChoice::Auto);
    let spec = tools::grammar(&list, &choice, parallel, template.format, answer_spec)
        .map_err(|msg| bad(answer.map_or("tools", |(_, p)| p.as_str()), msg))?;
    let grammar = match spec {
        Some(spec) => Some(super::structured::compile_checked(&spec, "tools", mv)?),
        None => None,
    };
    let parse = (choice != ToolChoice::None).then_some(template.format);
    Ok(Some(ToolPlan { tools: list, choice, template, grammar, parse }))
}

/// The prompt: the messages (and tools) through the chat template, its text and its tokens
/// (content tokenized as text: only the template's markup yields control tokens).
pub fn prompt(
    wire: &[WireMessage],
    plan: Option<&ToolPlan>,
    mv: &ModelView<'_>,
) -> Result<ChatPrompt, ApiError> {
    let messages = messages(wire)?;
    let template = TemplateTools::of(mv.tokenizer.chat_template.as_deref());
    let has_tool_turns = messages.iter().any(|m| m.role == "tool" || !m.tool_calls.is_empty());
    let tok = mv.tokenizer;
    let rendered = match (plan, template.native) {
        (Some(p), true) => {
            let wire: Vec<Value> = p.tools.iter().map(Tool::wire).collect();
            tok.encode_chat(&messages, &wire, true)
        }
        (Some(p), false) => {
            tok.encode_chat(&tools::generic_messages(&messages, &p.tools), &[], true)
        }
        (None, false) if has_tool_turns => {
            tok.encode_chat(&tools::generic_messages(&messages, &[]), &[], true)
        }
        (None, _) => tok.encode_chat(&messages, &[], true),
    };
    rendered.map_err(|e| ApiError::invalid_value("messages", e.to_string()))
}

fn content(i: usize, m: &WireMessage) -> Result<String, ApiError> {
    Ok(match &m.content {
        Some(MessageContent::Text(t)) => t.clone(),
        Some(MessageContent::Parts(parts)) => {
            let mut s = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => s.push_str(t),
                    _ => {
                        return Err(ApiError::invalid_value(
                            &format!("messages[{i}].content"),
                            format!(
                                "content part of type `{}` is not supported; only text",
                                p.kind.escape_debug()
                            ),
                        ))
                    }
                }
            }
            s
        }
        None if m.role == "assistant" => String::new(),
        None => {
            return Err(ApiError::bad_request(format!("messages[{i}] lacks `content`"))
                .with_param(format!("messages[{i}].content")))
        }
    })
}

/// Wire messages → the chat template's messages (`developer` is `system`; an assistant
/// turn's calls carry their arguments as JSON objects).
pub fn messages(wire: &[WireMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::with_capacity(wire.len());
    for (i, m) in wire.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
            return Err(ApiError::invalid_value(
                &format!("messages[{i}].role"),
                format!("unsupported role `{}`", m.role.escape_debug()),
            ));
        }
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        let mut msg = ChatMessage::text(&role, content(i, m)?);
        if role == "tool" {
            let id = m.tool_call_id.clone().filter(|id| !id.is_empty());
            let p = format!("messages[{i}].tool_call_id");
            msg.tool_call_id = Some(id.ok_or_else(|| bad(&p, format!("`{p}` is missing")))?);
        }
        for (j, c) in m.tool_calls.iter().flatten().enumerate() {
            let p = format!("messages[{i}].tool_calls[{j}]");
            if role != "assistant" {
                return Err(bad(&p, "only assistant messages carry `tool_calls`"));
            }
            if c.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(bad(&format!("{p}.type"), format!("`{p}.type` must be `function`")));
            }
            let args: Value = serde_json::from_str(&c.function.arguments).map_err(|e| {
                bad(&format!("{p}.function.arguments"), format!("not a JSON object: {e}"))
            })?;
            if !args.is_object() {
                return Err(bad(&format!("{p}.function.arguments"), "not a JSON object"));
            }
            msg.tool_calls.push(ToolCallMessage {
                id: c.id.clone().unwrap_or_else(|| format!("call_{i}_{j}")),
                name: c.function.name.clone(),
                arguments: args,
            });
        }
        out.push(msg);
    }
    Ok(out)
}
