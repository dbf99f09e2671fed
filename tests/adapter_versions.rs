//! Versioned adapters: `name@N` wherever a name is accepted, the last K versions of a name
//! resident, adapter weights uploaded and downloaded over HTTP byte for byte, a reload during
//! streaming requests that each finish on the version they started with, and no prefix-cache
//! reuse across versions.

mod common;

use actix_web::http::StatusCode;
use actix_web::test as atest;
use candle_core::Device;
use common::http::{app, assert_error, call, ctx_with, post};
use common::*;
use loraplex::adapters::registry::{Registry, RegistryError};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

#[test]
fn versions_are_addressable_and_the_last_k_stay_resident() {
    let (model, cfg) = tiny();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    let lora = lora_config(2, 4.0, &["q_proj", "v_proj"]);
    write_random_adapter(&dir, &cfg, &lora, 1);
    // Replicas sharing the folder archive apart: another host's archive stays, a dead process's
    // on this host goes.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    let other = root.path().join(".versions/elsewhere-1/a/1");
    let dead = root.path().join(format!(".versions/{host}-4000000000/a/1"));
    for d in [&other, &dead] {
        std::fs::create_dir_all(d).unwrap();
    }
    let reg =
        Registry::new(root.path(), cfg.clone(), Some(model.projections()), Device::Cpu, 1 << 30)
            .unwrap()
            .with_versions_kept(2);
    assert!(other.exists() && !dead.exists());
    let v1 = reg.acquire("a").unwrap();
    assert_eq!(v1.version, 1);
    let v1_weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();

    // Files change (the fingerprint needs a new size or time): version 2.
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_random_adapter(&dir, &cfg, &lora_config(4, 4.0, &["q_proj", "v_proj"]), 2);
    reg.rescan();
    let v2 = reg.acquire("a").unwrap();
    assert_eq!(v2.version, 2);
    let again = reg.acquire("a@1").unwrap();
    assert!(Arc::ptr_eq(&again, &v1), "a@1 is the resident version 1");
    assert!(Arc::ptr_eq(&reg.acquire("a@2").unwrap(), &v2));
    assert_eq!(reg.info("a").unwrap().versions, vec![1, 2]);
    // Version 1's files, as they were loaded, though the folder now holds version 2's.
    let (v, p) = reg.version_file("a@1", "adapter_model.safetensors").unwrap();
    assert_eq!((v, std::fs::read(p).unwrap()), (1, v1_weights));

    // K = 2: version 3 pushes version 1 out.
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_random_adapter(&dir, &cfg, &lora_config(8, 4.0, &["q_proj"]), 3);
    reg.rescan();
    assert_eq!(reg.acquire("a").unwrap().version, 3);
    match reg.acquire("a@1") {
        Err(RegistryError::VersionNotFound { version: 1, resident, .. }) => {
            assert_eq!(resident, vec![2, 3])
        }
        other => panic!("a@1 after two newer versions: {other:?}"),
    }
    assert!(reg.version_file("a@1", "adapter_config.json").is_err());
    assert!(matches!(reg.acquire("a@9"), Err(RegistryError::VersionNotFound { version: 9, .. })));
    assert!(matches!(reg.acquire("b@1"), Err(RegistryError::NotFound(_))));
    for bad in ["a@0", "a@x", "a@", "a@+2", "@1"] {
        assert!(matches!(reg.acquire(bad), Err(RegistryError::InvalidName(_))), "{bad}");
    }
    drop(v1);
    drop(again);
}

/// `adapter_model.safetensors` of `dir` with its `adapter_config.json` in the header's
/// metadata: the upload body.
fn upload_body(dir: &Path) -> (Vec<u8>, String) {
    let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().collect();
    let meta = HashMap::from([("adapter_config".to_string(), config.clone())]);
    (safetensors::serialize(tensors, Some(meta)).unwrap(), config)
}

fn put(name: &str, body: Vec<u8>) -> atest::TestRequest {
    atest::TestRequest::put()
        .uri(&format!("/v1/adapters/{name}"))
        .insert_header(("content-type", "application/octet-stream"))
        .set_payload(body)
}

async fn raw(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
    path: &str,
) -> (StatusCode, Vec<u8>) {
    let resp = atest::call_service(app, atest::TestRequest::get().uri(path).to_request()).await;
    (resp.status(), atest::read_body(resp).await.to_vec())
}

fn completion(model: &str, prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true, "stream": stream})
}

