//! A fault in one sequence fails that sequence only. On the real model, 8 sequences on 8
//! different adapter mixes (greedy and sampled rows, log-probabilities on some) run in one
//! batch, one of them poisoned: by each trigger a hostile client found (a temperature or
//! `top_p` that underflows f32, an adapter whose coefficient overflows f32) and by every kind
//! of injected fault (a NaN row, an error or a panic while choosing its token, a forward that
//! fails or panics whenever it is in the batch, a forward that fails once). The poisoned
//! sequence gets its error (or, for the transient fault, its clean tokens); the 7 others get
//! exactly the tokens of a clean run; the KV pool returns to full. Through HTTP: an injected
//! fault in one of 8 concurrent streams ends that stream with an OpenAI-shaped error event.

mod common;

use actix_web::test as atest;
use candle_core::Device;
use common::http::{app, ctx_with_config, post};
use common::*;
use loraplex::adapters::synth::random_adapter;
use loraplex::adapters::{load_adapter, AdapterMix, LoraAdapter, MixEntry};
use loraplex::engine::kv_pool::KvPool;
use loraplex::engine::sequence::Sequence;
use loraplex::engine::{
    Batcher, FaultInjection, FaultKind, LoraPath, Request, SequenceError, TokenEvent,
};
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::sampling::SamplingParams;
use loraplex::model::WeightFormat;
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

const POISONED: usize = 3;

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        load_model(real_model_path().to_str().unwrap(), WeightFormat::Packed, &Device::Cpu).unwrap()
    })
}

fn shared_adapter(m: &LoadedModel, name: &str) -> Arc<LoraAdapter> {
    Arc::new(
        load_adapter(&shared_dir().join("adapters").join(name), name, &m.model.cfg, &Device::Cpu)
            .unwrap(),
    )
}

fn synthetic(m: &LoadedModel, name: &str, seed: u64) -> Arc<LoraAdapter> {
    Arc::new(
        random_adapter(
            name,
            &m.model.cfg,
            8,
            &["q_proj", "v_proj", "down_proj"],
            seed,
            &Device::Cpu,
        )
        .unwrap(),
    )
}

/// Eight different mixes: the three reference adapters, four synthetic ones and a two-adapter mix.
fn mixes(m: &LoadedModel) -> Vec<AdapterMix> {
    let (qa, all, rs) =
        (shared_adapter(m, "qa-r8"), shared_adapter(m, "all-r16"), shared_adapter(m, "rslora-r4"));
    let mut out = vec![
        AdapterMix::single(qa.clone(), 1.0),
        AdapterMix::single(all.clone(), 1.0),
        AdapterMix::single(rs, 0.8),
    ];
    out.extend(
        (0..4).map(|i| AdapterMix::single(synthetic(m, &format!("synth-{i}"), 100 + i), 0.5)),
    );
    out.push(AdapterMix::new(vec![
        MixEntry { adapter: qa, scale: 0.6 },
        MixEntry { adapter: all, scale: 0.4 },
    ]));
    out
}

/// The batch: row `i` on mix `i`; odd rows sample (seeded), every third asks for log-probabilities.
fn batch(m: &LoadedModel) -> Vec<Request> {
    mixes(m)
        .into_iter()
        .enumerate()
        .map(|(i, mix)| {
            let prompt = format!(
                "Story {i}: the lighthouse keeper counted {} ships before the storm, and then",
                3 + 5 * i
            );
            let mut r = Request::greedy(m.tokenizer.encode(&prompt).unwrap(), mix, 12);
            r.stop_at_eos = false;
            if i % 2 == 1 {
                r.sampling = SamplingParams {
                    temperature: 0.9,
                    top_p: 0.95,
                    top_k: Some(40),
                    min_p: 0.0,
                    seed: 7 + i as u64,
                };
            }
            r.logprobs = (i % 3 == 0).then_some(2);
            r
        })
        .collect()
}

/// What one sequence ended with.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    error: Option<SequenceError>,
}

struct Run {
    outcomes: Vec<Outcome>,
    failed_steps: usize,
}

