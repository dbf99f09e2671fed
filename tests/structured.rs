//! Structured outputs inside mixed batches, on the real model: each constrained row's text
//! matches its own constraint; its tokens do not depend on which rows share its batch (free or
//! constrained, other adapters, greedy or sampled); a constrained sequence that is preempted
//! resumes with its grammar state; `n > 1` copies get independent matchers; the grammar cache
//! hands back the compiled grammar for the same text.

mod common;

use candle_core::Device;
use common::*;
use loraplex::adapters::{load_adapter, AdapterMix, LoraAdapter};
use loraplex::engine::kv_pool::KvPool;
use loraplex::engine::sequence::Sequence;
use loraplex::engine::{Batcher, LoraPath, Request, TokenEvent};
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::sampling::SamplingParams;
use loraplex::model::WeightFormat;
use loraplex::structured::{ConstraintSpec, Grammars};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        load_model(real_model_path().to_str().unwrap(), WeightFormat::Packed, &Device::Cpu).unwrap()
    })
}

fn grammars() -> &'static Grammars {
    static G: OnceLock<Grammars> = OnceLock::new();
    G.get_or_init(|| Grammars::new(&model().tokenizer, model().model.cfg.vocab_size).unwrap())
}

fn adapter(name: &str) -> Arc<LoraAdapter> {
    let m = model();
    Arc::new(
        load_adapter(&shared_dir().join("adapters").join(name), name, &m.model.cfg, &Device::Cpu)
            .unwrap(),
    )
}

fn person_schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}},
        "required": ["name", "age", "tags"], "additionalProperties": false})
}

fn specs() -> Vec<ConstraintSpec> {
    vec![
        ConstraintSpec::JsonSchema(person_schema().to_string()),
        ConstraintSpec::Regex(r"[0-9]{3}-[0-9]{4}".into()),
        ConstraintSpec::Choice(vec!["yes".into(), "no".into(), "maybe".into()]),
        ConstraintSpec::JsonObject,
    ]
}

fn req(prompt: &str, mix: AdapterMix, spec: Option<&ConstraintSpec>, seed: Option<u64>) -> Request {
    let m = model();
    let mut r = Request::greedy(m.tokenizer.encode(prompt).unwrap(), mix, 48);
    r.constraint = spec.map(|s| grammars().compile(s).unwrap());
    if let Some(seed) = seed {
        r.sampling = SamplingParams { temperature: 0.8, top_p: 0.95, seed, ..Default::default() };
    }
    r
}

/// The batch: four constrained rows (each its own constraint and mix, two sampled) and two
/// free rows on other adapters.
fn batch() -> Vec<Request> {
    let (qa, all) = (adapter("qa-r8"), adapter("all-r16"));
    let s = specs();
    vec![
        req("Describe a person as JSON:", AdapterMix::single(qa.clone(), 1.0), Some(&s[0]), None),
        req("My phone number is", AdapterMix::default(), Some(&s[1]), Some(3)),
        req("Is the sky blue? Answer:", AdapterMix::single(all.clone(), 0.7), Some(&s[2]), None),
        req("A JSON object about a cat:", AdapterMix::default(), Some(&s[3]), Some(9)),
        req("Once upon a time", AdapterMix::single(all, 1.0), None, None),
        req("The best way to learn is", AdapterMix::single(qa, 0.5), None, Some(4)),
    ]
}

/// Runs `reqs` on one batcher over a pool of `blocks` KV blocks; each sequence's token ids and
/// text, and how many preemptions happened.
fn run(reqs: &[Request], blocks: usize) -> (Vec<(Vec<u32>, String)>, u64) {
    let m = model();
    let pool =
        KvPool::new(blocks, m.model.cfg.num_layers, m.model.kv_width(), m.model.host_kv(), true);
    let mut b = Batcher::with_pool(&m.model, &m.tokenizer, LoraPath::Batched, pool);
    b.prefill_chunk = 32;
    let mut rxs = Vec::new();
    for r in reqs {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = b.fresh_id();
        b.add(Sequence::new(id, r.clone(), b.num_layers(), tx));
        rxs.push(rx);
    }
    for _ in 0..2000 {
        if b.is_empty() {
            break;
        }
        b.step();
    }
    let preempted = b.pool.counters.preemptions;
    assert!(b.is_empty(), "the batch never finished");
    let out = rxs
        .into_iter()
        .map(|mut rx| {
            let (mut ids, mut text) = (Vec::new(), String::new());
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    TokenEvent::Token { id, text: t, .. } => {
                        ids.push(id);
                        text.push_str(&t);
                    }
                    TokenEvent::Done { .. } | TokenEvent::Prompt(_) => {}
                    TokenEvent::Error(e) => panic!("sequence failed: {e}"),
                }
            }
            (ids, text)
        })
        .collect();
    (out, preempted)
}

