//! Metrics under known traffic, through the in-process service on the real model: exact
//! counter deltas per adapter and outcome (including a rejected request, a cancelled stream and
//! an evicted-then-reloaded adapter), histogram sample counts, gateway series under load, and
//! `promtool check metrics` on a scrape.

mod common;

use actix_web::body::MessageBody;
use actix_web::test;
use common::http::{app, ctx_with};
use serde_json::json;

/// The value of the series `name{labels}` (labels as written by the encoder, sorted).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_idle(engine: &loraplex::engine::Engine) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !engine.is_idle() {
        assert!(std::time::Instant::now() < deadline, "the engine did not go idle");
        actix_web::rt::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn scrape(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
) -> String {
    let resp = test::call_service(app, test::TestRequest::get().uri("/metrics").to_request()).await;
    assert!(resp.status().is_success());
    String::from_utf8(test::read_body(resp).await.to_vec()).unwrap()
}

#[actix_web::test]
async fn counters_and_histograms_match_known_traffic() {
    // A budget that holds qa-r8 (3.69 MB resident: A, B and their host copies) or rslora-r4
    // (3.00 MB), not both.
    const BUDGET: usize = 4_000_000;
    let c = ctx_with(|o| o.adapter_budget_bytes = Some(BUDGET));
    let (state, app) = (&c.state, app(&c).await);
    let registry = &state.backend().unwrap().registry;
    let size = |name: &str| registry.info(name).and_then(|i| i.size_bytes).unwrap();
    let (qa, rs) = (size("qa-r8"), size("rslora-r4"));
    assert!(
        qa.max(rs) <= BUDGET && qa + rs > BUDGET,
        "the budget no longer forces evictions: {qa} + {rs} bytes"
    );
    let before = scrape(&app).await;
    let complete = |model: &str, n: u64| {
        test::TestRequest::post().uri("/v1/completions").set_json(json!({"model": model, "prompt": "The capital of France is", "max_tokens": n, "temperature": 0, "ignore_eos": true}))
    };
    let engine = &state.backend().unwrap().engine;
    for (model, n) in [("qa-r8", 4), ("rslora-r4", 3), ("qa-r8", 2)] {
        let resp = test::call_service(&app, complete(model, n).to_request()).await;
        assert!(resp.status().is_success());
        assert!(resp.headers().contains_key("x-request-id"));
        // No wait: the engine drops a finished sequence (and its hold on the adapter) before
        // the response is sent, so the next request's eviction succeeds at once.
    }
    let resp = test::call_service(&app, complete("no-such-adapter", 1).to_request()).await;
    assert_eq!(resp.status(), 404);
    // A stream the client abandons after its first chunk.
    let stream = test::TestRequest::post().uri("/v1/completions").set_json(
        json!({"model": "rslora-r4", "prompt": "Once", "max_tokens": 50, "stream": true}),
    );
    let resp = test::call_service(&app, stream.to_request()).await;
    let mut body = resp.into_body();
    let first =
        futures_util::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_next(cx)).await;
    assert!(first.is_some());
    drop(body);
    // The engine retires the abandoned sequence at its next step.
    wait_idle(engine).await;
    // Rejected: the server is draining (base model, so no adapter load is involved).
    engine.drain();
    let base = test::TestRequest::post()
        .uri("/v1/completions")
        .set_json(json!({"prompt": "Hi", "max_tokens": 1}));
    let resp = test::call_service(&app, base.to_request()).await;
    assert_eq!(resp.status(), 503);
    let after = scrape(&app).await;
    let delta = |s: &str| value(&after, s) - value(&before, s);
    let req = |adapter: &str, outcome: &str| {
        delta(&format!("loraplex_requests_total{{adapter=\"{adapter}\",endpoint=\"completions\",outcome=\"{outcome}\"}}"))
    };
    assert_eq!(req("qa-r8", "ok"), 2.0);
    assert_eq!(req("rslora-r4", "ok"), 1.0);
    assert_eq!(req("unknown", "client_error"), 1.0);
    assert_eq!(req("rslora-r4", "cancelled"), 1.0);
    assert_eq!(req("base", "rejected"), 1.0);
    assert_eq!(delta("loraplex_generated_tokens_total{adapter=\"qa-r8\"}"), 6.0);
    assert_eq!(delta("loraplex_prompt_tokens_total{adapter=\"qa-r8\"}"), 10.0);
    assert_eq!(
        delta("loraplex_adapter_loads_total{result=\"ok\"}"),
        4.0,
        "qa-r8, rslora-r4, qa-r8 again, rslora-r4 again"
    );
    assert_eq!(delta("loraplex_adapter_loads_total{result=\"error\"}"), 0.0);
    assert_eq!(delta("loraplex_adapter_evictions_total"), 3.0);
    // One first token per sequence that produced one (3 + the abandoned stream's).
    assert_eq!(delta("loraplex_time_to_first_token_seconds_count"), 4.0);
    assert_eq!(
        delta("loraplex_inter_token_latency_seconds_count"),
        3.0 + 2.0
            + 1.0
            + (value(&after, "loraplex_generated_tokens_total{adapter=\"rslora-r4\"}") - 3.0 - 1.0)
    );
    assert_eq!(delta("loraplex_request_duration_seconds_count{endpoint=\"completions\"}"), 6.0);
    assert_eq!(delta("loraplex_queue_wait_seconds_count"), 4.0);
    assert!(after.contains("loraplex_build_info{"));
    assert!(after.contains("process_resident_memory_bytes"));
    assert_eq!(value(&after, "loraplex_adapter_budget_bytes"), BUDGET as f64);
    let problems = promtool(c.dir.path(), &after);
    assert!(problems.is_empty(), "promtool: {problems:?}");
}

