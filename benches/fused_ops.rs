//! (g) The fused CPU kernels against their composed candle references at SmolLM2's shapes:
//! RMS-norm, residual add + RMS-norm and SiLU·mul on a decode batch of 32 rows, then whole
//! forwards of a 4-layer SmolLM2-shaped random model (dense f32) where attention dominates — a
//! decode step at batch 32 over 128 cached tokens each, and a 512-token prefill — with the
//! fused path (fused attention over host caches) and the composed one.
//! Run: `cargo bench --bench fused_ops`.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use loraplex::model::ops::{Exec, Kernels};
use loraplex::model::{BatchInput, Decoder, DecoderConfig, SeqCache, StepLora};
use std::time::{Duration, Instant};

fn ops(c: &mut Criterion) {
    loraplex::runtime::init_process();
    let dev = Device::Cpu;
    let threads = loraplex::kernels::Pool::default_threads();
    let (fused, composed) =
        (Kernels::new(threads, Exec::Fused), Kernels::new(threads, Exec::Composed));
    let x = Tensor::randn(0f32, 1.0, (32, 576), &dev).unwrap();
    let y = Tensor::randn(0f32, 1.0, (32, 576), &dev).unwrap();
    let w = Tensor::randn(1f32, 0.1, 576, &dev).unwrap();
    let g = Tensor::randn(0f32, 2.0, (32, 1536), &dev).unwrap();
    let u = Tensor::randn(0f32, 1.0, (32, 1536), &dev).unwrap();
    let mut grp = c.benchmark_group("fused_ops_b32");
    for (name, k) in [("fused", &fused), ("composed", &composed)] {
        grp.bench_function(format!("rms_norm/{name}"), |b| {
            b.iter(|| k.rms_norm(&x, &w, 1e-5).unwrap())
        });
        grp.bench_function(format!("add_rms_norm/{name}"), |b| {
            b.iter(|| k.add_rms_norm(&x, &y, &w, 1e-5).unwrap())
        });
        grp.bench_function(format!("silu_mul/{name}"), |b| b.iter(|| k.silu_mul(&g, &u).unwrap()));
    }
    grp.finish();
}

fn forwards(c: &mut Criterion) {
    let dev = Device::Cpu;
    let cfg = DecoderConfig {
        vocab_size: 1024,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 4,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        max_position_embeddings: 2048,
        ..DecoderConfig::tiny()
    };
    let fused = Decoder::random(cfg.clone(), 1, &dev).unwrap();
    let composed = fused.with_exec(Exec::Composed);
    let mut grp = c.benchmark_group("attention_heavy_forward_4_layers");
    for (name, m) in [("fused", &fused), ("composed", &composed)] {
        // Decode at batch 32 after 128 tokens each (caches restored before every timed step).
        let mut caches: Vec<SeqCache> =
            (0..32).map(|_| SeqCache::new(cfg.num_layers, 160)).collect();
        let mut input = BatchInput::default();
        (0..32).for_each(|i| {
            input.push(&(0..128).map(|t| ((i * 7 + t) % 1000) as u32).collect::<Vec<_>>())
        });
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        m.forward(&input, Some(&mut refs), &StepLora::None).unwrap();
        let mut step = BatchInput::default();
        (0..32).for_each(|i| step.push(&[i as u32]));
        grp.bench_function(format!("decode_b32_ctx128/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut cs = caches.clone();
                    let mut refs: Vec<&mut SeqCache> = cs.iter_mut().collect();
                    let t = Instant::now();
                    m.forward(&step, Some(&mut refs), &StepLora::None).unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
        let mut prompt = BatchInput::default();
        prompt.push(&(0..512).map(|t| (t % 1000) as u32).collect::<Vec<_>>());
        grp.bench_function(format!("prefill_512/{name}"), |b| {
            b.iter(|| {
                let mut cs = [SeqCache::new(cfg.num_layers, 512)];
                let mut refs: Vec<&mut SeqCache> = cs.iter_mut().collect();
                m.forward(&prompt, Some(&mut refs), &StepLora::None).unwrap()
            })
        });
    }
    grp.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = ops, forwards
}
criterion_main!(benches);
