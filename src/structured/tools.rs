//! Tool calling: how a family writes a call, the grammar that makes a forced call parse and
//! validate, reading calls back out of the text, and the generic prompt for chat templates
//! that know nothing of tools.
//!
//! Formats (docs: README "Tool calling"):
//! - [`ToolFormat::Tagged`]: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one
//!   block per call. Qwen2.5 and Qwen3 templates ask for it; loraplex's generic prompt (for
//!   SmolLM2, Gemma 3 and any template without tools) asks for it too.
//! - [`ToolFormat::Json`]: one bare `{"name": …, "parameters": {…}}` object: what the Llama
//!   3.1+ templates ask for.

use super::ConstraintSpec;
use crate::model::tokenizer::ChatMessage;
use serde_json::{json, Value};

/// How a model writes a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Tagged,
    Json,
}

/// One function the request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// Its parameters' JSON schema (an object schema).
    pub parameters: Value,
}

impl Tool {
    /// The tool as OpenAI's wire (and chat templates) spell it.
    pub fn wire(&self) -> Value {
        let mut f = json!({"name": self.name, "parameters": self.parameters});
        if let Some(d) = &self.description {
            f["description"] = json!(d);
        }
        json!({"type": "function", "function": f})
    }
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A call read back from the text.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: Value,
}

/// How the served template handles tools: natively (it reads `tools` and ends a call its own
/// way) or not at all (the generic prompt then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateTools {
    pub native: bool,
    pub format: ToolFormat,
}

impl TemplateTools {
    pub fn of(template: Option<&str>) -> Self {
        let t = template.unwrap_or("");
        let native = t.contains("tools");
        let format = match native && !t.contains("<tool_call>") {
            true => ToolFormat::Json,
            false => ToolFormat::Tagged,
        };
        Self { native, format }
    }
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

impl ToolFormat {
    /// What a call starts with: text that starts otherwise is an answer, not a call.
    pub fn opener(self) -> &'static str {
        match self {
            ToolFormat::Tagged => OPEN,
            ToolFormat::Json => "{",
        }
    }

    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Tagged => "arguments",
            ToolFormat::Json => "parameters",
        }
    }

    /// One call as the model should write it (for the history of earlier turns).
    pub fn write(self, name: &str, arguments: &Value) -> String {
        let body = json!({"name": name, self.arguments_key(): arguments});
        match self {
            ToolFormat::Tagged => format!("{OPEN}\n{body}\n{CLOSE}"),
            ToolFormat::Json => body.to_string(),
        }
    }
}

/// JSON in the grammar is written as `json.dumps` writes it (see `super::json_grammar`).
fn call_schema(format: ToolFormat, tool: &Tool) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": tool.name}, format.arguments_key(): tool.parameters},
        "required": ["name", format.arguments_key()],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
    })
}

/// The constraint for `choice`: `None` leaves the text free (`none`); `auto` allows an answer
/// (text that does not start like a call, or text in the `answer` format when one is given:
/// the request's `response_format`) or calls; `required` and a named function force calls
/// whose arguments follow the tools' parameter schemas. `parallel` allows several calls.
/// `Err` names why `answer` cannot join the calls (a Lark grammar of the request's).
pub fn grammar(
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    format: ToolFormat,
    answer: Option<&ConstraintSpec>,
) -> Result<Option<ConstraintSpec>, String> {
    let offered: Vec<&Tool> = match choice {
        ToolChoice::None => return Ok(None),
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.name == n).collect(),
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
    };
    let mut lark = String::new();
    let bodies: Vec<String> = (0..offered.len()).map(|i| format!("fn{i}")).collect();
    let many = parallel && format == ToolFormat::Tagged && !matches!(choice, ToolChoice::Named(_));
    lark.push_str(match (choice, many) {
        (ToolChoice::Auto, true) => "start: calls | answer\ncalls: call (\"\\n\" call)*\n",
        (ToolChoice::Auto, false) => "start: call | answer\n",
        (_, true) => "start: call (\"\\n\" call)*\n",
        (_, false) => "start: call\n",
    });
    let body = bodies.join(" | ");
    match format {
        ToolFormat::Tagged => {
            lark.push_str(&format!("call: \"{OPEN}\\n\" ({body}) \"\\n{CLOSE}\"\n"))
        }
        ToolFormat::Json => lark.push_str(&format!("call: {body}\n")),
    }
    for (rule, tool) in bodies.iter().zip(&offered) {
        lark.push_str(&format!("{rule}: %json {}\n", call_schema(format, tool)));
    }
    if matches!(choice, ToolChoice::Auto) {
        lark.push_str(&answer_rule(format, answer)?);
    }
    Ok(Some(ConstraintSpec::Lark(lark)))
}