fn check_texts(out: &[(Vec<u32>, String)]) {
    let person: Value =
        serde_json::from_str(&out[0].1).unwrap_or_else(|e| panic!("{e}: {}", out[0].1));
    let obj = person.as_object().unwrap();
    assert_eq!(obj.len(), 3, "{person}");
    assert!(obj["name"].as_str().unwrap().chars().count() <= 12);
    assert!((0..=120).contains(&obj["age"].as_i64().unwrap()));
    let tags = obj["tags"].as_array().unwrap();
    assert!((1..=3).contains(&tags.len()));
    assert!(tags.iter().all(|t| ["red", "green", "blue"].contains(&t.as_str().unwrap())));
    let phone = &out[1].1;
    assert!(
        phone.len() == 8
            && phone.chars().enumerate().all(|(i, c)| if i == 3 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }),
        "{phone:?}"
    );
    assert!(["yes", "no", "maybe"].contains(&out[2].1.as_str()), "{:?}", out[2].1);
    // JSON object: complete, or cut by max_tokens.
    let obj = &out[3];
    assert!(
        serde_json::from_str::<Value>(&obj.1).is_ok_and(|v| v.is_object()) || obj.0.len() == 48,
        "{:?}",
        obj.1
    );
}

#[test]
fn constrained_rows_match_their_constraints_and_ignore_their_batch_neighbours() {
    let reqs = batch();
    let (together, _) = run(&reqs, 4096);
    check_texts(&together);
    for (i, r) in reqs.iter().enumerate().take(4) {
        let (alone, _) = run(std::slice::from_ref(r), 4096);
        assert_eq!(alone[0].0, together[i].0, "row {i}: tokens depend on the batch");
    }
    // Reversed order: other neighbours, other rows next to each.
    let reversed: Vec<Request> = reqs.iter().rev().cloned().collect();
    let (back, _) = run(&reversed, 4096);
    for i in 0..reqs.len() {
        assert_eq!(back[reqs.len() - 1 - i].0, together[i].0, "row {i} in reversed order");
    }
}

#[test]
fn a_preempted_constrained_sequence_resumes_with_its_grammar_state() {
    let reqs = batch();
    let (roomy, none) = run(&reqs, 4096);
    assert_eq!(none, 0);
    // Few blocks: sequences are preempted mid-text and recomputed.
    let (tight, preempted) = run(&reqs, 8);
    assert!(preempted > 0, "the tight pool preempted nothing");
    check_texts(&tight);
    assert_eq!(tight, roomy, "preemption changed a constrained sequence's text");
}

#[test]
fn n_copies_of_one_constrained_request_keep_independent_grammar_states() {
    let spec = &specs()[0];
    let reqs: Vec<Request> = (0..4)
        .map(|k| req("Describe a person as JSON:", AdapterMix::default(), Some(spec), Some(20 + k)))
        .collect();
    let (out, _) = run(&reqs, 4096);
    for (ids, text) in &out {
        if ids.len() < 48 {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
        }
    }
    assert!(out.iter().any(|o| o.1 != out[0].1), "four seeds gave one text: {out:?}");
}

#[test]
fn the_same_constraint_text_compiles_once() {
    let spec = ConstraintSpec::JsonSchema(
        json!({"type": "array", "items": {"type": "integer"}}).to_string(),
    );
    let a = grammars().compile(&spec).unwrap();
    let b = grammars().compile(&spec).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let bad = ConstraintSpec::JsonSchema(json!({"type": "object", "maxLenght": 3}).to_string());
    let e = grammars().compile(&bad).unwrap_err().to_string();
    assert!(e.contains("maxLenght"), "{e}");
}

/// The plain sampling path (nothing reshapes the row) and the reshaping one (rules that change
/// nothing: a zero bias) choose the same tokens, sampled and greedy, log-probabilities asked.
#[test]
fn inert_logit_rules_choose_what_the_plain_path_chooses() {
    let plain: Vec<Request> = (0..4)
        .map(|k| {
            let mut r = req(
                "The best way to learn is",
                AdapterMix::default(),
                None,
                (k % 2 == 1).then_some(k),
            );
            r.logprobs = Some(2);
            r
        })
        .collect();
    let ruled: Vec<Request> = plain
        .iter()
        .cloned()
        .map(|mut r| {
            r.rules.bias = vec![(0, 0.0)];
            r
        })
        .collect();
    assert!(!ruled[0].rules.is_none());
    assert_eq!(run(&plain, 4096).0, run(&ruled, 4096).0);
}
