//! The KV block pool on the real model: preemption under a small pool gives every request the
//! tokens of an unconstrained run; block accounting returns to full whichever way sequences end;
//! prefix-cached outputs equal uncached ones bit for bit (f32 and packed, base, one adapter,
//! a mix); a different mix, scale or adapter version never reuses another's blocks; a request
//! that can never fit gets a 422 and the server keeps serving.

mod common;

use candle_core::Device;
use common::http::{app, assert_error, call, ctx_with, post};
use common::*;
use loraplex::adapters::{load_adapter, AdapterMix, LoraAdapter, MixEntry};
use loraplex::engine::kv_pool::KvPool;
use loraplex::engine::{Batcher, LoraPath, Request};
use loraplex::generate::{generate, run_all, GenOutput};
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::WeightFormat;
use serde_json::json;
use std::sync::Arc;

fn model(format: WeightFormat) -> LoadedModel {
    load_model(real_model_path().to_str().unwrap(), format, &Device::Cpu).unwrap()
}

fn adapter(m: &LoadedModel, name: &str) -> Arc<LoraAdapter> {
    Arc::new(
        load_adapter(&shared_dir().join("adapters").join(name), name, &m.model.cfg, &Device::Cpu)
            .unwrap(),
    )
}

fn pool(m: &LoadedModel, blocks: usize, prefix_cache: bool) -> KvPool {
    KvPool::new(blocks, m.model.cfg.num_layers, m.model.kv_width(), m.model.host_kv(), prefix_cache)
}

fn request(m: &LoadedModel, text: &str, mix: AdapterMix, max_tokens: usize) -> Request {
    Request {
        stop_at_eos: false,
        logprobs: Some(1),
        ..Request::greedy(m.tokenizer.encode(text).unwrap(), mix, max_tokens)
    }
}

fn assert_same(a: &[GenOutput], b: &[GenOutput], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.ids, y.ids, "{what}: request {i}");
        assert_eq!(x.logprobs, y.logprobs, "{what}: request {i}");
        assert_eq!(x.finish_reason, y.finish_reason, "{what}: request {i}");
    }
}

/// Every block is back: none held by a sequence, and none at all once the idle cached ones go.
fn assert_pool_full(p: &mut KvPool) {
    assert_eq!(p.used(), 0, "blocks still held by sequences");
    p.clear_cache();
    assert_eq!(p.live(), 0, "blocks leaked");
    assert_eq!(p.available(), p.capacity());
}

const PASSAGE: &str = "Context: The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. \
They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under their leader Rollo, agreed to swear \
fealty to King Charles III of West Francia. Through generations of assimilation and mixing with the native Frankish and Roman-Gaulish \
populations, their descendants would gradually merge with the Carolingian-based cultures of West Francia. The distinct cultural and \
ethnic identity of the Normans emerged initially in the first half of the 10th century, and it continued to evolve over the succeeding centuries.\n";

const QUESTIONS: [&str; 4] = [
    "Question: In what country is Normandy located?\nAnswer:",
    "Question: When were the Normans in Normandy?\nAnswer:",
    "Question: From which countries did the Norse originate?\nAnswer:",
    "Question: Who was the Norse leader?\nAnswer:",
];

#[test]
fn preemption_under_a_pool_for_4_of_16_completes_all_with_the_unconstrained_tokens() {
    let m = model(WeightFormat::Packed);
    let qa = adapter(&m, "qa-r8");
    let reqs: Vec<Request> = (0..16)
        .map(|i| {
            let mix = if i % 2 == 0 {
                AdapterMix::default()
            } else {
                AdapterMix::single(qa.clone(), 0.5 + i as f64 / 32.0)
            };
            request(
                &m,
                &format!("Request {i}. {}{}", &PASSAGE[..200 + 8 * i], QUESTIONS[i % 4]),
                mix,
                24,
            )
        })
        .collect();
    let longest = reqs.iter().map(|r| r.prompt_ids.len() + r.max_tokens).max().unwrap();
    let blocks = 4 * longest.div_ceil(16);
    let free = generate(&m.model, &m.tokenizer, &reqs, LoraPath::Batched).unwrap();
    for prefix_cache in [false, true] {
        let mut b = Batcher::with_pool(
            &m.model,
            &m.tokenizer,
            LoraPath::Batched,
            pool(&m, blocks, prefix_cache),
        );
        b.prefill_chunk = 512;
        let out = run_all(&mut b, &reqs).unwrap();
        assert_same(&free, &out, &format!("pool of {blocks} blocks, prefix cache {prefix_cache}"));
        assert!(out.iter().all(|o| o.ids.len() == 24));
        assert!(b.pool.counters.preemptions > 0, "the pool was meant to force preemptions");
        assert_pool_full(&mut b.pool);
    }
}