/// Runs `reqs` on one batcher (prefix cache on, 16-token chunks so prompts take several
/// steps), checks that every block comes back, and returns each sequence's outcome.
fn run(m: &LoadedModel, reqs: &[Request], faults: Option<FaultInjection>) -> Run {
    let pool =
        KvPool::new(4096, m.model.cfg.num_layers, m.model.kv_width(), m.model.host_kv(), true);
    let mut b = Batcher::with_pool(&m.model, &m.tokenizer, LoraPath::Batched, pool);
    b.prefill_chunk = 64;
    b.faults = faults.map(Arc::new);
    let mut rxs = Vec::new();
    for r in reqs {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = b.fresh_id();
        b.add(Sequence::new(id, r.clone(), b.num_layers(), tx));
        rxs.push(rx);
    }
    let mut failed_steps = 0;
    for _ in 0..500 {
        if b.is_empty() {
            break;
        }
        failed_steps += b.step().step_failed as usize;
    }
    assert!(b.is_empty(), "the batch never finished");
    assert_eq!(b.pool.used(), 0, "blocks still held by sequences");
    b.pool.clear_cache();
    assert_eq!(b.pool.live(), 0, "blocks leaked");
    let outcomes = rxs
        .into_iter()
        .map(|mut rx| {
            let mut o = Outcome { ids: vec![], logprobs: vec![], error: None };
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    TokenEvent::Token { id, logprob, .. } => {
                        o.ids.push(id);
                        o.logprobs.push(logprob);
                    }
                    TokenEvent::Done { .. } | TokenEvent::Prompt(_) => {}
                    TokenEvent::Error(e) => o.error = Some(e),
                }
            }
            o
        })
        .collect();
    Run { outcomes, failed_steps }
}

fn clean() -> &'static Vec<Outcome> {
    static C: OnceLock<Vec<Outcome>> = OnceLock::new();
    C.get_or_init(|| {
        let out = run(model(), &batch(model()), None).outcomes;
        assert!(out.iter().all(|o| o.error.is_none() && o.ids.len() == 12), "{out:?}");
        out
    })
}

/// The 7 neighbours of the poisoned row kept exactly their clean tokens and log-probabilities.
fn assert_neighbours_clean(got: &[Outcome], what: &str) {
    for (i, (g, c)) in got.iter().zip(clean()).enumerate().filter(|(i, _)| *i != POISONED) {
        assert_eq!(g, c, "{what}: row {i} changed");
    }
}

/// A marker only the poisoned row's prompt contains.
fn marker(m: &LoadedModel, reqs: &[Request]) -> Vec<u32> {
    let mark = reqs[POISONED].prompt_ids[..4].to_vec();
    assert!(
        reqs.iter()
            .enumerate()
            .all(|(i, r)| i == POISONED || !r.prompt_ids.windows(4).any(|w| w == mark.as_slice())),
        "marker not unique"
    );
    let _ = m;
    mark
}

/// What the poisoned row's error must satisfy.
type Expected = fn(&SequenceError) -> bool;

#[test]
fn an_injected_fault_in_one_row_fails_that_sequence_only() {
    let m = model();
    let reqs = batch(m);
    let mark = marker(m, &reqs);
    let cases: [(FaultKind, Expected); 5] = [
        (FaultKind::RowNan, |e| *e == SequenceError::NonFinite { with_adapters: true }),
        (FaultKind::RowError, |e| *e == SequenceError::Injected),
        (
            FaultKind::RowPanic,
            |e| matches!(e, SequenceError::Panic(msg) if msg.contains("injected row panic")),
        ),
        (
            FaultKind::StepError,
            |e| matches!(e, SequenceError::StepFailed(msg) if msg.contains("injected step fault")),
        ),
        (
            FaultKind::StepPanic,
            |e| matches!(e, SequenceError::StepFailed(msg) if msg.contains("injected step panic")),
        ),
    ];
    for (kind, expected) in cases {
        let got = run(m, &reqs, Some(FaultInjection::new(mark.clone(), kind)));
        let what = format!("{kind:?}");
        let err = got.outcomes[POISONED]
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: the poisoned row did not fail"));
        assert!(expected(err), "{what}: unexpected error {err:?}");
        assert_neighbours_clean(&got.outcomes, &what);
        let step_fault = matches!(kind, FaultKind::StepError | FaultKind::StepPanic);
        // A step fault fails the first step holding the row, then its probation step: twice.
        assert_eq!(got.failed_steps, if step_fault { 2 } else { 0 }, "{what}");
    }
}

#[test]
fn a_transient_step_fault_loses_nobody() {
    let m = model();
    let reqs = batch(m);
    let got = run(m, &reqs, Some(FaultInjection::new(marker(m, &reqs), FaultKind::StepOnce)));
    assert_eq!(got.failed_steps, 1);
    assert_eq!(
        &got.outcomes,
        clean(),
        "every sequence, the marked one included, recomputed to its clean tokens"
    );
}

