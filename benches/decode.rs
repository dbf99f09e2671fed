//! (b) Decode throughput of the real default model at batch 1, 8 and 32: base only, and with
//! every row carrying a different rank-8 q/v adapter (batched LoRA path). One iteration is one
//! decode step for the whole batch after a 32-token prefill; tokens/s = batch / step time.
//! Run: `scripts/fetch-model.sh && cargo bench --bench decode` (LORAPLEX_BENCH_DTYPE=f32|q8_0|…).

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loraplex::adapters::synth::random_adapter;
use loraplex::adapters::AdapterMix;
use loraplex::model::load::{load_model, DEFAULT_MODEL};
use loraplex::model::{BatchInput, Decoder, SeqCache, StepLora, WeightFormat};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn prefilled(model: &Decoder, batch: usize, lora: &StepLora) -> Vec<SeqCache> {
    let mut input = BatchInput::default();
    let mut caches: Vec<SeqCache> =
        (0..batch).map(|_| SeqCache::new(model.cfg.num_layers, 256)).collect();
    for i in 0..batch {
        let prompt: Vec<u32> = (0..32).map(|t| 100 + ((i * 31 + t * 7) % 4000) as u32).collect();
        input.push(&prompt);
    }
    let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
    model.forward(&input, Some(&mut refs), lora).unwrap();
    caches
}

fn bench(c: &mut Criterion) {
    loraplex::runtime::init_process();
    let dev = Device::Cpu;
    let dtype = std::env::var("LORAPLEX_BENCH_DTYPE").unwrap_or_else(|_| "f32".into());
    let path = std::env::var("LORAPLEX_MODEL")
        .unwrap_or_else(|_| format!("{}/{DEFAULT_MODEL}", env!("CARGO_MANIFEST_DIR")));
    let loaded = load_model(&path, WeightFormat::parse(&dtype, &dev).unwrap(), &dev).unwrap();
    let model = &loaded.model;
    let adapters: Vec<AdapterMix> = (0..32)
        .map(|i| {
            AdapterMix::single(
                Arc::new(
                    random_adapter(
                        &format!("qv{i}"),
                        &model.cfg,
                        8,
                        &["q_proj", "v_proj"],
                        i as u64,
                        &dev,
                    )
                    .unwrap(),
                ),
                1.0,
            )
        })
        .collect();
    let mut g = c.benchmark_group(format!("decode_{dtype}"));
    for batch in [1usize, 8, 32] {
        g.throughput(Throughput::Elements(batch as u64));
        let base = AdapterMix::default();
        for (label, lora_on) in [("base", false), ("lora_r8_qv_distinct", true)] {
            let mixes: Vec<&AdapterMix> =
                (0..batch).map(|i| if lora_on { &adapters[i] } else { &base }).collect();
            let lora =
                StepLora::batched(&mixes, model.cfg.num_layers, model.dtype(), &dev).unwrap();
            let snapshot = prefilled(model, batch, &lora);
            let mut step = BatchInput::default();
            (0..batch).for_each(|i| step.push(&[(500 + i) as u32]));
            g.bench_with_input(BenchmarkId::new(label, batch), &batch, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut caches = snapshot.clone();
                        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
                        let t0 = Instant::now();
                        let h = model.forward(&step, Some(&mut refs), &lora).unwrap();
                        model.logits(&h).unwrap();
                        total += t0.elapsed();
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
