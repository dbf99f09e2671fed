//! Named mixes on the real model, through the in-process service: a mix from `mixes.toml` and
//! one from the `mix` option are listed in `/v1/models` with their parent, answer as `model`
//! exactly as the same adapters written out in `adapters` do, a changed definition is a new
//! version that takes effect while serving, a broken one is refused by name, and the gateway
//! gauges list a resident mix.

mod common;

use common::http::{app, assert_error, call, ctx_with, post};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn completion(model: &str, adapters: Value) -> Value {
    json!({"model": model, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
           "ignore_eos": true, "logprobs": 1, "adapters": adapters})
}

/// The generated text and its token log-probabilities.
fn output(body: &Value) -> (String, Vec<f64>) {
    let c = &body["choices"][0];
    let lp = c["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (c["text"].as_str().unwrap().to_string(), lp)
}

fn model_entry<'a>(models: &'a Value, id: &str) -> Option<&'a Value> {
    models["data"].as_array().unwrap().iter().find(|m| m["id"] == id)
}

#[actix_web::test]
async fn a_named_mix_is_a_model_that_computes_its_adapters() {
    let c = ctx_with(|o| {
        o.mix = Some(vec!["half-qa=qa-r8:0.5".into()]);
        o.gateway_metrics = Some(true);
    });
    std::fs::write(
        c.dir.path().join("mixes.toml"),
        "blend = \"qa-r8:0.7, all-r16:0.3\"\nbroken = \"qa-r8:lots\"\n",
    )
    .unwrap();
    let registry = &c.state.backend().unwrap().registry;
    registry.rescan();
    let app = app(&c).await;

    let (status, models) = call(&app, actix_web::test::TestRequest::get().uri("/v1/models")).await;
    assert_eq!(status, 200);
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let blend = model_entry(&models, "blend").expect("blend listed");
    assert_eq!(blend["parent"], base.as_str());
    assert_eq!(blend["loraplex"]["kind"], "mix");
    assert_eq!(
        (blend["loraplex"]["version"].as_u64(), blend["loraplex"]["source"].as_str()),
        (Some(1), Some("file"))
    );
    assert_eq!(
        blend["loraplex"]["adapters"],
        json!([{"name": "qa-r8", "scale": 0.7}, {"name": "all-r16", "scale": 0.3}])
    );
    assert_eq!(model_entry(&models, "half-qa").unwrap()["loraplex"]["source"], "config");
    assert_eq!(model_entry(&models, "broken").unwrap()["loraplex"]["state"], "failed");

    // The mix as `model` = its adapters written out, bit for bit; and not the base.
    let (s1, by_name) = call(&app, post("/v1/completions", completion("blend", json!(null)))).await;
    assert_eq!(s1, 200, "{by_name}");
    let explicit = json!([{"name": "qa-r8", "scale": 0.7}, {"name": "all-r16", "scale": 0.3}]);
    let (_, by_list) = call(&app, post("/v1/completions", completion(&base, explicit))).await;
    assert_eq!(output(&by_name), output(&by_list));
    assert_eq!(by_name["model"], "blend");
    assert_eq!(
        by_name["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["qa-r8", "all-r16"]
    );
    let (_, plain) = call(&app, post("/v1/completions", completion(&base, json!(null)))).await;
    assert_ne!(output(&by_name).1, output(&plain).1);
    let (_, half) = call(&app, post("/v1/completions", completion("half-qa", json!(null)))).await;
    let (_, half_list) = call(
        &app,
        post("/v1/completions", completion(&base, json!([{"name": "qa-r8", "scale": 0.5}]))),
    )
    .await;
    assert_eq!(output(&half), output(&half_list));

    // Resident: the mix is listed beside its adapters for the endpoint picker's affinity.
    let scrape = call(&app, actix_web::test::TestRequest::get().uri("/metrics")).await.1;
    let scrape = scrape.as_str().unwrap();
    let info = scrape.lines().find(|l| l.starts_with("vllm:lora_requests_info{")).unwrap();
    assert!(info.contains("running_lora_adapters=\"all-r16,blend,half-qa,qa-r8\""), "{info}");
    let cache = scrape.lines().find(|l| l.starts_with("vllm:cache_config_info{")).unwrap();
    assert!(
        cache.contains("block_size=\"16\"")
            && cache.contains("enable_prefix_caching=\"true\"")
            && cache.ends_with(" 1"),
        "{cache}"
    );

    // A new definition is version 2 and serves at once; requests compute the new mix.
    std::fs::write(
        c.dir.path().join("mixes.toml"),
        "blend = \"qa-r8:0.2,all-r16:0.8\"\nbroken = \"qa-r8:lots\"\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The watcher rescans on the file event (or the 200 ms periodic rescan).
        if registry.mixes().get("blend").is_some_and(|m| m.version == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "the changed mix was not picked up");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, v2) = call(&app, post("/v1/completions", completion("blend", json!(null)))).await;
    let (_, v2_list) = call(
        &app,
        post(
            "/v1/completions",
            completion(
                &base,
                json!([{"name": "qa-r8", "scale": 0.2}, {"name": "all-r16", "scale": 0.8}]),
            ),
        ),
    )
    .await;
    assert_eq!(output(&v2), output(&v2_list));
    assert_ne!(output(&v2).1, output(&by_name).1);

    // Refused by name: a broken mix, and a mix plus one of its own adapters again.
    let (s, body) = call(&app, post("/v1/completions", completion("broken", json!(null)))).await;
    assert_error(
        s,
        &body,
        actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request_error",
    );
    assert_eq!(
        (body["error"]["param"].as_str(), body["error"]["code"].as_str()),
        (Some("model"), Some("mix_unavailable"))
    );
    assert!(body["error"]["message"].as_str().unwrap().contains("not a number"), "{body}");
    let (s, body) =
        call(&app, post("/v1/completions", completion("blend", json!([{"name": "qa-r8"}])))).await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (422, Some("duplicate_adapter")),
        "{body}"
    );
}