#[test]
fn sampling_numbers_that_underflow_f32_fail_only_their_row() {
    let m = model();
    // The edge refuses these (422); the engine must survive them anyway.
    let tiny_temperature =
        SamplingParams { temperature: 1e-40, top_p: 1.0, top_k: None, min_p: 0.0, seed: 1 };
    let tiny_top_p =
        SamplingParams { temperature: 1.0, top_p: 1e-300, top_k: None, min_p: 0.0, seed: 1 };
    for (what, sampling) in [("temperature 1e-40", tiny_temperature), ("top_p 1e-300", tiny_top_p)]
    {
        let mut reqs = batch(m);
        reqs[POISONED].sampling = sampling;
        let got = run(m, &reqs, None);
        assert!(
            matches!(got.outcomes[POISONED].error, Some(SequenceError::Token(_))),
            "{what}: {:?}",
            got.outcomes[POISONED]
        );
        assert_neighbours_clean(&got.outcomes, what);
    }
}

#[test]
fn an_adapter_whose_coefficient_overflows_f32_fails_only_its_row() {
    let m = model();
    let mut reqs = batch(m);
    // `lora_alpha` 1e300 is finite as f64 and infinite as f32 (the loader now refuses it; a
    // hand-built adapter still reaches the engine).
    let mut bad =
        random_adapter("overflow", &m.model.cfg, 8, &["q_proj", "v_proj"], 9, &Device::Cpu)
            .unwrap();
    bad.modules.iter_mut().flatten().for_each(|w| w.scaling = 1e300 / 8.0);
    reqs[POISONED].mix = AdapterMix::single(Arc::new(bad), 1.0);
    let got = run(m, &reqs, None);
    assert_eq!(
        got.outcomes[POISONED].error,
        Some(SequenceError::NonFinite { with_adapters: true })
    );
    assert_neighbours_clean(&got.outcomes, "overflowing adapter");
}

/// Reads an SSE body: the texts of each choice's chunks, and the error event if any.
fn read_stream(body: &str) -> (String, Option<Value>) {
    let (mut text, mut error) = (String::new(), None);
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(data).unwrap();
        if v.get("error").is_some() {
            error = Some(v);
        } else if let Some(t) = v["choices"][0]["text"].as_str() {
            text.push_str(t);
        }
    }
    (text, error)
}

#[actix_web::test]
async fn an_injected_fault_ends_one_of_eight_concurrent_streams_with_an_error_event() {
    let mark_text = " Zanzibar-quokka";
    let tok = &model().tokenizer;
    let marker = tok.encode(mark_text).unwrap();
    let ctx = ctx_with_config(
        |_| {},
        |cfg| cfg.engine.faults = Some(Arc::new(FaultInjection::new(marker, FaultKind::RowNan))),
    );
    let app = app(&ctx).await;
    let names = ["qa-r8", "all-r16", "rslora-r4"];
    let body = |i: usize, poisoned: bool| {
        let prompt = format!(
            "Note {i}:{} the river rose by {} inches overnight, so",
            if poisoned { mark_text } else { "" },
            2 + i
        );
        json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": true, "ignore_eos": true,
               "adapters": [{"name": names[i % 3], "scale": 0.5 + 0.1 * i as f64}]})
    };
    let call = |b: Value| {
        let app = &app;
        async move {
            let resp = atest::call_service(app, post("/v1/completions", b).to_request()).await;
            assert_eq!(resp.status(), 200);
            String::from_utf8(atest::read_body(resp).await.to_vec()).unwrap()
        }
    };
    let alone: Vec<String> =
        futures_util::future::join_all((0..8).map(|i| call(body(i, false)))).await;
    let together =
        futures_util::future::join_all((0..8).map(|i| call(body(i, i == POISONED)))).await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        let ((clean_text, clean_err), (text, err)) = (read_stream(a), read_stream(t));
        assert!(clean_err.is_none(), "{a}");
        if i == POISONED {
            let e = err.unwrap_or_else(|| panic!("no error event: {t}"));
            assert_eq!(e["error"]["code"], "non_finite_output", "{e}");
            assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
            assert!(t.trim_end().ends_with("data: [DONE]"), "{t}");
        } else {
            assert!(err.is_none(), "stream {i} failed: {t}");
            assert_eq!(text, clean_text, "stream {i} changed");
        }
    }
    // The engine publishes its pool state after the step that retired the last sequence.
    let st = ctx.state.backend().unwrap().engine.stats();
    let used = || {
        st.kv_blocks_used.load(std::sync::atomic::Ordering::SeqCst)
            + st.running.load(std::sync::atomic::Ordering::SeqCst)
    };
    for _ in 0..100 {
        if used() == 0 {
            break;
        }
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(used(), 0, "blocks or sequences still held");
}

