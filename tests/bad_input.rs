//! The bad-input battery: one table of hostile or broken requests, each answered with the
//! right 4xx in OpenAI's error shape (`type`, `message`, `param`, `code`), and the server still
//! healthy afterwards: `/health` answers, and every tenth case a real completion succeeds.

mod common;

use actix_web::http::StatusCode;
use actix_web::test::TestRequest;
use common::http::{app, call, ctx, ctx_with, ctx_with_config, post, post_raw};
use serde_json::{json, Value};

const C: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";
const USER_KEY: &str = "user-key-0123456789";
const ADMIN_KEY: &str = "admin-key-9876543210";

fn bearer(req: TestRequest, key: &str) -> TestRequest {
    req.insert_header(("Authorization", format!("Bearer {key}")))
}

/// A completion request with the user key and `extra` fields over a valid base.
fn comp(extra: Value) -> TestRequest {
    let mut body = json!({"prompt": "Hello", "max_tokens": 2});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    bearer(post(C, body), USER_KEY)
}

fn chat(extra: Value) -> TestRequest {
    let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    bearer(post(CHAT, body), USER_KEY)
}

fn raw(path: &str, body: impl Into<Vec<u8>>) -> TestRequest {
    bearer(post_raw(path, body), USER_KEY)
}

fn adapters(list: Value) -> TestRequest {
    comp(json!({"adapters": list}))
}

const BAD: StatusCode = StatusCode::BAD_REQUEST;
const INVALID: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;
const NOT_FOUND: StatusCode = StatusCode::NOT_FOUND;
const REQ: &str = "invalid_request_error";

