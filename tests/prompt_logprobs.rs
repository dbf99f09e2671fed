//! Prompt log-probabilities (OpenAI's `echo` + `logprobs`, vLLM's `prompt_logprobs`) are what
//! the decode path gives the same tokens: the prefill's value at each prompt position equals
//! the log-probability the decode step reported when it generated that token (a sequence's
//! generated tokens fed back as a prompt), on an adapter and on a mix, within 1e-4 on the f32
//! and the packed paths (measured: equal bit for bit); prompts fed one token per step give the
//! same values.
//! Through HTTP, lm-evaluation-harness' log-likelihood body is answered in OpenAI's legacy
//! shape, the first prompt token `null`.

mod common;

use candle_core::{DType, Device};
use common::http::{app, call, ctx, post};
use common::*;
use loraplex::adapters::{load_adapter, AdapterMix, MixEntry};
use loraplex::engine::{Collected, LoraPath, Request};
use loraplex::generate::{generate, generate_chunked};
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::WeightFormat;
use serde_json::json;
use std::sync::Arc;

/// About 40 tokens of the default model's tokenizer.
const PROMPT: &str = "Question: The Eiffel Tower was built for the 1889 World's Fair in Paris. Which city is it in, and for which event was it built? Answer in one short sentence.\nAnswer:";

fn mixes(m: &LoadedModel) -> Vec<(&'static str, AdapterMix)> {
    let adapter = |name: &str| {
        let dir = shared_dir().join("adapters").join(name);
        Arc::new(load_adapter(&dir, name, &m.model.cfg, &Device::Cpu).unwrap())
    };
    let (qa, all) = (adapter("qa-r8"), adapter("all-r16"));
    vec![
        ("qa-r8", AdapterMix::single(qa.clone(), 1.0)),
        (
            "qa-r8:0.7 + all-r16:0.3",
            AdapterMix::new(vec![
                MixEntry { adapter: qa, scale: 0.7 },
                MixEntry { adapter: all, scale: 0.3 },
            ]),
        ),
    ]
}

fn scored(ids: Vec<u32>, mix: AdapterMix) -> Request {
    Request { prompt_logprobs: Some(3), stop_at_eos: false, ..Request::greedy(ids, mix, 1) }
}

fn prompt_values(c: &Collected) -> Vec<Option<f32>> {
    c.prompt_logprobs.as_ref().unwrap().iter().map(|v| v.as_ref().map(|v| v.logprob)).collect()
}

fn check(format: WeightFormat, tolerance: f32) {
    let m = load_model(real_model_path().to_str().unwrap(), format, &Device::Cpu).unwrap();
    let prompt = m.tokenizer.encode(PROMPT).unwrap();
    assert!((35..=50).contains(&prompt.len()), "{} prompt tokens", prompt.len());
    for (what, mix) in mixes(&m) {
        // The decode path: 12 greedy tokens, each with the log-probability of its step.
        let gen = Request {
            logprobs: Some(0),
            stop_at_eos: false,
            ..Request::greedy(prompt.clone(), mix.clone(), 12)
        };
        let decoded = generate(&m.model, &m.tokenizer, &[gen], LoraPath::Batched).unwrap();
        let d = &decoded[0];
        // The same tokens as a prompt, scored in one prefill.
        let all: Vec<u32> = prompt.iter().chain(&d.ids).copied().collect();
        let whole = generate(
            &m.model,
            &m.tokenizer,
            &[scored(all.clone(), mix.clone())],
            LoraPath::Batched,
        )
        .unwrap();
        let values = prompt_values(&whole[0]);
        assert_eq!(values.len(), all.len(), "{what}");
        assert!(values[0].is_none() && values[1..].iter().all(Option::is_some), "{what}");
        let mut worst = 0f32;
        for (k, &lp) in d.logprobs.iter().enumerate() {
            let got = values[prompt.len() + k].unwrap();
            worst = worst.max((got - lp).abs());
        }
        eprintln!("{what} ({format}): prefill vs decode, largest difference {worst:e}");
        assert!(worst <= tolerance, "{what} ({format}): prefill vs decode differ by {worst}");
        // One token per step through the prefill (decode-shaped steps): the same values.
        let one = generate_chunked(
            &m.model,
            &m.tokenizer,
            &[scored(all.clone(), mix.clone())],
            LoraPath::Batched,
            1,
        )
        .unwrap();
        let per_step = prompt_values(&one[0]);
        let worst = values
            .iter()
            .zip(&per_step)
            .filter_map(|(a, b)| Some((a.as_ref()? - b.as_ref()?).abs()))
            .fold(0f32, f32::max);
        assert!(worst <= tolerance, "{what} ({format}): whole vs one-by-one differ by {worst}");
        // The ranks and alternatives agree with the values.
        for v in whole[0].prompt_logprobs.as_ref().unwrap().iter().flatten() {
            assert_eq!(v.top.len(), 3);
            assert!(v.rank >= 1 && (v.rank > 1 || (v.top[0].1 - v.logprob).abs() < 1e-6));
        }
    }
}

#[test]
fn prompt_logprobs_equal_the_decode_paths_on_f32() {
    check(WeightFormat::Dense(DType::F32), 1e-4);
}

/// The packed path quantizes activations per row of 32 values, so a row's result does not
/// depend on the rows beside it: measured bit for bit equal here too (the bound is the f32
/// path's).
#[test]
fn prompt_logprobs_equal_the_decode_paths_on_the_packed_path() {
    check(WeightFormat::Packed, 1e-4);
}

#[actix_web::test]
async fn lm_evaluation_harness_loglikelihood_bodies_are_answered() {
    let c = ctx();
    let app = app(&c).await;
    // lm-evaluation-harness' `local-completions` body for a log-likelihood request.
    let body = json!({"model": "qa-r8", "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
        "logprobs": 1, "echo": true, "seed": 1234});
    let (s, v) = call(&app, post("/v1/completions", body)).await;
    assert_eq!(s, 200, "{v}");
    let choice = &v["choices"][0];
    let lp = &choice["logprobs"];
    let n = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), n + 1, "{lp}");
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    let values: Vec<f64> =
        lp["token_logprobs"].as_array().unwrap()[1..].iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(values.iter().all(|x| x.is_finite() && *x <= 0.0), "{values:?}");
    assert!(choice["text"].as_str().unwrap().starts_with(PROMPT));
    let joined: String = tokens[..n].iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, PROMPT);
    // vLLM's field gives the same numbers, with each token's rank.
    let body = json!({"model": "qa-r8", "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
        "prompt_logprobs": 0});
    let (s, w) = call(&app, post("/v1/completions", body)).await;
    assert_eq!(s, 200, "{w}");
    let p = w["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert!(p[0].is_null());
    for (i, entry) in p[1..].iter().enumerate() {
        let e = entry.as_object().unwrap().values().next().unwrap();
        assert!((e["logprob"].as_f64().unwrap() - values[i]).abs() < 1e-6, "{i}: {e}");
        assert!(e["rank"].as_u64().unwrap() >= 1);
    }
    // Bad input: named fields.
    let bad = json!({"prompt": "x", "prompt_logprobs": 99});
    let (s, e) = call(&app, post("/v1/completions", bad)).await;
    assert_eq!((s.as_u16(), e["error"]["param"].as_str()), (422, Some("prompt_logprobs")));
    let bad = json!({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1, "stream": true});
    let (s, e) = call(&app, post("/v1/chat/completions", bad)).await;
    assert_eq!((s.as_u16(), e["error"]["param"].as_str()), (422, Some("prompt_logprobs")));
}
