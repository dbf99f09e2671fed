//! Training data in the formats people bring, told apart by their content: OpenAI's chat
//! fine-tuning JSONL (`{"messages": [...]}`, optionally `tools`: the loss on assistant turns,
//! each message's `weight` 0 or 1), prompt/completion JSONL (the loss on the completion), and
//! SQuAD (`train::squad`: JSON, or JSONL of `{context, question, answer}`). Every line is
//! checked before training starts; an error names its line and what is wrong with it. A
//! record becomes a [`TrainExample`]: the tokens fed, and the positions whose next token is
//! learned.

use super::squad::{self, DataError, Overflow, QaExample};
use crate::model::tokenizer::{ChatMessage, TextTokenizer, ToolCallMessage};
use crate::structured::tools::{self, TemplateTools, Tool};
use serde_json::Value;
use std::path::Path;

/// A tokenized training example: `input` is fed to the model, and position `positions[k]` of
/// it predicts `targets[k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainExample {
    pub input: Vec<u32>,
    /// Ascending positions of `input`.
    pub positions: Vec<u32>,
    pub targets: Vec<u32>,
}

impl TrainExample {
    /// `input` whose last `targets.len()` positions predict `targets` (an answer at the end).
    pub fn tail(input: Vec<u32>, targets: Vec<u32>) -> Self {
        let first = input.len().saturating_sub(targets.len()) as u32;
        let positions = (first..input.len() as u32).collect();
        Self { input, positions, targets }
    }

    /// Every token of the example (the fed ones and the last target).
    pub fn full_len(&self) -> usize {
        self.input.len() + 1
    }

    /// Per position of `input`: `Some(target)` where the loss applies, else `None`.
    pub fn loss_mask(&self) -> Vec<Option<u32>> {
        let mut mask = vec![None; self.input.len()];
        for (&p, &t) in self.positions.iter().zip(&self.targets) {
            if let Some(m) = mask.get_mut(p as usize) {
                *m = Some(t);
            }
        }
        mask
    }
}

/// Which format a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Chat,
    PromptCompletion,
    Squad,
}

/// One conversation: its messages (with whether each assistant turn is learned) and tools.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    /// Per message: learned (assistant turns with `weight` 1, the default).
    pub learn: Vec<bool>,
    pub tools: Vec<Tool>,
}

/// One record of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Chat(Conversation),
    PromptCompletion { prompt: String, completion: String },
    Squad(QaExample),
}

/// A checked dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub format: Format,
    pub records: Vec<Record>,
}

/// The format of `text`: SQuAD's JSON document, or JSONL told apart by its first record's
/// keys.
pub fn detect(text: &str) -> Result<Format, String> {
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).ok_or("the file is empty")?;
    let v: Value = match serde_json::from_str(first) {
        Ok(v) => v,
        // A document over several lines: SQuAD's JSON, if anything.
        Err(_) if first.starts_with('{') => return Ok(Format::Squad),
        Err(e) => return Err(format!("line 1: not JSON ({e}); expected JSONL records")),
    };
    let has = |k: &str| v.get(k).is_some();
    Ok(match () {
        _ if has("messages") => Format::Chat,
        _ if has("prompt") && has("completion") => Format::PromptCompletion,
        _ if has("data") || (has("context") && has("question")) => Format::Squad,
        _ => {
            return Err("line 1: not a known record: expected {\"messages\": [...]} (chat), {\"prompt\", \"completion\"}, or SQuAD ({\"context\", \"question\", \"answer\"} lines or the official JSON)".into())
        }
    })
}

/// Reads and checks `path`; nothing is tokenized yet.
pub fn load(path: &Path) -> Result<Dataset, DataError> {
    let invalid = |reason: String| DataError::Invalid { path: path.display().to_string(), reason };
    let text = squad::read_text(path)?;
    let format = detect(&text).map_err(invalid)?;
    let records = match format {
        Format::Squad => {
            // JSONL when the first line alone is a `{context, question, …}` record.
            let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
            let jsonl =
                serde_json::from_str::<Value>(first).is_ok_and(|v| v.get("context").is_some());
            squad::parse(&text, jsonl).map_err(invalid)?.into_iter().map(Record::Squad).collect()
        }
        _ => parse_lines(&text, format).map_err(invalid)?,
    };
    if records.is_empty() {
        return Err(invalid("no records".into()));
    }
    Ok(Dataset { format, records })
}

