//! Agent frameworks work unchanged against the release binary (`tests/e2e/agents_client.py`,
//! pinned by scripts/test-deps.sh): the OpenAI Agents SDK sends `tools` together with a typed
//! `output_type` (`response_format` on Chat Completions, `text.format` on Responses) — a forced
//! call runs the tool, and with calls declined the text parses as the output type — on an
//! adapter and on a mix, through both of its model classes; langchain-openai's `bind_tools`
//! round trip and `with_structured_output` by json_schema and by function calling. With
//! `tool_choice: auto` the answer is a valid call or text in the format (in-process).

mod common;

use common::http::{app, call, ctx, post};
use common::server::Server;
use common::{copy_adapter, shared_dir};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

#[test]
fn the_agents_sdk_and_langchain_run_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["qa-r8", "all-r16"] {
        copy_adapter(&shared_dir().join("adapters").join(name), &dir.path().join(name));
    }
    let server = Server::start(dir.path(), &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/agents_client.py");
    let out = Command::new("python3").arg(&script).arg(server.url()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (k, v) in got.as_object().unwrap() {
        assert_eq!(v["ok"], true, "{k}: {}\n{}", v["error"], v["trace"].as_str().unwrap_or(""));
    }
    for api in ["chat", "responses"] {
        for what in ["adapter", "mix"] {
            let called = &got[format!("agents_{api}_{what}_call")];
            assert_eq!(called["tool_calls"], json!(["Paris"]), "{api} {what}: {called}");
            assert_eq!(called["final"], "It is 18 C and sunny in Paris.", "{api} {what}");
            let typed = &got[format!("agents_{api}_{what}_typed")];
            assert_eq!(typed["typed"], true, "{api} {what}: {typed}");
            assert!(typed["final"]["city"].is_string() && typed["final"]["summary"].is_string());
        }
    }
    let lc = &got["langchain_bind_tools"];
    assert_eq!(
        (lc["call"]["name"].as_str(), lc["call"]["args"]["city"].as_str()),
        (Some("weather"), Some("Paris")),
        "{lc}"
    );
    for k in ["langchain_structured_json_schema", "langchain_structured_function_calling"] {
        assert_eq!(got[k]["typed"], true, "{k}: {}", got[k]);
    }
}

#[actix_web::test]
async fn with_auto_the_answer_is_a_call_or_text_in_the_format() {
    let c = ctx();
    let app = app(&c).await;
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}},
        "required": ["answer"], "additionalProperties": false});
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    for (prompt, model) in [
        ("What is the weather in Paris?", "qa-r8"),
        ("Say hello in JSON.", "SmolLM2-135M-Instruct.Q4_1"),
        ("Tell me a joke.", "qa-r8"),
    ] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 80,
            "temperature": 0, "tools": tools, "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": schema}}});
        let (s, v) = call(&app, post("/v1/chat/completions", body)).await;
        assert_eq!(s, 200, "{v}");
        let m = &v["choices"][0]["message"];
        match m["tool_calls"].as_array() {
            Some(calls) => {
                let args: Value =
                    serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap())
                        .unwrap();
                assert!(args["city"].is_string(), "{m}");
            }
            None => {
                let text: Value = serde_json::from_str(m["content"].as_str().unwrap()).unwrap();
                assert!(text["answer"].is_string() && text.as_object().unwrap().len() == 1, "{m}");
            }
        }
    }
}

/// A reply whose text or call the token limit cut says so: `length` on chat (plain and
/// streamed, with the calls completed before the cut), `incomplete` on Responses.
#[actix_web::test]
async fn a_call_cut_by_the_token_limit_says_length_everywhere() {
    let c = ctx();
    let app = app(&c).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let ask = json!([{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}]);
    // Parallel calls until the limit: the last is cut.
    let body = json!({"messages": ask, "tools": tools, "tool_choice": "required", "max_tokens": 40, "temperature": 0});
    let (s, v) = call(&app, post("/v1/chat/completions", body.clone())).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 40);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let req = post("/v1/chat/completions", streamed).to_request();
    let resp = actix_web::test::call_service(&app, req).await;
    let text = String::from_utf8(actix_web::test::read_body(resp).await.to_vec()).unwrap();
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(!text.contains("\"finish_reason\":\"tool_calls\""), "{text}");
    // Responses: the same cut is `incomplete`, naming the limit.
    let body = json!({"input": "Weather in Paris, Rome and Oslo?", "max_output_tokens": 40, "temperature": 0,
        "tool_choice": "required", "tools": [{"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]});
    let (s, v) = call(&app, post("/v1/responses", body)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["incomplete_details"]["reason"].as_str()),
        (Some("incomplete"), Some("max_output_tokens")),
        "{v}"
    );
    // A call that ends before the limit is a clean `tool_calls`.
    let body = json!({"messages": ask, "tools": tools, "tool_choice": "required", "parallel_tool_calls": false,
        "max_tokens": 60, "temperature": 0});
    let (_, v) = call(&app, post("/v1/chat/completions", body)).await;
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
}
