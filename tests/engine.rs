//! The engine thread on the real model: a dropped receiver (client gone) frees the batch slot
//! at the next step; sequences with different mixes share batches; the queue bound holds.

mod common;

use candle_core::{DType, Device};
use common::*;
use loraplex::adapters::{load_adapter, AdapterMix};
use loraplex::engine::{Engine, EngineConfig, EngineError, Request, TokenEvent};
use loraplex::model::load::load_model;
use loraplex::model::WeightFormat;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn engine(cfg: EngineConfig) -> (Engine, Arc<loraplex::adapters::LoraAdapter>) {
    let m = load_model(
        real_model_path().to_str().unwrap(),
        WeightFormat::Dense(DType::F32),
        &Device::Cpu,
    )
    .unwrap();
    let qa = Arc::new(
        load_adapter(&shared_dir().join("adapters/qa-r8"), "qa-r8", &m.model.cfg, &Device::Cpu)
            .unwrap(),
    );
    (Engine::start(m.model, Arc::new(m.tokenizer), cfg, None).unwrap(), qa)
}

fn wait_idle(e: &Engine, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if e.is_idle() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn a_dropped_receiver_cancels_the_sequence() {
    let (e, qa) = engine(EngineConfig::default());
    let mut req =
        Request::greedy(vec![504, 3575, 282, 4649, 314], AdapterMix::single(qa, 1.0), 2000);
    req.stop_at_eos = false;
    let mut rx = e.submit(req).unwrap();
    // Two tokens arrive, then the client goes away.
    for _ in 0..2 {
        assert!(matches!(rx.blocking_recv(), Some(TokenEvent::Token { .. })));
    }
    assert_eq!(e.stats().running.load(Ordering::SeqCst), 1);
    drop(rx);
    // 2000 tokens would take over a minute; cancellation frees the slot at the next step.
    assert!(wait_idle(&e, Duration::from_secs(5)), "the cancelled sequence still runs");
}

#[test]
fn the_waiting_queue_is_bounded() {
    let (e, _) = engine(EngineConfig {
        max_batch_size: 1,
        max_waiting: 2,
        max_prefill_tokens: 2048,
        ..Default::default()
    });
    let mut receivers = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        let req = Request {
            stop_at_eos: false,
            ..Request::greedy(vec![504, 3575], AdapterMix::default(), 40)
        };
        match e.submit(req) {
            Ok(rx) => receivers.push(rx),
            Err(EngineError::QueueFull { limit, .. }) => {
                assert_eq!(limit, 2);
                refused += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(refused >= 3, "at most 1 running + 2 waiting are accepted, refused {refused}");
    for mut rx in receivers {
        let mut done = false;
        while let Some(ev) = rx.blocking_recv() {
            if let TokenEvent::Done { usage, .. } = ev {
                assert_eq!(usage.completion_tokens, 40);
                done = true;
            }
        }
        assert!(done, "every accepted request completes");
    }
    e.drain();
    assert_eq!(
        e.submit(Request::greedy(vec![1], AdapterMix::default(), 1)).unwrap_err(),
        EngineError::ShuttingDown
    );
}