#[actix_web::test]
async fn gateway_series_follow_the_load_and_pass_promtool() {
    let c = ctx_with(|o| {
        o.gateway_metrics = Some(true);
        o.max_batch_size = Some(2);
    });
    let app = app(&c).await;
    let registry = &c.state.backend().unwrap().registry;
    let idle = scrape(&app).await;
    assert_eq!(value(&idle, "vllm:num_requests_running"), 0.0);
    assert_eq!(value(&idle, "vllm:num_requests_waiting"), 0.0);
    let info = |text: &str| {
        text.lines().find(|l| l.starts_with("vllm:lora_requests_info{")).unwrap().to_string()
    };
    assert!(
        info(&idle).contains("running_lora_adapters=\"\""),
        "nothing resident yet: {}",
        info(&idle)
    );
    // Two streams fill the batch (max 2); a third, on another adapter, waits.
    let stream = |model: &str| {
        test::TestRequest::post().uri("/v1/completions").set_json(json!({"model": model, "prompt": "Once", "max_tokens": 200, "stream": true, "ignore_eos": true}))
    };
    let mut bodies = Vec::new();
    for model in ["qa-r8", "qa-r8", "rslora-r4"] {
        let resp = test::call_service(&app, stream(model).to_request()).await;
        assert!(resp.status().is_success());
        bodies.push(resp.into_body());
    }
    // Read the first stream until the engine has published a step with both running and the
    // third in its queue (the second joins at a later step than the first, and the gauges are
    // refreshed once per step, after the engine has taken the third from its channel).
    let mut busy = String::new();
    for _ in 0..50 {
        futures_util::future::poll_fn(|cx| std::pin::Pin::new(&mut bodies[0]).poll_next(cx)).await;
        busy = scrape(&app).await;
        if value(&busy, "vllm:num_requests_running") == 2.0
            && info(&busy).contains("waiting_lora_adapters=\"rslora-r4\"")
        {
            break;
        }
    }
    assert_eq!(value(&busy, "vllm:num_requests_running"), 2.0);
    assert_eq!(value(&busy, "vllm:num_requests_waiting"), 1.0);
    assert_eq!(
        value(&busy, "vllm:num_requests_running"),
        value(&busy, "loraplex_sequences_running")
    );
    let usage = value(&busy, "vllm:kv_cache_usage_perc");
    assert!(usage > 0.0 && usage < 0.01, "two blocks of a pool for 2 × 8192 tokens: {usage}");
    assert_eq!(
        value(&busy, "vllm:gpu_cache_usage_perc"),
        usage,
        "the former name carries the same value"
    );
    assert_eq!(
        usage,
        value(&busy, "loraplex_kv_cache_blocks{state=\"used\"}")
            / value(&busy, "loraplex_kv_cache_blocks{state=\"total\"}")
    );
    assert!(value(&busy, "vllm:prefix_cache_queries_total") >= 1.0);
    assert_eq!(value(&busy, "vllm:num_preemptions_total"), 0.0);
    // Resident adapters (both were loaded on admission), the queued request's model, and how
    // many adapters fit the budget at the largest one's size.
    let largest = ["qa-r8", "rslora-r4", "all-r16"]
        .iter()
        .filter_map(|n| registry.info(n).and_then(|i| i.size_bytes))
        .max()
        .unwrap();
    let max_lora = registry.budget_bytes() / largest;
    let busy_info = info(&busy);
    assert!(busy_info.contains(&format!("max_lora=\"{max_lora}\"")), "{busy_info}");
    assert!(
        busy_info.contains("running_lora_adapters=\"qa-r8,rslora-r4\"")
            && busy_info.contains("waiting_lora_adapters=\"rslora-r4\""),
        "{busy_info}"
    );
    let stamp: f64 = busy_info.rsplit(' ').next().unwrap().parse().unwrap();
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - stamp).abs() < 60.0, "the value is the update time: {stamp} vs {now}");
    let blocks = value(&busy, "loraplex_kv_cache_blocks{state=\"total\"}");
    let cache = busy.lines().find(|l| l.starts_with("vllm:cache_config_info{")).unwrap();
    assert!(
        cache.contains("block_size=\"16\"")
            && cache.contains(&format!("num_gpu_blocks=\"{blocks}\"")),
        "{cache}"
    );
    drop(bodies);
    // The protocol fixes vLLM's names; promtool's only complaint may be their `:` (a naming
    // lint meant for recording rules).
    let problems = promtool(c.dir.path(), &busy);
    assert!(
        problems
            .iter()
            .all(|p| p.starts_with("vllm:") && p.ends_with("metric names should not contain ':'")),
        "{problems:?}"
    );
}

/// The problems `promtool check metrics` reports for a scrape (one per line).
fn promtool(dir: &std::path::Path, scrape: &str) -> Vec<String> {
    let path = dir.join("scrape.txt");
    std::fs::write(&path, scrape).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output();
    let out = out.expect("promtool is installed (Debian package `prometheus`, see .ci/run)");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}