/// The `answer` rule of an `auto` grammar: free text that does not start like a call, or the
/// request's format.
fn answer_rule(format: ToolFormat, answer: Option<&ConstraintSpec>) -> Result<String, String> {
    let flat = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
    let schema = |mut v: Value| {
        if let Some(o) = v.as_object_mut() {
            o.entry("x-guidance").or_insert_with(|| flat.clone());
        }
        format!("answer: %json {v}\n")
    };
    Ok(match answer {
        None => {
            let first = format.opener().chars().next().unwrap_or('<');
            format!("answer: ANSWER\nANSWER: /(?s:[^{}].*)/\n", regex::escape(&first.to_string()))
        }
        Some(ConstraintSpec::JsonObject) => schema(json!({"type": "object"})),
        Some(ConstraintSpec::JsonSchema(text)) => {
            let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            super::keywords::check(&v)?;
            schema(v)
        }
        Some(ConstraintSpec::Regex(rx)) => format!("answer: /{}/\n", rx.replace('/', "\\/")),
        Some(ConstraintSpec::Choice(options)) => {
            let quoted: Vec<String> = options.iter().map(|o| Value::from(o.as_str()).to_string()).collect();
            format!("answer: {}\n", quoted.join(" | "))
        }
        Some(ConstraintSpec::Lark(_)) => {
            return Err("a Lark grammar cannot be combined with `tools` unless `tool_choice` is `none` (the calls need a grammar of their own)".into())
        }
    })
}

/// Splits `text` into the answer before the first call and the calls. The JSON of a call is
/// read as JSON (its strings may hold anything, `</tool_call>` included); text that does not
/// parse as `{"name", "arguments"}` calls stays an answer, except that a text cut by
/// `max_tokens` (`truncated`) keeps the calls it completed and drops the one it was writing.
pub fn parse(text: &str, format: ToolFormat, truncated: bool) -> (Option<String>, Vec<ParsedCall>) {
    let answer = |t: &str| (Some(t.to_string()), Vec::new());
    let (start, mut rest) = match format {
        ToolFormat::Tagged => match text.find(OPEN) {
            Some(start) => (start, &text[start..]),
            None => return answer(text),
        },
        ToolFormat::Json => (text.len() - text.trim_start().len(), text.trim_start()),
    };
    let mut calls = Vec::new();
    loop {
        let body = match format {
            ToolFormat::Tagged => match rest.strip_prefix(OPEN) {
                Some(b) => b,
                None => break,
            },
            ToolFormat::Json if calls.is_empty() => rest,
            ToolFormat::Json => break,
        };
        let mut values = serde_json::Deserializer::from_str(body).into_iter::<Value>();
        let call = match values.next() {
            Some(Ok(v)) => read_call(v, format),
            _ => None,
        };
        let Some(call) = call else {
            match truncated && !calls.is_empty() {
                true => break,
                false => return answer(text),
            }
        };
        let after = body[values.byte_offset()..].trim_start();
        rest = match format {
            ToolFormat::Tagged => match after.strip_prefix(CLOSE) {
                Some(r) => r.trim_start(),
                None if truncated => {
                    calls.push(call);
                    break;
                }
                None => return answer(text),
            },
            ToolFormat::Json => after,
        };
        calls.push(call);
    }
    if !truncated && !rest.trim().is_empty() {
        return answer(text);
    }
    let content = text[..start].trim_end();
    ((!content.is_empty()).then(|| content.to_string()), calls)
}

fn read_call(v: Value, format: ToolFormat) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = v.get(format.arguments_key()).or_else(|| v.get("arguments"))?.clone();
    arguments.is_object().then_some(ParsedCall { name, arguments })
}

