//! Chunked prefill on the real model: prompts fed a few tokens per step (interleaved with the
//! other sequences' decode) give bit for bit the tokens and log-probabilities of prompts fed
//! whole, on the packed path (`--dtype auto`), in one batch that mixes adapters and lengths.

mod common;

use candle_core::Device;
use common::*;
use loraplex::adapters::{load_adapter, AdapterMix, MixEntry};
use loraplex::engine::{LoraPath, Request};
use loraplex::generate::{generate, generate_chunked};
use loraplex::model::load::load_model;
use loraplex::model::WeightFormat;
use std::sync::Arc;

#[test]
fn chunked_prompts_give_the_same_tokens_bit_for_bit() {
    let m = load_model(real_model_path().to_str().unwrap(), WeightFormat::Packed, &Device::Cpu)
        .unwrap();
    let adapter = |name: &str| {
        Arc::new(
            load_adapter(
                &shared_dir().join("adapters").join(name),
                name,
                &m.model.cfg,
                &Device::Cpu,
            )
            .unwrap(),
        )
    };
    let (qa, all) = (adapter("qa-r8"), adapter("all-r16"));
    let mixes = [
        AdapterMix::default(),
        AdapterMix::single(qa.clone(), 0.5),
        AdapterMix::new(vec![
            MixEntry { adapter: qa, scale: 0.7 },
            MixEntry { adapter: all, scale: 0.3 },
        ]),
    ];
    let texts = [
        "The capital of France is",
        "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter and his three daughters, who",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Q: What is the boiling point of water at sea level in degrees Celsius?\nA:",
    ];
    let reqs: Vec<Request> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Request {
            stop_at_eos: false,
            logprobs: Some(1),
            ..Request::greedy(m.tokenizer.encode(t).unwrap(), mixes[i % mixes.len()].clone(), 12)
        })
        .collect();
    let whole = generate(&m.model, &m.tokenizer, &reqs, LoraPath::Batched).unwrap();
    for chunk in [1, 5, 16] {
        let chunked =
            generate_chunked(&m.model, &m.tokenizer, &reqs, LoraPath::Batched, chunk).unwrap();
        for (i, (w, c)) in whole.iter().zip(&chunked).enumerate() {
            assert_eq!(c.ids, w.ids, "chunk {chunk}, request {i}");
            assert_eq!(c.logprobs, w.logprobs, "chunk {chunk}, request {i}");
            assert_eq!(c.usage.prompt_tokens, w.usage.prompt_tokens);
        }
    }
}
