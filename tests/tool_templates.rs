//! Tool calling across chat templates (a tiny BPE tokenizer with three templates written for
//! the test, shaped like Qwen2.5's, Llama 3.1's and one without tools): a template that handles
//! tools gets them in its context and earlier calls with their arguments as objects, and the
//! call format (and so the grammar and the parser) follows it; a template without tools gets
//! the generic tool prompt in its system turn and tool results as user turns.

mod common;

use common::shared_dir;
use loraplex::api::chat;
use loraplex::api::context::ModelView;
use loraplex::api::openai::ChatRequest;
use loraplex::config::Limits;
use loraplex::model::tokenizer::TextTokenizer;
use loraplex::structured::tools::ToolFormat;
use loraplex::structured::Grammars;
use serde_json::json;

const QWEN_LIKE: &str = "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\nCall functions inside <tool_call></tool_call> tags.<|im_end|>\n{% endif %}{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls is defined %}<|im_start|>assistant{% for c in m.tool_calls %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}<|im_start|>assistant\n";

const LLAMA_LIKE: &str = "{%- if tools is not none %}<|system|>Respond with a JSON object {\"name\": function name, \"parameters\": dictionary of argument name and its value}.{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n{% endif %}{%- for m in messages %}{%- if m.tool_calls is defined %}<|assistant|>{\"name\": \"{{ m.tool_calls[0].function.name }}\", \"parameters\": {{ m.tool_calls[0].function.arguments | tojson }}}\n{%- elif m.role == 'tool' %}<|ipython|>{{ m.content }}\n{%- else %}<|{{ m.role }}|>{{ m.content }}\n{%- endif %}{%- endfor %}<|assistant|>";

const PLAIN: &str =
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>";

fn tokenizer(template: &str) -> TextTokenizer {
    let mut t = TextTokenizer::from_dir(&shared_dir().join("reference/archs/qwen2/model")).unwrap();
    t.chat_template = Some(template.to_string());
    t
}

fn request() -> ChatRequest {
    serde_json::from_value(json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 18}"},
            {"role": "user", "content": "And in Rome?"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "required",
    }))
    .unwrap()
}

/// The prompt text, the call format and whether a grammar constrains the answer.
fn render(template: &str) -> (String, Option<ToolFormat>, bool) {
    let tok = tokenizer(template);
    let grammars = Grammars::new(&tok, tok.vocab_size()).unwrap();
    let limits = Limits::default();
    let mv = ModelView {
        id: "tiny",
        context_len: 256,
        vocab: tok.vocab_size(),
        grammars: Ok(&grammars),
        tokenizer: &tok,
        limits: &limits,
        registry: None,
    };
    let req = request();
    let plan = chat::tools(&req, None, &mv).unwrap().unwrap();
    let text = chat::prompt(req.messages.as_deref().unwrap(), Some(&plan), &mv).unwrap().text;
    (text, plan.parse, plan.grammar.is_some())
}

#[test]
fn a_qwen_like_template_renders_the_tools_and_earlier_calls_itself() {
    let (text, format, constrained) = render(QWEN_LIKE);
    assert_eq!((format, constrained), (Some(ToolFormat::Tagged), true));
    assert!(text.contains("<tools>\n{\"function\":{\"description\":\"Current weather\""), "{text}");
    assert!(text.contains("\"arguments\": {\"city\":\"Paris\"}"), "arguments as an object: {text}");
    assert!(text.contains("<tool_response>\n{\"temperature\": 18}"), "{text}");
    assert!(!text.contains("# Tools\n\nYou can call functions"), "no generic prompt: {text}");
}

#[test]
fn a_llama_like_template_asks_for_bare_json_calls() {
    let (text, format, constrained) = render(LLAMA_LIKE);
    assert_eq!((format, constrained), (Some(ToolFormat::Json), true));
    assert!(text.contains("\"parameters\": {\"city\":\"Paris\"}"), "{text}");
    assert!(text.contains("<|ipython|>{\"temperature\": 18}"), "{text}");
}

#[test]
fn a_template_without_tools_gets_the_generic_prompt_and_user_turn_results() {
    let (text, format, constrained) = render(PLAIN);
    assert_eq!((format, constrained), (Some(ToolFormat::Tagged), true));
    assert!(text.starts_with("<|system|># Tools\n\nYou can call functions"), "{text}");
    assert!(text.contains("\"name\":\"get_weather\""), "{text}");
    assert!(
        text.contains("<|assistant|><tool_call>\n{\"arguments\":{\"city\":\"Paris\"},\"name\":\"get_weather\"}\n</tool_call>")
            || text.contains("<|assistant|><tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"),
        "{text}"
    );
    assert!(
        text.contains("<|user|><tool_response>\n{\"temperature\": 18}\n</tool_response>"),
        "{text}"
    );
}
