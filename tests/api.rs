//! The HTTP API through actix's in-process test service, on the real default model: every
//! endpoint, every error status in OpenAI's error shape, the SSE format, adapters applied (and
//! never silently dropped).

mod common;

use actix_web::{http::StatusCode, test, web, App};
use common::http::{app, assert_error, call, ctx, ctx_with, post};
use common::*;
use loraplex::api::{self, AppState};
use loraplex::config::{ServeConfig, ServeOptions};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

#[actix_web::test]
async fn completion_returns_text_usage_and_applied_adapters() {
    let c = ctx();
    let app = app(&c).await;
    let (s, v) = call(&app, post("/v1/completions", json!({"model": "qa-r8", "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 24, "total_tokens": 29})
    );
    assert_eq!(v["adapters"], json!([{"name": "qa-r8", "version": 1, "scale": 1.0}]));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // The same adapter through the extension field gives the same text, and the reference's.
    let (_, v2) = call(&app, post("/v1/completions", json!({"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0, "adapters": [{"name": "qa-r8"}]}))).await;
    assert_eq!(v["choices"][0]["text"], v2["choices"][0]["text"]);
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(shared_dir().join("reference/cases.json")).unwrap(),
    )
    .unwrap();
    let want_text = cases["cases"][1]["results"]["short"]["greedy_text"].as_str().unwrap();
    assert_eq!(v["choices"][0]["text"], want_text);
}

#[actix_web::test]
async fn mixes_prompts_lists_n_logprobs_echo_and_stop() {
    let c = ctx();
    let app = app(&c).await;
    let (s, v) = call(&app, post("/v1/completions", json!({
        "prompt": ["The capital of France is", "Once"], "max_tokens": 6, "temperature": 0, "n": 2,
        "logprobs": 3, "adapters": [{"name": "qa-r8", "scale": 0.7}, {"name": "all-r16", "scale": 0.3}]
    }))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    assert_eq!(choices[0]["text"], choices[1]["text"], "greedy n=2 choices agree");
    let lp = &choices[0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    assert_eq!(v["usage"]["prompt_tokens"], 6, "each prompt counted once");
    let (_, e) = call(&app, post("/v1/completions", json!({"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0, "echo": true, "stop": ["\n"]}))).await;
    let text = e["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        text, "The capital of France is Paris.",
        "echoed prompt, then the text up to the stop string"
    );
    assert_eq!(e["choices"][0]["finish_reason"], "stop");
}

/// The chat endpoint is a completion of the model's template: on the default (packed) path
/// its answer equals `/v1/completions` on the templated text; on the exact f32 path it is
/// the reference model's answer ("Paris", then `<|im_end|>`). The packed path answers this
/// near-tie differently, exactly as llama.cpp does on the same GGUF (README: agreement).
#[actix_web::test]
async fn chat_completion_uses_the_template_and_reports_logprobs() {
    let chat = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 30, "temperature": 0, "logprobs": true, "top_logprobs": 2
    });
    let templated = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let c = ctx();
    let app = app(&c).await;
    let (s, v) = call(&app, post("/v1/chat/completions", chat.clone())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(v["adapters"], json!([]));
    let (_, raw) = call(
        &app,
        post("/v1/completions", json!({"prompt": templated, "max_tokens": 30, "temperature": 0})),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], raw["usage"]["prompt_tokens"], "{v} vs {raw}");
    assert_eq!(v["choices"][0]["message"]["content"], raw["choices"][0]["text"]);
    let exact = ctx_with(|o| o.dtype = Some("f32".into()));
    let app = app_for(&exact).await;
    let (s, v) = call(&app, post("/v1/chat/completions", chat)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

async fn app_for(
    c: &common::http::Ctx,
) -> impl actix_web::dev::Service<
    actix_http::Request,
    Response = actix_web::dev::ServiceResponse,
    Error = actix_web::Error,
> {
    app(c).await
}

#[actix_web::test]
async fn streaming_uses_openai_chunks_and_ends_with_done() {
    let c = ctx();
    let app = app(&c).await;
    let req = post(
        "/v1/chat/completions",
        json!({
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true}, "model": "rslora-r4"
        }),
    );
    let resp = test::call_service(&app, req.to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("content-type").unwrap(), "text/event-stream");
    let body = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{body}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e[6..]).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "length"));
    assert_eq!(chunks[0]["adapters"][0]["name"], "rslora-r4");
}

#[actix_web::test]
async fn models_and_adapter_management() {
    let c = ctx_with(|o| o.admin_key = Some("admin-secret".into()));
    let app = app(&c).await;
    let (s, v) = call(&app, test::TestRequest::get().uri("/v1/models")).await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> =
        v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["SmolLM2-135M-Instruct.Q4_1", "all-r16", "qa-r8", "rslora-r4"]);
    assert_eq!(
        v["data"][0]["loraplex"],
        json!({"architecture": "llama", "context_length": 8192, "max_abs_scale": 100.0})
    );
    let admin = ("Authorization", "Bearer admin-secret");
    let (s, v) =
        call(&app, post("/v1/adapters", json!({"name": "qa-r8"})).insert_header(admin)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["state"].as_str(), v["rank"].as_u64(), v["version"].as_u64()),
        (Some("loaded"), Some(8), Some(2))
    );
    assert_eq!(v["targets"], json!(["q_proj", "v_proj"]));
    let (s, v) = call(&app, test::TestRequest::get().uri("/v1/adapters/qa-r8")).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("loaded")));
    let (s, v) =
        call(&app, test::TestRequest::delete().uri("/v1/adapters/qa-r8").insert_header(admin))
            .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("available")));
    let (s, v) = call(&app, test::TestRequest::get().uri("/v1/adapters")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    let (s, v) = call(&app, test::TestRequest::get().uri("/v1/adapters/nope")).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "invalid_request_error");
    let (s, v) = call(
        &app,
        post("/v1/adapters", json!({"name": "x", "path": "../../etc"})).insert_header(admin),
    )
    .await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    let (s, _) = call(&app, test::TestRequest::get().uri("/health")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, test::TestRequest::get().uri("/ready")).await;
    assert_eq!(s, StatusCode::OK);
}

#[actix_web::test]
async fn bad_requests_get_the_right_status_in_openai_shape() {
    let c = ctx_with(|o| o.max_body_bytes = Some(4096));
    let app = app(&c).await;
    let ok = json!({"prompt": "hi", "max_tokens": 2});
    let cases: Vec<(test::TestRequest, StatusCode, &str)> = vec![
        (
            test::TestRequest::post()
                .uri("/v1/completions")
                .insert_header(("content-type", "application/json"))
                .set_payload("{not json"),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "stream": "yes"})),
            StatusCode::BAD_REQUEST,
            "wrong type",
        ),
        (
            post("/v1/completions", json!({"max_tokens": 2})),
            StatusCode::BAD_REQUEST,
            "missing prompt",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "suffix": "there"})),
            StatusCode::BAD_REQUEST,
            "unsupported field",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "frobnicate": 1})),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            post("/v1/completions", json!({"prompt": "", "max_tokens": 2})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty prompt",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "max_tokens": 0})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_tokens 0",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "temperature": 3.5})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "temperature",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "top_p": 0})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "top_p",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "n": 99})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "n",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "logprobs": 50})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "logprobs",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "max_tokens": 100000})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "beyond context",
        ),
        (
            post(
                "/v1/completions",
                json!({"prompt": "hi", "adapters": [{"name": "qa-r8", "scale": 1e9}]}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "huge scale",
        ),
        (
            post(
                "/v1/completions",
                json!({"prompt": "hi", "adapters": [{"name": "qa-r8"}, {"name": "qa-r8"}]}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "duplicate adapter",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "adapters": [{"name": "../qa-r8"}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "path in name",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "adapters": [{"name": "missing"}]})),
            StatusCode::NOT_FOUND,
            "unknown adapter",
        ),
        (
            post("/v1/completions", json!({"prompt": "hi", "model": "missing"})),
            StatusCode::NOT_FOUND,
            "unknown model",
        ),
        (
            post("/v1/chat/completions", json!({"messages": []})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "no messages",
        ),
        (
            post("/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "x"}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad role",
        ),
        (
            post("/v1/completions", json!({"prompt": "x".repeat(5000)})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
        ),
        (test::TestRequest::get().uri("/v1/nothing"), StatusCode::NOT_FOUND, "unknown route"),
    ];
    for (req, want, what) in cases {
        let (s, v) = call(&app, req).await;
        assert_eq!(s, want, "{what}: {v}");
        assert!(v["error"]["message"].as_str().is_some(), "{what}: {v}");
        // The server keeps serving after each bad request.
        let (s, _) = call(&app, post("/v1/completions", ok.clone())).await;
        assert_eq!(s, StatusCode::OK, "after {what}");
    }
}

#[actix_web::test]
async fn auth_keys_are_enforced() {
    let c = ctx_with(|o| {
        o.api_key = Some("user-key".into());
        o.admin_key = Some("admin-key".into());
    });
    let app = app(&c).await;
    let body = json!({"prompt": "hi", "max_tokens": 1});
    let (s, v) = call(&app, post("/v1/completions", body.clone())).await;
    assert_error(s, &v, StatusCode::UNAUTHORIZED, "authentication_error");
    let (s, v) = call(
        &app,
        post("/v1/completions", body.clone()).insert_header(("Authorization", "Bearer wrong")),
    )
    .await;
    assert_error(s, &v, StatusCode::UNAUTHORIZED, "authentication_error");
    let (s, _) = call(
        &app,
        post("/v1/completions", body).insert_header(("Authorization", "Bearer user-key")),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call(
        &app,
        test::TestRequest::delete()
            .uri("/v1/adapters/qa-r8")
            .insert_header(("Authorization", "Bearer user-key")),
    )
    .await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "permission_error");
    let (s, _) = call(
        &app,
        test::TestRequest::delete()
            .uri("/v1/adapters/qa-r8")
            .insert_header(("Authorization", "Bearer admin-key")),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[actix_web::test]
async fn not_ready_is_503() {
    let cfg = ServeConfig::try_from(ServeOptions::default()).unwrap();
    let metrics = loraplex::serve::new_metrics(&cfg).unwrap();
    let state = web::Data::new(AppState {
        backend: Arc::new(OnceLock::new()),
        metrics,
        limits: Default::default(),
        api_key: None,
        admin_key: None,
        http: Default::default(),
    });
    let app = test::init_service(App::new().app_data(state).configure(api::configure)).await;
    let (s, v) = call(&app, test::TestRequest::get().uri("/ready")).await;
    assert_error(s, &v, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable");
    let (s, v) = call(&app, post("/v1/completions", json!({"prompt": "hi"}))).await;
    assert_error(s, &v, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable");
}

#[actix_web::test]
async fn a_full_queue_is_429_and_draining_is_503() {
    let c = ctx_with(|o| {
        o.max_batch_size = Some(1);
        o.max_waiting = Some(1);
    });
    let app = app(&c).await;
    let reqs = (0..4).map(|_| {
        call(
            &app,
            post("/v1/completions", json!({"prompt": "Once", "max_tokens": 30, "temperature": 0})),
        )
    });
    let results = futures_util::future::join_all(reqs).await;
    let statuses: Vec<StatusCode> = results.iter().map(|r| r.0).collect();
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
    let rejected = results.iter().find(|r| r.0 == StatusCode::TOO_MANY_REQUESTS).unwrap();
    assert_error(rejected.0, &rejected.1, StatusCode::TOO_MANY_REQUESTS, "rate_limit_error");
    c.state.backend().unwrap().engine.drain();
    let (s, v) = call(&app, post("/v1/completions", json!({"prompt": "hi"}))).await;
    assert_error(s, &v, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable");
}

/// OpenAI's spec lets a completion's `prompt` be token ids (or lists of them): served as the
/// same text would be, each id checked against the vocabulary.
#[actix_web::test]
async fn token_id_prompts_serve_like_their_text() {
    let c = ctx();
    let app = app(&c).await;
    let body = |prompt: Value| json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0, "echo": true});
    let (status, text) =
        call(&app, post("/v1/completions", body(json!("The capital of France is")))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (_, tok) =
        call(&app, post("/tokenize", json!({"prompt": "The capital of France is"}))).await;
    let ids = tok["tokens"].clone();
    let (status, by_ids) = call(&app, post("/v1/completions", body(ids.clone()))).await;
    assert_eq!(status, StatusCode::OK, "{by_ids}");
    assert_eq!(by_ids["choices"][0]["text"], text["choices"][0]["text"]);
    assert_eq!(by_ids["choices"][0]["logprobs"], text["choices"][0]["logprobs"]);
    let (status, two) = call(&app, post("/v1/completions", body(json!([ids.clone(), ids])))).await;
    assert_eq!(status, StatusCode::OK, "{two}");
    assert_eq!(two["choices"].as_array().unwrap().len(), 2);
    let (status, v) = call(&app, post("/v1/completions", body(json!([1, 2, 99999999])))).await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert_eq!(v["error"]["param"], "prompt[2]", "{v}");
    let (status, v) =
        call(&app, post("/v1/completions", body(json!([[1, 2], [5, 99999999]])))).await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert_eq!(v["error"]["param"], "prompt[1][1]", "{v}");
}