#[test]
fn cancelled_preempted_and_finished_sequences_return_every_block() {
    let m = model(WeightFormat::Packed);
    let mut b = Batcher::with_pool(&m.model, &m.tokenizer, LoraPath::Batched, pool(&m, 40, true));
    b.prefill_chunk = 64;
    let mut receivers = Vec::new();
    for i in 0..12 {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Pairs share a prefix (cached blocks shared by running sequences), pairs differ.
        let r = request(
            &m,
            &format!("Reader {}. {PASSAGE}{}", i / 2, QUESTIONS[i % 4]),
            AdapterMix::default(),
            10 + 5 * i,
        );
        let id = b.fresh_id();
        b.add(loraplex::engine::sequence::Sequence::new(id, r, m.model.cfg.num_layers, tx));
        receivers.push(Some(rx));
    }
    let mut steps = 0;
    while !b.is_empty() {
        b.step();
        steps += 1;
        // Cancel a running one, a waiting one and one mid-prefill along the way.
        if [3, 9, 20].contains(&steps) {
            let i = [1, 11, 6][[3, 9, 20].iter().position(|&s| s == steps).unwrap()];
            receivers[i] = None;
        }
        assert!(b.pool.live() <= b.pool.capacity());
    }
    assert!(b.pool.counters.preemptions > 0, "the pool was meant to force preemptions");
    assert!(b.pool.counters.hit_tokens > 0, "pairs were meant to share cached blocks");
    assert_pool_full(&mut b.pool);
}

#[test]
fn prefix_cached_outputs_equal_uncached_bit_for_bit() {
    for format in [WeightFormat::Dense(candle_core::DType::F32), WeightFormat::Packed] {
        let m = model(format);
        let (qa, all) = (adapter(&m, "qa-r8"), adapter(&m, "all-r16"));
        let mixes = [
            AdapterMix::default(),
            AdapterMix::single(qa.clone(), 1.0),
            AdapterMix::new(vec![
                MixEntry { adapter: qa, scale: 0.7 },
                MixEntry { adapter: all, scale: 0.4 },
            ]),
        ];
        for mix in &mixes {
            let reqs: Vec<Request> = QUESTIONS
                .iter()
                .map(|q| request(&m, &format!("{PASSAGE}{q}"), mix.clone(), 8))
                .collect();
            let mut runs = Vec::new();
            for prefix_cache in [false, true] {
                let mut b = Batcher::with_pool(
                    &m.model,
                    &m.tokenizer,
                    LoraPath::Batched,
                    pool(&m, 200, prefix_cache),
                );
                // One after another, as a client asking its questions in turn.
                let out: Vec<GenOutput> = reqs
                    .iter()
                    .flat_map(|r| run_all(&mut b, std::slice::from_ref(r)).unwrap())
                    .collect();
                let (queried, hit) = (b.pool.counters.queried_tokens, b.pool.counters.hit_tokens);
                if prefix_cache {
                    let passage_blocks = (m.tokenizer.encode(PASSAGE).unwrap().len() / 16) as u64;
                    assert!(
                        hit >= 3 * (passage_blocks - 1) * 16,
                        "{format:?}: hits {hit} of {queried}"
                    );
                } else {
                    assert_eq!((queried, hit), (0, 0));
                }
                assert_pool_full(&mut b.pool);
                runs.push(out);
            }
            assert_same(
                &runs[0],
                &runs[1],
                &format!("{format:?}, {} adapters: cached vs uncached", mix.entries.len()),
            );
        }
    }
}

#[test]
fn another_mix_scale_or_adapter_version_never_hits() {
    let m = model(WeightFormat::Packed);
    let qa = adapter(&m, "qa-r8");
    let all = adapter(&m, "all-r16");
    let mut reloaded =
        load_adapter(&shared_dir().join("adapters/qa-r8"), "qa-r8", &m.model.cfg, &Device::Cpu)
            .unwrap();
    reloaded.version = qa.version + 1;
    let reloaded = Arc::new(reloaded);
    // Same name and version as `qa`, but another load: still its own blocks.
    let twin = adapter(&m, "qa-r8");
    let mut b = Batcher::with_pool(&m.model, &m.tokenizer, LoraPath::Batched, pool(&m, 400, true));
    let text = format!("{PASSAGE}{}", QUESTIONS[0]);
    let mut hits = |mix: AdapterMix| {
        let before = b.pool.counters.hit_tokens;
        run_all(&mut b, &[request(&m, &text, mix, 2)]).unwrap();
        b.pool.counters.hit_tokens - before
    };
    assert_eq!(hits(AdapterMix::single(qa.clone(), 0.5)), 0, "cold cache");
    assert!(hits(AdapterMix::single(qa.clone(), 0.5)) > 0, "control: the same mix hits");
    assert_eq!(hits(AdapterMix::single(qa.clone(), 0.7)), 0, "another scale");
    assert_eq!(hits(AdapterMix::default()), 0, "the base");
    assert_eq!(hits(AdapterMix::single(all.clone(), 0.5)), 0, "another adapter");
    assert_eq!(hits(AdapterMix::single(reloaded, 0.5)), 0, "a new version");
    assert_eq!(hits(AdapterMix::single(twin, 0.5)), 0, "another load of the same version");
    assert_eq!(
        hits(AdapterMix::new(vec![
            MixEntry { adapter: qa.clone(), scale: 0.5 },
            MixEntry { adapter: all.clone(), scale: 0.5 }
        ])),
        0,
        "a mix containing it"
    );
    assert_eq!(
        hits(AdapterMix::new(vec![
            MixEntry { adapter: all, scale: 0.5 },
            MixEntry { adapter: qa.clone(), scale: 0.5 }
        ])),
        0,
        "the mix in another order"
    );
    assert!(hits(AdapterMix::single(qa, 0.5)) > 0, "control: still cached");
}