#[actix_web::test]
async fn every_bad_request_gets_its_4xx_and_the_server_keeps_serving() {
    let c = ctx_with(|o| {
        o.api_key = Some(USER_KEY.into());
        o.admin_key = Some(ADMIN_KEY.into());
        o.max_body_bytes = Some(128 * 1024);
    });
    let app = app(&c).await;
    let long_prompt = "hello ".repeat(5000); // ~5,000 tokens: over the 4,096-token prompt limit
    let nine: Vec<Value> = (0..9).map(|i| json!({"name": format!("adapter-{i}")})).collect();
    #[rustfmt::skip]
    let cases: Vec<(&str, TestRequest, StatusCode, &str)> = vec![
        // Malformed JSON and bodies.
        ("malformed JSON", raw(C, "{not json"), BAD, REQ),
        ("empty body", raw(C, ""), BAD, REQ),
        ("truncated JSON", raw(C, r#"{"prompt": "hi""#), BAD, REQ),
        ("trailing garbage", raw(C, r#"{"prompt": "hi"} x"#), BAD, REQ),
        ("array body", raw(C, "[]"), BAD, REQ),
        ("string body", raw(C, r#""hi""#), BAD, REQ),
        ("null body", raw(C, "null"), BAD, REQ),
        ("invalid UTF-8 body", raw(C, b"\xff\xfe{\"prompt\": 1}".to_vec()), BAD, REQ),
        ("invalid UTF-8 in a string", raw(C, b"{\"prompt\": \"\xc3\x28\"}".to_vec()), BAD, REQ),
        ("NaN literal scale", raw(C, r#"{"prompt": "hi", "adapters": [{"name": "qa-r8", "scale": NaN}]}"#), BAD, REQ),
        ("Infinity literal scale", raw(C, r#"{"prompt": "hi", "adapters": [{"name": "qa-r8", "scale": Infinity}]}"#), BAD, REQ),
        ("scale overflowing f64", raw(C, r#"{"prompt": "hi", "adapters": [{"name": "qa-r8", "scale": 1e400}]}"#), BAD, REQ),
        ("oversize body", raw(C, format!(r#"{{"prompt": "{}"}}"#, "x".repeat(200 * 1024))), StatusCode::PAYLOAD_TOO_LARGE, REQ),
        // Wrong types.
        ("prompt is a number", comp(json!({"prompt": 42})), BAD, REQ),
        ("prompt is an object", comp(json!({"prompt": {"a": 1}})), BAD, REQ),
        ("prompt list of mixed types", comp(json!({"prompt": ["a", 1]})), BAD, REQ),
        ("max_tokens is a string", comp(json!({"max_tokens": "ten"})), BAD, REQ),
        ("max_tokens is a fraction", comp(json!({"max_tokens": 1.5})), BAD, REQ),
        ("temperature is a string", comp(json!({"temperature": "hot"})), BAD, REQ),
        ("stream is a string", comp(json!({"stream": "yes"})), BAD, REQ),
        ("stream is a number", comp(json!({"stream": 1})), BAD, REQ),
        ("stream_options is a string", comp(json!({"stream": true, "stream_options": "x"})), BAD, REQ),
        ("include_usage is a string", comp(json!({"stream": true, "stream_options": {"include_usage": "yes"}})), BAD, REQ),
        ("n is a string", comp(json!({"n": "2"})), BAD, REQ),
        ("stop is a number", comp(json!({"stop": 5})), BAD, REQ),
        ("logprobs is a string", comp(json!({"logprobs": "yes"})), BAD, REQ),
        ("seed is a string", comp(json!({"seed": "7"})), BAD, REQ),
        ("adapters is a string", adapters(json!("qa-r8")), BAD, REQ),
        ("adapter without a name", adapters(json!([{"scale": 1.0}])), BAD, REQ),
        ("adapter scale is a string", adapters(json!([{"name": "qa-r8", "scale": "big"}])), BAD, REQ),
        ("messages is a string", chat(json!({"messages": "hi"})), BAD, REQ),
        ("message without content", chat(json!({"messages": [{"role": "user"}]})), BAD, REQ),
        ("message content is a number", chat(json!({"messages": [{"role": "user", "content": 5}]})), BAD, REQ),
        // Missing and unknown fields.
        ("completion without prompt", bearer(post(C, json!({"max_tokens": 2})), USER_KEY), BAD, REQ),
        ("chat without messages", bearer(post(CHAT, json!({"max_tokens": 2})), USER_KEY), BAD, REQ),
        ("unknown field", comp(json!({"frobnicate": 1})), BAD, REQ),
        // The sampling fields beyond OpenAI's core, and structured outputs.
        ("logit_bias key not a token id", comp(json!({"logit_bias": {"one": 5}})), BAD, REQ),
        ("logit_bias key past the vocabulary", comp(json!({"logit_bias": {"49152": 5}})), BAD, REQ),
        ("logit_bias value above 100", comp(json!({"logit_bias": {"1": 101}})), BAD, REQ),
        ("logit_bias value a string", comp(json!({"logit_bias": {"1": "up"}})), BAD, REQ),
        ("logit_bias a list", comp(json!({"logit_bias": [1, 2]})), BAD, REQ),
        ("logit_bias key with a sign", comp(json!({"logit_bias": {"+5": 5}})), BAD, REQ),
        ("logit_bias key with leading zeros", comp(json!({"logit_bias": {"00005": 5}})), BAD, REQ),
        ("logit_bias one token twice", comp(json!({"logit_bias": {"5": 100, "05": 100}})), BAD, REQ),
        ("min_p above 1", comp(json!({"min_p": 1.5})), INVALID, REQ),
        ("repetition_penalty 0", comp(json!({"repetition_penalty": 0})), INVALID, REQ),
        ("repetition_penalty a subnormal f32", comp(json!({"repetition_penalty": 1e-39})), INVALID, REQ),
        ("repetition_penalty below 0.01", comp(json!({"repetition_penalty": 0.001})), INVALID, REQ),
        ("min_tokens with a grammar", comp(json!({"min_tokens": 2, "max_tokens": 4, "structured_outputs": {"choice": ["a", "b"]}})), INVALID, REQ),
        ("a Lark grammar over the size bound", comp(json!({"structured_outputs": {"grammar": format!("start: \"{}\"", "a".repeat(70_000))}})), BAD, REQ),
        ("129 tools", chat(json!({"tools": (0..129).map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}})).collect::<Vec<_>>()})), BAD, REQ),
        ("min_tokens above max_tokens", comp(json!({"min_tokens": 9, "max_tokens": 4})), INVALID, REQ),
        ("stop_token_ids past the vocabulary", comp(json!({"stop_token_ids": [1, 99999999]})), BAD, REQ),
        ("stop_token_ids negative", comp(json!({"stop_token_ids": [-1]})), BAD, REQ),
        ("response_format of an unknown type", chat(json!({"response_format": {"type": "xml"}})), BAD, REQ),
        ("json_schema without json_schema", chat(json!({"response_format": {"type": "json_schema"}})), BAD, REQ),
        ("invalid schema type", chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}})), BAD, REQ),
        ("unsupported schema keyword", comp(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"not": {}}}}}}})), BAD, REQ),
        ("misspelled schema keyword", comp(json!({"structured_outputs": {"json": {"type": "string", "maxLenght": 3}}})), BAD, REQ),
        ("invalid regex", comp(json!({"structured_outputs": {"regex": "a(b"}})), BAD, REQ),
        ("two structured_outputs kinds", comp(json!({"structured_outputs": {"regex": "a", "choice": ["a"]}})), BAD, REQ),
        ("empty choice", comp(json!({"structured_outputs": {"choice": []}})), BAD, REQ),
        ("unknown structured_outputs key", comp(json!({"structured_outputs": {"structural_tag": "x"}})), BAD, REQ),
        ("both response_format and structured_outputs", comp(json!({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}})), BAD, REQ),
        ("tool parameters not a schema", chat(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]})), BAD, REQ),
        ("tool parameters of a string", chat(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]})), BAD, REQ),
        ("tool parameters with an unknown keyword", chat(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "propertys": {}}}}]})), BAD, REQ),
        ("tool name with a space", chat(json!({"tools": [{"type": "function", "function": {"name": "get weather"}}]})), BAD, REQ),
        ("tool_choice naming an unknown tool", chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}})), BAD, REQ),
        ("tool_choice without tools", chat(json!({"tool_choice": "required"})), BAD, REQ),
        ("tool message without tool_call_id", chat(json!({"messages": [{"role": "tool", "content": "x"}]})), BAD, REQ),
        ("tool call arguments not JSON", chat(json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]})), BAD, REQ),
        ("vLLM's removed guided_json", comp(json!({"guided_json": {"type": "object"}})), BAD, REQ),
        ("best_of 3", comp(json!({"best_of": 3})), BAD, REQ),
        ("tools in chat", chat(json!({"tools": [{"type": "function"}]})), BAD, REQ),
        // Empty and too long prompts.
        ("empty prompt", comp(json!({"prompt": ""})), INVALID, REQ),
        ("empty prompt list", comp(json!({"prompt": []})), INVALID, REQ),
        ("list with an empty prompt", comp(json!({"prompt": ["a", ""]})), INVALID, REQ),
        ("token-id prompt out of the vocabulary", comp(json!({"prompt": [[1, 2], [3, 4_000_000]]})), INVALID, REQ),
        ("token-id prompt that is not a u32", comp(json!({"prompt": [1, -2]})), BAD, REQ),
        ("prompt over the prompt limit", comp(json!({"prompt": long_prompt})), INVALID, REQ),
        ("no chat messages", chat(json!({"messages": []})), INVALID, REQ),
        ("unknown chat role", chat(json!({"messages": [{"role": "wizard", "content": "x"}]})), INVALID, REQ),
        ("image content part", chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})), INVALID, REQ),
        // Token limits.
        ("max_tokens 0", comp(json!({"max_tokens": 0})), INVALID, REQ),
        ("max_tokens negative", comp(json!({"max_tokens": -5})), INVALID, REQ),
        ("max_tokens beyond the context", comp(json!({"max_tokens": 100000})), INVALID, REQ),
        ("max_tokens beyond i64", comp(json!({"max_tokens": 18446744073709551615u64})), BAD, REQ),
        ("max_completion_tokens 0", chat(json!({"max_completion_tokens": 0})), INVALID, REQ),
        // Sampling ranges.
        ("temperature below 0", comp(json!({"temperature": -0.1})), INVALID, REQ),
        ("temperature above 2", comp(json!({"temperature": 2.5})), INVALID, REQ),
        ("top_p 0", comp(json!({"top_p": 0})), INVALID, REQ),
        ("top_p above 1", comp(json!({"top_p": 1.5})), INVALID, REQ),
        ("top_k below -1", comp(json!({"top_k": -3})), INVALID, REQ),
        ("presence_penalty above 2", comp(json!({"presence_penalty": 3})), INVALID, REQ),
        ("frequency_penalty below -2", comp(json!({"frequency_penalty": -3})), INVALID, REQ),
        // n, logprobs and stop limits.
        ("n 0", comp(json!({"n": 0})), INVALID, REQ),
        ("n over the limit", comp(json!({"n": 99})), INVALID, REQ),
        ("logprobs over the limit", comp(json!({"logprobs": 50})), INVALID, REQ),
        ("top_logprobs over the limit", chat(json!({"logprobs": true, "top_logprobs": 50})), INVALID, REQ),
        ("top_logprobs without logprobs", chat(json!({"top_logprobs": 2})), INVALID, REQ),
        ("too many stop sequences", comp(json!({"stop": ["a", "b", "c", "d", "e", "f"]})), INVALID, REQ),
        ("stop sequence too long", comp(json!({"stop": ["y".repeat(1000)]})), INVALID, REQ),
        ("empty stop sequence", comp(json!({"stop": [""]})), INVALID, REQ),
        ("stream_options without stream", comp(json!({"stream_options": {"include_usage": true}})), INVALID, REQ),
        // Adapter mixes.
        ("huge scale", adapters(json!([{"name": "qa-r8", "scale": 1e9}])), INVALID, REQ),
        ("negative scale beyond the limit", adapters(json!([{"name": "qa-r8", "scale": -1e3}])), INVALID, REQ),
        ("duplicate adapters", adapters(json!([{"name": "qa-r8"}, {"name": "qa-r8", "scale": 0.5}])), INVALID, REQ),
        ("model repeated in adapters", comp(json!({"model": "qa-r8", "adapters": [{"name": "qa-r8"}]})), INVALID, REQ),
        ("more adapters than allowed", adapters(Value::Array(nine)), INVALID, REQ),
        ("unknown adapter", adapters(json!([{"name": "no-such-adapter"}])), NOT_FOUND, REQ),
        ("unknown model", comp(json!({"model": "no-such-model"})), NOT_FOUND, REQ),
        ("adapter name with ../", adapters(json!([{"name": "../qa-r8"}])), INVALID, REQ),
        ("adapter name as absolute path", adapters(json!([{"name": "/etc/passwd"}])), INVALID, REQ),
        ("adapter name with NUL", adapters(json!([{"name": "qa\u{0}r8"}])), INVALID, REQ),
        ("very long adapter name", adapters(json!([{"name": "a".repeat(300)}])), INVALID, REQ),
        ("hidden adapter name", adapters(json!([{"name": ".qa-r8"}])), INVALID, REQ),
        ("empty adapter name", adapters(json!([{"name": ""}])), INVALID, REQ),
        ("model with ../", comp(json!({"model": "../../etc"})), NOT_FOUND, REQ),
        // Auth.
        ("no API key", post(C, json!({"prompt": "hi"})), StatusCode::UNAUTHORIZED, "authentication_error"),
        ("wrong API key", bearer(post(C, json!({"prompt": "hi"})), "nope"), StatusCode::UNAUTHORIZED, "authentication_error"),
        ("Bearer without a key", post(C, json!({"prompt": "hi"})).insert_header(("Authorization", "Bearer ")), StatusCode::UNAUTHORIZED, "authentication_error"),
        ("Basic scheme", post(C, json!({"prompt": "hi"})).insert_header(("Authorization", format!("Basic {USER_KEY}"))), StatusCode::UNAUTHORIZED, "authentication_error"),
        ("key as a prefix", bearer(post(C, json!({"prompt": "hi"})), &USER_KEY[..8]), StatusCode::UNAUTHORIZED, "authentication_error"),
        ("unload with the inference key", bearer(TestRequest::delete().uri("/v1/adapters/qa-r8"), USER_KEY), StatusCode::FORBIDDEN, "permission_error"),
        ("register with the inference key", bearer(post("/v1/adapters", json!({"name": "x", "path": "qa-r8"})), USER_KEY), StatusCode::FORBIDDEN, "permission_error"),
        ("unload without a key", TestRequest::delete().uri("/v1/adapters/qa-r8"), StatusCode::UNAUTHORIZED, "authentication_error"),
        // Adapter management with the admin key but bad arguments.
        ("register a path outside the root", bearer(post("/v1/adapters", json!({"name": "x", "path": "../../etc"})), ADMIN_KEY), INVALID, REQ),
        ("register an absolute path", bearer(post("/v1/adapters", json!({"name": "x", "path": "/etc"})), ADMIN_KEY), INVALID, REQ),
        ("register with a bad name", bearer(post("/v1/adapters", json!({"name": "../x", "path": "qa-r8"})), ADMIN_KEY), INVALID, REQ),
        ("unload an unknown adapter", bearer(TestRequest::delete().uri("/v1/adapters/nothing-here"), ADMIN_KEY), NOT_FOUND, REQ),
        // Routes and methods.
        ("unknown route", bearer(TestRequest::get().uri("/v1/nothing"), USER_KEY), NOT_FOUND, REQ),
        ("GET on a POST route", bearer(TestRequest::get().uri(C), USER_KEY), NOT_FOUND, REQ),
    ];
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut seen = std::collections::HashSet::new();
    let mut wrong = Vec::new();
    for (i, (what, req, want, kind)) in cases.into_iter().enumerate() {
        assert!(seen.insert(what), "duplicate case name {what}");
        let (status, body) = call(&app, req).await;
        let e = &body["error"];
        let shaped = e["message"].as_str().is_some_and(|m| !m.is_empty())
            && e.get("param").is_some()
            && e.get("code").is_some();
        if status != want || e["type"] != kind || !shaped {
            wrong.push(format!("{what}: want {want} {kind}, got {status} {body}"));
        }
        assert!(
            !body.to_string().contains(USER_KEY) && !body.to_string().contains(ADMIN_KEY),
            "{what}: a key leaked"
        );
        let (s, _) = call(&app, TestRequest::get().uri("/health")).await;
        assert_eq!(s, StatusCode::OK, "unhealthy after {what}");
        if i % 10 == 9 {
            let (s, v) = call(&app, comp(json!({"temperature": 0}))).await;
            assert_eq!(s, StatusCode::OK, "a good request failed after {what}: {v}");
        }
    }
    assert!(wrong.is_empty(), "{} cases answered wrongly:\n{}", wrong.len(), wrong.join("\n"));
    let (s, v) = call(&app, comp(json!({"model": "qa-r8", "temperature": 0}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// Numbers the engine computes with in f32 are checked in f32, and the bounds they are told
/// read as numbers (no 300-digit decimals); a truncated body names no made-up `param`.
#[actix_web::test]
async fn numbers_are_checked_as_the_engine_computes_them_and_errors_read_well() {
    let c = ctx_with(|o| {
        o.api_key = Some(USER_KEY.into());
        o.max_request_tokens = Some(20_000);
    });
    let app = app(&c).await;
    let cases: Vec<(&str, TestRequest, &str, &str)> = vec![
        (
            "temperature 1e-40 (0 as f32)",
            comp(json!({"temperature": 1e-40})),
            "temperature",
            "1e-40",
        ),
        (
            "temperature below the minimum",
            comp(json!({"temperature": 1e-6})),
            "temperature",
            "at least 1e-5, got 1e-6",
        ),
        ("top_p 1e-300 (0 as f32)", comp(json!({"top_p": 1e-300})), "top_p", "1e-300"),
        (
            "scale 1e300",
            adapters(json!([{"name": "qa-r8", "scale": 1e300}])),
            "adapters[0].scale",
            "1e300",
        ),
        (
            "presence_penalty 3e300",
            comp(json!({"presence_penalty": 3e300})),
            "presence_penalty",
            "3e300",
        ),
    ];
    for (what, req, param, shown) in cases {
        let (status, body) = call(&app, req).await;
        assert_eq!(status, INVALID, "{what}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert_eq!(body["error"]["param"], param, "{what}: {body}");
        assert!(msg.contains(shown), "{what}: {msg}");
        assert!(
            !msg.chars()
                .collect::<Vec<_>>()
                .windows(20)
                .any(|w| w.iter().all(char::is_ascii_digit)),
            "{what}: a long digit run in {msg}"
        );
    }
    // A request that can never be queued (40 prompts × n 8 = 320 sequences, the queue holds
    // 256) is refused for good, not told to retry.
    let forty: Vec<String> = (0..40).map(|i| format!("Prompt {i}")).collect();
    let (status, body) = call(&app, comp(json!({"prompt": forty, "n": 8}))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (INVALID, Some("too_many_sequences")),
        "{body}"
    );
    // The work budget: prompt + max_tokens of every sequence.
    let long = "word ".repeat(1500);
    let (status, body) =
        call(&app, comp(json!({"prompt": long, "n": 8, "max_tokens": 1000}))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str(), body["error"]["param"].as_str()),
        (INVALID, Some("request_too_large"), Some("n")),
        "{body}"
    );
    assert!(body["error"]["message"].as_str().unwrap().contains("20000"), "{body}");
    // Syntax errors: no `?` param.
    for raw_body in
        [r#"{"prompt": "hi""#, r#"{"prompt": "hi", "max_tok"#, r#"{"adapters": [{"name": "#]
    {
        let (status, body) = call(&app, raw(C, raw_body)).await;
        assert_eq!(status, BAD, "{body}");
        assert_ne!(body["error"]["param"], "?", "{raw_body}: {body}");
        assert!(
            !body["error"]["param"].as_str().is_some_and(|p| p.contains('?')),
            "{raw_body}: {body}"
        );
    }
    // JSON routes want JSON: a `text/plain` body (what a web page can send without a
    // preflight) is a 415.
    let plain = bearer(
        TestRequest::post()
            .uri(C)
            .insert_header(("content-type", "text/plain"))
            .set_payload(r#"{"prompt": "hi"}"#),
        USER_KEY,
    );
    let (status, body) = call(&app, plain).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type")),
        "{body}"
    );
}

/// Adapter folders' server paths are for the admin key; errors name paths relative to the
/// adapters folder.
#[actix_web::test]
async fn adapter_paths_are_shown_to_the_admin_key_only() {
    let c = ctx_with(|o| {
        o.api_key = Some(USER_KEY.into());
        o.admin_key = Some(ADMIN_KEY.into());
    });
    std::fs::create_dir_all(c.dir.path().join("broken")).unwrap();
    std::fs::write(
        c.dir.path().join("broken/adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    c.state.backend().unwrap().registry.rescan();
    let app = app(&c).await;
    let root = c.dir.path().canonicalize().unwrap().display().to_string();
    for uri in ["/v1/adapters", "/v1/models", "/v1/adapters/qa-r8", "/v1/adapters/broken"] {
        let (s, user) = call(&app, bearer(TestRequest::get().uri(uri), USER_KEY)).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {user}");
        assert!(
            !user.to_string().contains(&root),
            "{uri}: the inference key sees a server path: {user}"
        );
        assert!(!user.to_string().contains("\"path\""), "{uri}: {user}");
        let (_, admin) = call(&app, bearer(TestRequest::get().uri(uri), ADMIN_KEY)).await;
        assert!(
            admin.to_string().contains(&root),
            "{uri}: the admin key sees the folders: {admin}"
        );
    }
    let (_, broken) =
        call(&app, bearer(TestRequest::get().uri("/v1/adapters/broken"), USER_KEY)).await;
    assert!(
        broken["error"].as_str().is_some_and(|e| e.contains("broken/adapter_model.safetensors")),
        "{broken}"
    );
}

/// A body that must not leak internals: no backtrace, no panic message, no source path.
fn assert_no_internals(what: &str, body: &Value) {
    let text = body.to_string();
    for leak in [
        "backtrace",
        "panicked",
        "injected handler panic",
        "injected row panic",
        ".rs:",
        "candle_core",
        "stack",
    ] {
        assert!(!text.contains(leak), "{what}: `{leak}` in {text}");
    }
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.contains('\n')), "{what}: {text}");
}

#[actix_web::test]
async fn panics_and_bad_sampling_values_answer_without_internals() {
    use loraplex::engine::{FaultInjection, FaultKind};
    use std::sync::Arc;
    for (kind, status) in [(FaultKind::HandlerPanic, 500), (FaultKind::RowPanic, 500)] {
        let marker_text = " Zanzibar-quokka";
        let c = ctx_with_config(
            |_| {},
            |cfg| {
                let tok = loraplex::model::load::load_model(
                    cfg.model.as_str(),
                    loraplex::model::WeightFormat::Packed,
                    &candle_core::Device::Cpu,
                )
                .unwrap()
                .tokenizer;
                let marker = tok.encode(marker_text).unwrap();
                cfg.engine.faults = Some(Arc::new(FaultInjection::new(marker, kind)));
            },
        );
        let app = app(&c).await;
        let poisoned = json!({"prompt": format!("Say{marker_text} twice"), "max_tokens": 3});
        let (s, body) = call(&app, post(C, poisoned)).await;
        assert_eq!(s.as_u16(), status, "{kind:?}: {body}");
        assert_eq!(body["error"]["type"], "server_error", "{kind:?}: {body}");
        assert_no_internals(&format!("{kind:?}"), &body);
        // The server goes on serving.
        let (s, body) = call(&app, post(C, json!({"prompt": "Hello", "max_tokens": 2}))).await;
        assert_eq!(s, 200, "{kind:?} after: {body}");
    }
    let c = ctx();
    let app = app(&c).await;
    for (field, v) in [
        ("repetition_penalty", json!(1e-39)),
        ("temperature", json!(1e-40)),
        ("top_p", json!(1e-46)),
    ] {
        let mut b = json!({"prompt": "Hello hello hello", "max_tokens": 4, "temperature": 1});
        b[field] = v;
        let (s, body) = call(&app, post(C, b)).await;
        assert_eq!(s, 422, "{field}: {body}");
        assert_eq!(body["error"]["param"], field, "{body}");
        assert_no_internals(field, &body);
    }
}
