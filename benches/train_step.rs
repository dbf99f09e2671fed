//! Training throughput of the SQuAD recipe's shape: one optimizer step (forward, backward,
//! clip, AdamW) of r 16 / alpha 32 LoRA on q/k/v/o over a batch of 8 sequences × 256 tokens
//! (the loss on the last 8 tokens of each, like short answers) on the real model, f32.
//! tokens/s = 8 × 256 / step time. Run: `cargo bench --bench train_step` (about 5 minutes).

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use loraplex::model::load::{load_model, DEFAULT_MODEL};
use loraplex::model::WeightFormat;
use loraplex::train::squad::TrainExample;
use loraplex::train::trainer::train_on;
use loraplex::train::{TrainConfig, TrainOptions};
use std::time::{Duration, Instant};

fn bench(c: &mut Criterion) {
    loraplex::runtime::init_process();
    loraplex::runtime::training_spin_limit();
    let path = std::env::var("LORAPLEX_MODEL")
        .unwrap_or_else(|_| format!("{}/{DEFAULT_MODEL}", env!("CARGO_MANIFEST_DIR")));
    let loaded =
        load_model(&path, WeightFormat::parse("f32", &Device::Cpu).unwrap(), &Device::Cpu).unwrap();
    let examples: Vec<TrainExample> = (0..8u32)
        .map(|i| {
            TrainExample::tail(
                (0..255).map(|t| 100 + (t * 13 + i * 7) % 4000).collect(),
                (0..8).map(|t| 200 + t + i).collect(),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig::try_from(TrainOptions {
        output: Some(dir.path().join("bench")),
        steps: Some(1),
        batch_size: Some(8),
        warmup_steps: Some(0),
        checkpoint_every: Some(0),
        max_seq_len: Some(256),
        ..Default::default()
    })
    .unwrap();
    let mut g = c.benchmark_group("train_step_r16_qkvo");
    g.throughput(Throughput::Elements(8 * 256));
    g.bench_function("batch8x256", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                train_on(&loaded.model, &examples, &cfg, false, None).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(60)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