#[actix_web::test]
async fn a_mix_never_shadows_an_adapter_of_the_same_name() {
    // One mix named like an adapter folder in `mixes.toml`, one in the `mix` option.
    let c = ctx_with(|o| o.mix = Some(vec!["all-r16=qa-r8:0.5".into()]));
    std::fs::write(c.dir.path().join("mixes.toml"), "qa-r8 = \"all-r16:0.3\"\n").unwrap();
    c.state.backend().unwrap().registry.rescan();
    let app = app(&c).await;
    let base = call(&app, actix_web::test::TestRequest::get().uri("/v1/models")).await.1["data"][0]
        ["id"]
        .as_str()
        .unwrap()
        .to_string();
    for name in ["qa-r8", "all-r16"] {
        let (s, by_name) = call(&app, post("/v1/completions", completion(name, json!(null)))).await;
        assert_eq!(s, 200, "{name}: {by_name}");
        assert_eq!(
            by_name["adapters"],
            json!([{"name": name, "version": 1, "scale": 1.0}]),
            "{name} is the adapter"
        );
        let (_, adapter) =
            call(&app, post("/v1/completions", completion(&base, json!([{"name": name}])))).await;
        assert_eq!(output(&by_name), output(&adapter), "{name}");
    }
    // Both mixes are listed as refused, with the reason.
    let models = call(&app, actix_web::test::TestRequest::get().uri("/v1/models")).await.1;
    for name in ["qa-r8", "all-r16"] {
        let listed: Vec<&Value> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["id"] == name && m["loraplex"]["kind"] == "mix")
            .collect();
        assert_eq!(listed.len(), 1, "{name}: {models}");
        assert_eq!(listed[0]["loraplex"]["state"], "failed");
        assert!(
            listed[0]["loraplex"]["error"].as_str().unwrap().contains("taken"),
            "{}",
            listed[0]
        );
    }
}