/// The messages for a template without tools: the tools (when any) and the call format go into
/// the system turn (after any system text the client gave), earlier calls are written into their
/// assistant turns as the model should write them, and tool results become user turns
/// (`<tool_response>` blocks; consecutive results merged, so user and assistant turns still
/// alternate).
pub fn generic_messages(messages: &[ChatMessage], tools: &[Tool]) -> Vec<ChatMessage> {
    let listing: Vec<String> = tools.iter().map(|t| t.wire().to_string()).collect();
    let prompt = format!(
        "# Tools\n\nYou can call functions to help with the user's request. They are listed in \
         <tools></tools>, one JSON signature per line:\n<tools>\n{}\n</tools>\n\nTo call a \
         function, answer with a JSON object of its name and arguments inside \
         <tool_call></tool_call> tags, one block per call:\n<tool_call>\n{{\"name\": \
         <function-name>, \"arguments\": <arguments-object>}}\n</tool_call>\nEach result comes \
         back in <tool_response></tool_response> tags.",
        listing.join("\n")
    );
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let system = messages.first().filter(|m| m.role == "system");
    match (system, tools.is_empty()) {
        (Some(sys), false) => {
            out.push(ChatMessage::text("system", format!("{}\n\n{prompt}", sys.content)))
        }
        (None, false) => out.push(ChatMessage::text("system", prompt)),
        (Some(sys), true) => out.push(sys.clone()),
        (None, true) => {}
    }
    for m in messages.iter().skip(usize::from(system.is_some())) {
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let calls: Vec<String> = m
                    .tool_calls
                    .iter()
                    .map(|c| ToolFormat::Tagged.write(&c.name, &c.arguments))
                    .collect();
                let text = [m.content.as_str(), &calls.join("\n")]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push(ChatMessage::text("assistant", text));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out
                    .last_mut()
                    .filter(|l| l.role == "user" && l.content.ends_with("</tool_response>"))
                {
                    Some(last) => last.content = format!("{}\n{block}", last.content),
                    None => out.push(ChatMessage::text("user", block)),
                }
            }
            _ => out.push(ChatMessage::text(&m.role, m.content.clone())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Current weather".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"], "additionalProperties": false}),
        }
    }

    #[test]
    fn parses_tagged_calls_and_keeps_text_before_them() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
        let (content, calls) = parse(text, ToolFormat::Tagged, false);
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].arguments, json!({"city": "Rome"}));
        let (content, calls) =
            parse("<tool_call>\n{\"name\": \"x\"}\n</tool_call>", ToolFormat::Tagged, false);
        assert!(calls.is_empty() && content.is_some(), "a call without arguments stays text");
        let tricky = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"a</tool_call>b\"}}\n</tool_call>";
        let (content, calls) = parse(tricky, ToolFormat::Tagged, false);
        assert_eq!((content, calls[0].arguments.clone()), (None, json!({"s": "a</tool_call>b"})));
        let cut = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"argu";
        assert_eq!(
            parse(cut, ToolFormat::Tagged, true).1.len(),
            1,
            "the completed call survives a cut"
        );
        assert!(parse(cut, ToolFormat::Tagged, false).1.is_empty());
        let (content, calls) = parse(
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            ToolFormat::Json,
            false,
        );
        assert_eq!((content, calls.len()), (None, 1));
    }

    #[test]
    fn a_written_call_parses_back() {
        for f in [ToolFormat::Tagged, ToolFormat::Json] {
            let args = json!({"city": "Lima", "days": 3});
            let (_, calls) = parse(&f.write("get_weather", &args), f, false);
            assert_eq!(
                calls,
                vec![ParsedCall { name: "get_weather".into(), arguments: args.clone() }]
            );
        }
    }

    #[test]
    fn templates_are_told_apart_by_what_they_mention() {
        assert_eq!(
            TemplateTools::of(None),
            TemplateTools { native: false, format: ToolFormat::Tagged }
        );
        let qwen = "{% if tools %}<tools>{% endif %}<tool_call>";
        assert_eq!(TemplateTools::of(Some(qwen)).format, ToolFormat::Tagged);
        let llama = "{% if tools is not none %}{\"name\": function name, \"parameters\": …}";
        assert_eq!(
            TemplateTools::of(Some(llama)),
            TemplateTools { native: true, format: ToolFormat::Json }
        );
    }

    #[test]
    fn grammars_name_each_offered_function() {
        let tools = [
            weather(),
            Tool { name: "add".into(), description: None, parameters: json!({"type": "object"}) },
        ];
        let Ok(Some(ConstraintSpec::Lark(g))) =
            grammar(&tools, &ToolChoice::Named("add".into()), true, ToolFormat::Tagged, None)
        else {
            panic!()
        };
        assert!(g.contains("\"const\":\"add\"") && !g.contains("get_weather"), "{g}");
        let Ok(Some(ConstraintSpec::Lark(g))) =
            grammar(&tools, &ToolChoice::Auto, true, ToolFormat::Tagged, None)
        else {
            panic!()
        };
        assert!(g.contains("ANSWER") && g.contains("get_weather") && g.contains("\"add\""), "{g}");
        // With a format, the answer is the format's, and a forced call ignores it.
        let city = ConstraintSpec::JsonSchema(
            json!({"type": "object", "properties": {"city": {"type": "string"}}}).to_string(),
        );
        let Ok(Some(ConstraintSpec::Lark(g))) =
            grammar(&tools, &ToolChoice::Auto, true, ToolFormat::Tagged, Some(&city))
        else {
            panic!()
        };
        assert!(
            g.contains("answer: %json") && g.contains("\"city\"") && !g.contains("ANSWER"),
            "{g}"
        );
        let lark = ConstraintSpec::Lark("start: \"x\"".into());
        let e = grammar(&tools, &ToolChoice::Auto, true, ToolFormat::Tagged, Some(&lark));
        assert!(e.unwrap_err().contains("Lark grammar"));
        assert_eq!(grammar(&tools, &ToolChoice::None, true, ToolFormat::Tagged, None), Ok(None));
    }
}