#[actix_web::test]
async fn a_request_that_cannot_fit_the_pool_gets_422_and_serving_goes_on() {
    // 8 blocks of 16 tokens: 128 tokens in the whole pool.
    let c = ctx_with(|o| {
        o.kv_cache_bytes = Some(loraplex::config::ByteSize(8 * 30 * 2 * 3 * 64 * 16 * 4))
    });
    let app = app(&c).await;
    let (status, body) = call(
        &app,
        post(
            "/v1/completions",
            json!({"model": "qa-r8", "prompt": "Hello there", "max_tokens": 200}),
        ),
    )
    .await;
    assert_error(
        status,
        &body,
        actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request_error",
    );
    assert_eq!(body["error"]["code"], "kv_cache_exceeded", "{body}");
    assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    let (status, body) = call(
        &app,
        post(
            "/v1/completions",
            json!({"model": "qa-r8", "prompt": "Hello there", "max_tokens": 20}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 20);
    // The finished request's blocks are no longer used, only kept for reuse (the engine
    // publishes its counts after the step that retired it: poll briefly).
    let mut text = String::new();
    for _ in 0..100 {
        let resp = actix_web::test::call_service(
            &app,
            actix_web::test::TestRequest::get().uri("/metrics").to_request(),
        )
        .await;
        text = String::from_utf8(actix_web::test::read_body(resp).await.to_vec()).unwrap();
        if text.contains("loraplex_kv_cache_blocks{state=\"used\"} 0\n") {
            break;
        }
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let series = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(series("loraplex_kv_cache_blocks{state=\"total\"}"), Some(8.0), "{text}");
    assert_eq!(series("loraplex_kv_cache_blocks{state=\"used\"}"), Some(0.0), "{text}");
    assert!(
        series("loraplex_kv_cache_blocks{state=\"cached\"}").is_some_and(|c| c >= 1.0),
        "{text}"
    );
    assert_eq!(series("loraplex_kv_cache_capacity_tokens"), Some(128.0));
    assert!(series("loraplex_prefix_cache_queries_total").is_some_and(|q| q >= 2.0), "{text}");
}

#[test]
fn the_n_choices_of_a_long_prompt_prefill_it_once() {
    let m = model(WeightFormat::Packed);
    let qa = adapter(&m, "qa-r8");
    let prompt = format!("{}{}", PASSAGE.repeat(14), QUESTIONS[0]);
    let base = request(&m, &prompt, AdapterMix::single(qa, 0.7), 6);
    let len = base.prompt_ids.len();
    assert!(len > 1500, "{len} tokens");
    // `n: 8` as the API submits it: eight sequences of one prompt, seeds k, queued together.
    let reqs: Vec<Request> = (0..8u64)
        .map(|k| Request {
            sampling: loraplex::model::sampling::SamplingParams {
                temperature: 0.8,
                top_p: 1.0,
                top_k: None,
                min_p: 0.0,
                seed: 5 + k,
            },
            ..base.clone()
        })
        .collect();
    let mut b = Batcher::with_pool(&m.model, &m.tokenizer, LoraPath::Batched, pool(&m, 4096, true));
    b.prefill_chunk = 512;
    let mut rxs = Vec::new();
    for r in &reqs {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = b.fresh_id();
        b.add(loraplex::engine::sequence::Sequence::new(id, r.clone(), b.num_layers(), tx));
        rxs.push(rx);
    }
    let (mut computed, mut deferred) = (0, 0);
    while !b.is_empty() {
        let r = b.step();
        computed += r.prefill_tokens;
        deferred += r.deferred;
    }
    // The first choice computes the prompt; each other one only its last, partial block.
    assert!(
        computed <= len + 7 * 16,
        "{computed} prompt tokens computed for a {len}-token prompt × 8"
    );
    assert!(deferred > 0);
    assert_pool_full(&mut b.pool);
    let shared: Vec<GenOutput> = rxs
        .into_iter()
        .map(|mut rx| {
            let mut o = GenOutput::default();
            while let Ok(ev) = rx.try_recv() {
                o.push(ev).unwrap();
            }
            o
        })
        .collect();
    // A choice that took its prompt from the first one's blocks equals it computed on its own,
    // without the prefix cache.
    let alone = generate(&m.model, &m.tokenizer, &[reqs[7].clone()], LoraPath::Batched).unwrap();
    assert_same(&[shared[7].clone()], &alone, "shared prefill");
    assert_ne!(shared[0].ids, shared[7].ids, "different seeds, different choices");
}