/// Parses every line of a chat or prompt/completion JSONL file.
pub fn parse_lines(text: &str, format: Format) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = |e: String| format!("line {}: {e}", i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON ({e})")))?;
        let rec = match format {
            Format::Chat => conversation(&v).map(Record::Chat),
            Format::PromptCompletion => prompt_completion(&v),
            Format::Squad => Err("SQuAD records are parsed by train::squad".into()),
        };
        out.push(rec.map_err(at)?);
    }
    Ok(out)
}

fn prompt_completion(v: &Value) -> Result<Record, String> {
    let field = |k: &str| match v.get(k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("`{k}` must be a string")),
        None => Err(format!("`{k}` is missing")),
    };
    let (prompt, completion) = (field("prompt")?, field("completion")?);
    if completion.is_empty() {
        return Err("`completion` is empty: nothing to learn".into());
    }
    Ok(Record::PromptCompletion { prompt, completion })
}

fn conversation(v: &Value) -> Result<Conversation, String> {
    let obj = v.as_object().ok_or("a record must be a JSON object")?;
    if let Some(k) =
        obj.keys().find(|k| !["messages", "tools", "parallel_tool_calls"].contains(&k.as_str()))
    {
        return Err(format!("unknown field `{k}`"));
    }
    let list = v["messages"].as_array().ok_or("`messages` must be a list")?;
    let mut messages = Vec::with_capacity(list.len());
    let mut learn = Vec::with_capacity(list.len());
    for (j, m) in list.iter().enumerate() {
        let p = format!("messages[{j}]");
        let role = m.get("role").and_then(Value::as_str).ok_or(format!("`{p}.role` is missing"))?;
        if !["system", "user", "assistant", "tool", "developer"].contains(&role) {
            return Err(format!(
                "`{p}.role` `{}` is not system, user, assistant or tool",
                role.escape_debug()
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            _ => return Err(format!("`{p}.content` must be a string")),
        };
        let weight = match m.get("weight") {
            None => 1,
            Some(w) if role == "assistant" && (w == 0 || w == 1) => w.as_u64().unwrap_or(1),
            Some(_) if role != "assistant" => {
                return Err(format!("`{p}.weight` applies to assistant messages only"))
            }
            Some(w) => return Err(format!("`{p}.weight` must be 0 or 1, got {w}")),
        };
        let role = if role == "developer" { "system" } else { role };
        let mut msg = ChatMessage::text(role, content);
        for (k, c) in
            m.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate()
        {
            let f = &c["function"];
            let name = f["name"]
                .as_str()
                .ok_or(format!("`{p}.tool_calls[{k}].function.name` is missing"))?;
            let args = f["arguments"]
                .as_str()
                .ok_or(format!("`{p}.tool_calls[{k}].function.arguments` must be a string"))?;
            let arguments: Value = serde_json::from_str(args).map_err(|e| {
                format!("`{p}.tool_calls[{k}].function.arguments` is not JSON ({e})")
            })?;
            msg.tool_calls.push(ToolCallMessage {
                id: c["id"].as_str().unwrap_or_default().to_string(),
                name: name.to_string(),
                arguments,
            });
        }
        if role == "tool" {
            msg.tool_call_id = m.get("tool_call_id").and_then(Value::as_str).map(str::to_string);
        }
        if role == "assistant" && msg.content.is_empty() && msg.tool_calls.is_empty() {
            return Err(format!("`{p}` has neither content nor tool_calls"));
        }
        learn.push(role == "assistant" && weight == 1);
        messages.push(msg);
    }
    if !learn.iter().any(|&l| l) {
        return Err("no assistant message with weight 1: nothing to learn".into());
    }
    let mut tools_out = Vec::new();
    for (k, t) in v.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let f = &t["function"];
        let name = f["name"].as_str().ok_or(format!("`tools[{k}].function.name` is missing"))?;
        tools_out.push(Tool {
            name: name.to_string(),
            description: f["description"].as_str().map(str::to_string),
            parameters: f
                .get("parameters")
                .cloned()
                .unwrap_or(serde_json::json!({"type": "object"})),
        });
    }
    Ok(Conversation { messages, learn, tools: tools_out })
}

fn enc(tok: &TextTokenizer, s: &str, special: bool) -> Result<Vec<u32>, DataError> {
    tok.encode_with(s, special).map_err(|e| DataError::Tokenizer(e.to_string()))
}

fn eos(tok: &TextTokenizer) -> Result<u32, DataError> {
    tok.eos_ids
        .first()
        .copied()
        .ok_or_else(|| DataError::Tokenizer("the tokenizer has no EOS token".into()))
}

/// Tokenizes one record; `None` when it is longer than `max_len` tokens (SQuAD may truncate
/// its context instead, with `overflow`) or has nothing to learn (an unanswerable question).
pub fn tokenize(
    rec: &Record,
    tok: &TextTokenizer,
    max_len: usize,
    overflow: Overflow,
) -> Result<Option<TrainExample>, DataError> {
    let ex = match rec {
        Record::Squad(q) => return squad::tokenize(q, tok, max_len, overflow),
        Record::PromptCompletion { prompt, completion } => {
            let mut input = enc(tok, prompt, true)?;
            let mut targets = enc(tok, completion, false)?;
            targets.push(eos(tok)?);
            input.extend_from_slice(&targets[..targets.len() - 1]);
            TrainExample::tail(input, targets)
        }
        Record::Chat(c) => chat(c, tok)?,
    };
    Ok((ex.full_len() <= max_len && !ex.targets.is_empty()).then_some(ex))
}

/// A conversation through the chat template: the whole conversation is fed, and each learned
/// assistant turn's tokens (its text and the template's end of turn) are the targets. A turn's
/// tokens are found as what its rendering adds to the rendering of the turns before it
/// (ending with the assistant header), so the template must render a conversation as a
/// continuation of its beginning (ChatML, Llama 3, Gemma and Qwen templates do).
fn chat(c: &Conversation, tok: &TextTokenizer) -> Result<TrainExample, DataError> {
    let template = TemplateTools::of(tok.chat_template.as_deref());
    let has_tool_turns = c.messages.iter().any(|m| m.role == "tool" || !m.tool_calls.is_empty());
    let (messages, wire_tools) = match (template.native, c.tools.is_empty() && !has_tool_turns) {
        (_, true) => (c.messages.clone(), Vec::new()),
        (true, false) => (c.messages.clone(), c.tools.iter().map(Tool::wire).collect()),
        (false, false) => (tools::generic_messages(&c.messages, &c.tools), Vec::new()),
    };
    // The k-th assistant turn keeps its place among the assistant turns through the generic
    // rewriting, so its learned flag carries over.
    let mut learned =
        c.messages.iter().zip(&c.learn).filter(|(m, _)| m.role == "assistant").map(|(_, &l)| l);
    // Tokenized as serving tokenizes a chat: content as text, markup as control tokens.
    let render = |upto: usize, gen: bool| {
        tok.encode_chat(&messages[..upto], &wire_tools, gen)
            .map(|p| p.ids)
            .map_err(|e| DataError::Tokenizer(e.to_string()))
    };
    let full = render(messages.len(), false)?;
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" || !learned.next().unwrap_or(false) {
            continue;
        }
        let before = render(k, true)?;
        let through = render(k + 1, false)?;
        let continues = through.starts_with(&before) && full.starts_with(&through);
        if !continues || through.len() <= before.len() {
            let msg = "the chat template does not render this conversation as a continuation of its beginning; loss masks cannot be placed";
            return Err(DataError::Tokenizer(msg.into()));
        }
        let first = before.len().max(1);
        for (p, &t) in full.iter().enumerate().take(through.len()).skip(first) {
            positions.push(p as u32 - 1);
            targets.push(t);
        }
    }
    let input = full[..full.len() - 1].to_vec();
    Ok(TrainExample { input, positions, targets })
}
