//! The training-client API over HTTP on the real model: the log-probabilities `sample` and a
//! completion of a saved version report equal `forward_backward`'s for the same tokens (f32
//! path), a saved version serves at once, and bad bodies are refused naming the field.

mod common;

use actix_web::http::StatusCode;
use common::http::{app, assert_error, call, ctx_with, post};
use serde_json::{json, Value};

fn ints(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Creates a client and takes one cross-entropy step on a sentence, so its weights differ from
/// the base model's.
async fn trained_client(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
    adapter: &str,
) -> String {
    let (status, c) =
        call(app, post("/v1/training/clients", json!({"rank": 8, "seed": 1, "adapter": adapter})))
            .await;
    assert_eq!(status, StatusCode::OK, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    let tokens: Vec<u32> = vec![504, 3575, 282, 4649, 314, 7042, 30, 198, 504, 6330];
    let weights: Vec<f64> = (0..tokens.len()).map(|i| if i < 5 { 0.0 } else { 1.0 }).collect();
    let (status, v) = call(
        app,
        post(
            &format!("/v1/training/clients/{id}/forward_backward"),
            json!({"loss": "cross_entropy", "data": [{"tokens": tokens, "weights": weights}]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["loss"].as_f64().unwrap() > 0.0);
    let (status, v) = call(
        app,
        post(&format!("/v1/training/clients/{id}/optim_step"), json!({"learning_rate": 1e-2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["steps"], 1);
    id
}

#[actix_web::test]
async fn sampled_and_served_logprobs_equal_forward_backward_on_f32() {
    let c = ctx_with(|o| o.dtype = Some("f32".into()));
    let app = app(&c).await;
    let id = trained_client(&app, "rl-policy").await;
    let (status, s) = call(
        &app,
        post(&format!("/v1/training/clients/{id}/sample"),
             json!({"prompt": "The capital of France is", "max_tokens": 12, "n": 2, "temperature": 1.0, "seed": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{s}");
    let prompt = ints(&s["prompt_tokens"]);
    let mut data = Vec::new();
    let mut sampled = Vec::new();
    for sample in s["samples"].as_array().unwrap() {
        let gen = ints(&sample["tokens"]);
        let lp = floats(&sample["logprobs"]);
        let tokens: Vec<u32> = prompt.iter().chain(&gen).copied().collect();
        let n = tokens.len();
        // Importance sampling with the sampler's own log-probabilities (ratio 1 at the start).
        let adv: Vec<f64> = (0..n).map(|i| if i >= prompt.len() { 0.5 } else { 0.0 }).collect();
        let q: Vec<f64> =
            (0..n).map(|i| if i >= prompt.len() { lp[i - prompt.len()] } else { 0.0 }).collect();
        data.push(json!({"tokens": tokens, "advantages": adv, "logprobs": q}));
        sampled.push((prompt.len(), lp));
    }
    let (status, fb) = call(
        &app,
        post(
            &format!("/v1/training/clients/{id}/forward_backward"),
            json!({"loss": "importance_sampling", "data": data}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{fb}");
    let mut worst = 0f64;
    for (k, (start, lp)) in sampled.iter().enumerate() {
        let ours = &fb["logprobs"][k];
        assert!(ours[0].is_null());
        for (j, want) in lp.iter().enumerate() {
            worst = worst.max((ours[start + j].as_f64().unwrap() - want).abs());
        }
    }
    eprintln!("f32 path: sample vs forward_backward log-probs differ by at most {worst:e}");
    assert!(worst <= 1e-4, "sample and forward_backward log-probs differ by {worst}");
    // Importance sampling at ratio 1: the loss is −Σ A_i.
    let total_adv: f64 = sampled.iter().map(|(_, lp)| 0.5 * lp.len() as f64).sum();
    assert!((fb["loss"].as_f64().unwrap() + total_adv).abs() < 1e-3 * total_adv, "{}", fb["loss"]);

    // Saved as a version: a completion of `rl-policy@1` reports the same log-probs.
    let (status, saved) =
        call(&app, post(&format!("/v1/training/clients/{id}/save"), json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    assert_eq!(saved["model"], "rl-policy@1");
    let gen = ints(&s["samples"][0]["tokens"]);
    let text = s["samples"][0]["text"].as_str().unwrap();
    let (status, done) = call(
        &app,
        post("/v1/completions", json!({"model": "rl-policy@1", "prompt": "The capital of France is", "max_tokens": gen.len(),
                                        "temperature": 0, "logprobs": 0, "echo": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["adapters"][0]["version"], 1);
    let served: Vec<Option<f64>> = done["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64())
        .collect();
    // The echoed prompt's log-probabilities (the first `null`) equal forward_backward's too.
    assert!(served.len() >= prompt.len() && served[0].is_none(), "{served:?}");
    for (i, v) in served.iter().take(prompt.len()).enumerate().skip(1) {
        let ours = fb["logprobs"][0][i].as_f64().unwrap();
        assert!((v.unwrap() - ours).abs() <= 1e-4, "prompt token {i}: {v:?} vs {ours}");
    }
    assert!(!text.is_empty());
}

#[actix_web::test]
async fn bad_training_bodies_are_refused_by_field() {
    let c = ctx_with(|_| {});
    let app = app(&c).await;
    let (status, cl) = call(&app, post("/v1/training/clients", json!({"rank": 4}))).await;
    assert_eq!(status, StatusCode::OK, "{cl}");
    let id = cl["id"].as_str().unwrap();
    let fb = format!("/v1/training/clients/{id}/forward_backward");
    let cases = [
        (
            json!({"loss": "cross_entropy", "data": [{"tokens": [1, 2, 99999], "weights": [0, 1, 1]}]}),
            "data[0].tokens[2]",
        ),
        (
            json!({"loss": "cross_entropy", "data": [{"tokens": [1, 2, 3], "weights": [0, 1]}]}),
            "data[0].weights",
        ),
        (
            json!({"loss": "cross_entropy", "data": [{"tokens": [1, 2, 3], "weights": [1, 1, 1]}]}),
            "data[0].weights[0]",
        ),
        (json!({"loss": "cross_entropy", "data": [{"tokens": [1, 2, 3]}]}), "data[0].weights"),
        (
            json!({"loss": "importance_sampling", "data": [{"tokens": [1, 2, 3], "advantages": [0, 1e39, 1], "logprobs": [0, -1, -1]}]}),
            "data[0].advantages[1]",
        ),
        (
            json!({"loss": "importance_sampling", "data": [{"tokens": [1, 2, 3], "advantages": [0, 1, 1]}]}),
            "data[0].logprobs",
        ),
        (
            json!({"loss": "importance_sampling", "data": [{"tokens": [1, 2, 3], "advantages": [0, 1, 1], "logprobs": [0, 0.5, -1]}]}),
            "data[0].logprobs[1]",
        ),
        (
            json!({"loss": "cross_entropy", "data": [{"tokens": [1], "weights": [0]}]}),
            "data[0].tokens",
        ),
        (json!({"loss": "cross_entropy", "data": []}), "data"),
        (
            json!({"loss": "importance_sampling", "data": [{"tokens": [1, 2, 3], "advantages": [0, 1, 1], "logprobs": [0, -1, -500]}]}),
            "data[0].logprobs[2]",
        ),
        (
            json!({"loss": "cross_entropy", "data": [{"tokens": vec![1u32; 4097], "weights": vec![0.0; 4097]}]}),
            "data",
        ),
    ];
    for (body, param) in cases {
        let (status, v) = call(&app, post(&fb, body.clone())).await;
        assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{body} → {v}");
    }
    let (status, v) = call(&app, post(&fb, json!({"loss": "ppo", "data": []}))).await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, "invalid_request_error");
    assert_eq!(v["error"]["param"], "loss", "{v}");
    let step = format!("/v1/training/clients/{id}/optim_step");
    for (body, param) in [
        (json!({"learning_rate": 0}), "learning_rate"),
        (json!({"learning_rate": 1e-3, "beta2": 1.0}), "beta2"),
        (json!({"learning_rate": 1e-3, "eps": -1}), "eps"),
    ] {
        let (status, v) = call(&app, post(&step, body)).await;
        assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let (status, v) =
        call(&app, post("/v1/training/clients/tc-nope/optim_step", json!({"learning_rate": 1e-3})))
            .await;
    assert_error(status, &v, StatusCode::NOT_FOUND, "invalid_request_error");
    let (status, v) =
        call(&app, post("/v1/training/clients", json!({"from_adapter": "qa-r8@9"}))).await;
    assert_error(status, &v, StatusCode::NOT_FOUND, "invalid_request_error");
    assert_eq!(v["error"]["code"], "adapter_version_not_found");
    let (status, v) =
        call(&app, post("/v1/training/clients", json!({"rank": 4, "target_modules": ["nope"]})))
            .await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert_eq!(v["error"]["param"], "target_modules", "{v}");
    let (status, v) =
        call(&app, post("/v1/training/clients", json!({"rank": 4, "adapter": "../x"}))).await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert_eq!(v["error"]["param"], "adapter", "{v}");
    let (status, v) = call(
        &app,
        post(
            &format!("/v1/training/clients/{id}/sample"),
            json!({"prompt": "Hi", "n": 64, "max_tokens": 2000}),
        ),
    )
    .await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert_eq!(v["error"]["param"], "n", "{v}");
    // At most 16 clients (one exists, one more below).
    for _ in 0..14 {
        assert_eq!(
            call(&app, post("/v1/training/clients", json!({"rank": 1}))).await.0,
            StatusCode::OK
        );
    }
    // From a served adapter: its own config and weights; serving goes on.
    let (status, v) =
        call(&app, post("/v1/training/clients", json!({"from_adapter": "qa-r8"}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["rank"], 8);
    let (status, v) = call(&app, post("/v1/training/clients", json!({"rank": 1}))).await;
    assert_error(status, &v, StatusCode::CONFLICT, "invalid_request_error");
    assert_eq!(v["error"]["code"], "too_many_training_clients");
    let (status, _) =
        call(&app, post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2}))).await;
    assert_eq!(status, StatusCode::OK);
}