const PROMPT: &str =
    "Context: The Eiffel Tower is in Paris.\nQuestion: Where is the Eiffel Tower?\nAnswer:";

/// The text of an SSE completion stream and the adapters its chunks report.
fn stream_text(body: &[u8]) -> (String, Vec<u64>) {
    let body = String::from_utf8(body.to_vec()).unwrap();
    let mut text = String::new();
    let mut versions = Vec::new();
    for e in body.split("\n\n").filter(|e| e.starts_with("data: {")) {
        let v: Value = serde_json::from_str(&e[6..]).unwrap();
        if let Some(t) = v["choices"][0]["text"].as_str() {
            text.push_str(t);
        }
        if let Some(a) = v["adapters"].as_array() {
            versions.extend(a.iter().map(|a| a["version"].as_u64().unwrap()));
        }
    }
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    (text, versions)
}

/// Upload → serve → download byte for byte; `name@N` after a new upload still serves version
/// N's text; bad uploads refused by name with nothing changed.
#[actix_web::test]
async fn weights_over_http_round_trip_and_versions_serve() {
    let c = ctx_with(|o| o.adapter_versions = Some(3));
    let app = app(&c).await;
    let shared = shared_dir().join("adapters");
    let (body, config) = upload_body(&shared.join("qa-r8"));
    let resp = call(&app, put("up", body.clone())).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    assert_eq!(resp.1["version"], 1);
    assert_eq!(resp.1["versions"], json!([1]));
    let (status, weights) = raw(&app, "/v1/adapters/up/files/adapter_model.safetensors").await;
    assert_eq!(status, StatusCode::OK);
    assert!(weights == body, "the weights come back byte for byte");
    let (status, cfg) = raw(&app, "/v1/adapters/up@1/files/adapter_config.json").await;
    assert_eq!((status, String::from_utf8(cfg).unwrap()), (StatusCode::OK, config));

    let (status, v1) =
        call(&app, post("/v1/completions", completion("up", PROMPT, 12, false))).await;
    assert_eq!(status, StatusCode::OK, "{v1}");
    assert_eq!(v1["adapters"], json!([{"name": "up", "version": 1, "scale": 1.0}]));

    let (body2, _) = upload_body(&shared.join("all-r16"));
    let resp = call(&app, put("up", body2)).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    assert_eq!(resp.1["version"], 2);
    let (_, v2) = call(&app, post("/v1/completions", completion("up", PROMPT, 12, false))).await;
    assert_eq!(v2["adapters"][0]["version"], 2);
    assert_ne!(v2["choices"][0]["text"], v1["choices"][0]["text"], "a new version serves");
    let (_, old) = call(&app, post("/v1/completions", completion("up@1", PROMPT, 12, false))).await;
    assert_eq!(old["adapters"][0]["version"], 1, "{old}");
    assert_eq!(old["choices"][0]["text"], v1["choices"][0]["text"]);
    // In a mix too, beside the current version.
    let mix = json!({"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                     "adapters": [{"name": "up@1", "scale": 0.5}, {"name": "up", "scale": 0.5}]});
    let (status, v) = call(&app, post("/v1/completions", mix)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["adapters"][0]["version"], 1);
    assert_eq!(v["adapters"][1]["version"], 2);
    // A named mix may pin a version.
    let (status, v) = call(
        &app,
        post("/v1/mixes", json!({"name": "pinned", "adapters": [{"name": "up@1", "scale": 1.0}]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut served = Value::Null;
    for _ in 0..50 {
        // The mixes file is reread by the registry's next rescan.
        let (status, v) =
            call(&app, post("/v1/completions", completion("pinned", PROMPT, 12, false))).await;
        if status == StatusCode::OK {
            served = v;
            break;
        }
        actix_web::rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(served["adapters"][0]["version"], 1, "{served}");
    assert_eq!(served["choices"][0]["text"], v1["choices"][0]["text"]);
    let (_, w1) = raw(&app, "/v1/adapters/up@1/files/adapter_model.safetensors").await;
    assert!(w1 == body, "version 1's weights after version 2 arrived");

    let (status, v) =
        call(&app, post("/v1/completions", completion("up@7", PROMPT, 4, false))).await;
    assert_error(status, &v, StatusCode::NOT_FOUND, "invalid_request_error");
    assert_eq!(v["error"]["code"], "adapter_version_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("no version 7"), "{v}");

    // Refusals: nothing written, the adapter unchanged.
    let (status, v) = call(&app, put("up", b"not safetensors".to_vec())).await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("not a safetensors file"), "{v}");
    let plain = std::fs::read(shared.join("qa-r8/adapter_model.safetensors")).unwrap();
    let (status, v) = call(&app, put("up", plain)).await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("adapter_config"), "{v}");
    let (bad, _) = {
        let tmp = tempfile::tempdir().unwrap();
        copy_adapter(&shared.join("qa-r8"), tmp.path());
        let mut cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        cfg["r"] = 4.into();
        std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        upload_body(tmp.path())
    };
    let (status, v) = call(&app, put("up", bad)).await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert_eq!(v["error"]["code"], "invalid_adapter");
    assert!(v["error"]["message"].as_str().unwrap().contains("shape"), "{v}");
    let resp = call(&app, atest::TestRequest::put().uri("/v1/adapters/up").set_payload("x")).await;
    assert_eq!(resp.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _) = raw(&app, "/v1/adapters/up/files/secrets.txt").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, now) = call(&app, post("/v1/completions", completion("up", PROMPT, 12, false))).await;
    assert_eq!(now["adapters"][0]["version"], 2);
    assert_eq!(now["choices"][0]["text"], v2["choices"][0]["text"]);
}

fn hits(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("loraplex_prefix_cache_hits_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A reload while 8 streams run: each finishes on the tokens of the version it started with;
/// a prompt cached under version N is recomputed under N + 1.
#[actix_web::test]
async fn a_reload_never_changes_running_streams_or_reuses_their_cache() {
    let c = ctx_with(|_| {});
    let app = app(&c).await;
    let shared = shared_dir().join("adapters");
    let (b1, _) = upload_body(&shared.join("qa-r8"));
    assert_eq!(call(&app, put("live", b1)).await.0, StatusCode::OK);
    let (_, want) =
        call(&app, post("/v1/completions", completion("live", PROMPT, 48, false))).await;
    let want = want["choices"][0]["text"].as_str().unwrap().to_string();

    let (b2, _) = upload_body(&shared.join("all-r16"));
    let streams = (0..8).map(|_| async {
        let req = post("/v1/completions", completion("live", PROMPT, 48, true));
        let resp = atest::call_service(&app, req.to_request()).await;
        let body = atest::read_body(resp).await;
        (stream_text(&body), std::time::Instant::now())
    });
    let reload = async {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(120)).await;
        let r = call(&app, put("live", b2)).await;
        (r, std::time::Instant::now())
    };
    let (outs, ((status, info), reloaded)) =
        futures_util::future::join(futures_util::future::join_all(streams), reload).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["version"], 2);
    assert!(outs.iter().any(|(_, end)| *end > reloaded), "no stream was running at the reload");
    for ((text, versions), _) in &outs {
        assert_eq!(text, &want, "a stream changed version mid-way");
        assert!(versions.iter().all(|&v| v == 1), "{versions:?}");
    }
    let (_, after) =
        call(&app, post("/v1/completions", completion("live", PROMPT, 48, false))).await;
    assert_eq!(after["adapters"][0]["version"], 2);
    assert_ne!(after["choices"][0]["text"].as_str().unwrap(), want);

    // The prefix cache: a long prompt twice under version 2 hits; under version 3 it is
    // recomputed (no hit), then cached again.
    let long = PROMPT.repeat(4);
    // The engine publishes its counters after the step that answered: let them land.
    let metrics = || async {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(300)).await;
        let (_, m) = raw(&app, "/metrics").await;
        hits(&String::from_utf8(m).unwrap())
    };
    let run = |model: &str| post("/v1/completions", completion(model, &long, 1, false));
    call(&app, run("live")).await;
    let h0 = metrics().await;
    call(&app, run("live")).await;
    let h1 = metrics().await;
    assert!(h1 > h0, "the same prompt and version hit the cache ({h0} → {h1})");
    let (b3, _) = upload_body(&shared.join("rslora-r4"));
    assert_eq!(call(&app, put("live", b3)).await.1["version"], 3);
    let (_, r3) = call(&app, run("live")).await;
    assert_eq!(r3["adapters"][0]["version"], 3);
    let h2 = metrics().await;
    assert_eq!(h2, h1, "version 3 reused blocks computed with version 2");
    call(&app, run("live")).await;
    assert!(metrics().await > h2);
}