/// Writes synthetic adapter `name` for the real model into `root`; `a_factor` scales its `A`.
fn write_synthetic(root: &std::path::Path, name: &str, seed: u64, a_factor: f64) {
    let m = model();
    let a =
        random_adapter(name, &m.model.cfg, 8, &["q_proj", "v_proj"], seed, &Device::Cpu).unwrap();
    let weights: Vec<_> = loraplex::model::ModuleId::all(m.model.cfg.num_layers)
        .filter_map(|id| a.module(id).map(|w| (id, (&w.a * a_factor).unwrap(), w.b.clone())))
        .collect();
    let config = loraplex::adapters::synth::random_config(8, &["q_proj", "v_proj"]).unwrap();
    loraplex::adapters::writer::save_adapter(&root.join(name), &config, &weights).unwrap();
}

/// Streams `body` to `port` and returns the status and the SSE (or JSON) text.
fn stream(port: u16, body: Value) -> (u16, String) {
    common::server::http(port, "POST", "/v1/completions", Some(&body))
}

#[test]
fn on_a_real_server_each_poisoned_request_fails_alone_among_eight_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut names: Vec<String> =
        ["qa-r8", "all-r16", "rslora-r4"].iter().map(|n| n.to_string()).collect();
    for n in &names {
        copy_adapter(&shared_dir().join("adapters").join(n), &dir.path().join(n));
    }
    for i in 0..4 {
        write_synthetic(dir.path(), &format!("synth-{i}"), 200 + i, 1.0);
        names.push(format!("synth-{i}"));
    }
    // Finite weights whose product overflows f32: every check at load passes, the row's
    // logits come out NaN.
    write_synthetic(dir.path(), "overflow", 300, 1e38);
    // `lora_alpha` 1e300: finite as f64, infinite as f32; refused when loaded.
    copy_adapter(&shared_dir().join("adapters/qa-r8"), &dir.path().join("alpha-1e300"));
    let cfg_path = dir.path().join("alpha-1e300/adapter_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = json!(1e300);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let server = common::server::Server::start(dir.path(), &[]);
    let port = server.port;
    let clean_body = |i: usize| {
        json!({"prompt": format!("Log {i}: the train left the station at {} o'clock and", 4 + i), "max_tokens": 16,
               "temperature": 0, "stream": true, "ignore_eos": true, "model": names[i]})
    };
    let run_clean = || -> Vec<std::thread::JoinHandle<(u16, String)>> {
        (0..7)
            .map(|i| {
                let b = clean_body(i);
                std::thread::spawn(move || stream(port, b))
            })
            .collect()
    };
    let reference: Vec<String> =
        run_clean().into_iter().map(|h| read_stream(&h.join().unwrap().1).0).collect();
    let poison = |extra: Value| {
        let mut b = json!({"prompt": "Log 99: the ferry was late because", "max_tokens": 16, "stream": true, "ignore_eos": true});
        extra.as_object().unwrap().iter().for_each(|(k, v)| b[k] = v.clone());
        b
    };
    let cases = [
        (
            "an adapter whose product overflows",
            poison(json!({"model": "overflow", "temperature": 0})),
            200,
            "non_finite_output",
        ),
        ("temperature 1e-40", poison(json!({"temperature": 1e-40})), 422, ""),
        ("top_p 1e-300", poison(json!({"temperature": 1, "top_p": 1e-300})), 422, ""),
        ("lora_alpha 1e300", poison(json!({"model": "alpha-1e300"})), 422, "adapter_load_failed"),
    ];
    for (what, body, status, code) in cases {
        let clean = run_clean();
        let (s, text) = stream(port, body);
        assert_eq!(s, status, "{what}: {text}");
        let err = if s == 200 {
            read_stream(&text).1.unwrap_or_else(|| panic!("{what}: no error event: {text}"))
        } else {
            serde_json::from_str(&text).unwrap()
        };
        assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {err}");
        if !code.is_empty() {
            assert_eq!(err["error"]["code"], code, "{what}: {err}");
        }
        for (i, h) in clean.into_iter().enumerate() {
            let (s, t) = h.join().unwrap();
            let (text, e) = read_stream(&t);
            assert!(s == 200 && e.is_none(), "{what}: stream {i} failed: {t}");
            assert_eq!(text, reference[i], "{what}: stream {i} changed");
        }
    }
    // The pool is back to full: no block held by a sequence once the last step retired them.
    let used = || {
        common::server::get(port, "/metrics")
            .1
            .lines()
            .find(|l| l.starts_with("loraplex_kv_cache_blocks{state=\"used\"}"))
            .map(str::to_string)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while used().as_deref() != Some("loraplex_kv_cache_blocks{state=\"used\"} 0")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(used().as_deref(), Some("loraplex_kv_cache_blocks{state=\"used\"} 0"));
    let faults = common::server::get(port, "/metrics").1;
    assert!(
        faults.contains("loraplex_engine_faults_total{scope=\"sequence\"} 1"),
        "the overflowing adapter's row is counted"
    );
}
