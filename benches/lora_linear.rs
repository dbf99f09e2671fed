//! (a) One LoRA-aware linear (576 → 576, like SmolLM2's q_proj) for a decode batch of 32 rows,
//! each row with a different rank-8 adapter: the host LoRA kernel vs the stacked-bmm path vs
//! the per-row reference vs merged weights vs the base alone, over a dense f32 and a packed
//! base. Run: `cargo bench --bench lora_linear`.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use loraplex::adapters::synth::random_adapter;
use loraplex::adapters::AdapterMix;
use loraplex::model::ops::{Exec, Kernels};
use loraplex::model::{BaseWeight, DecoderConfig, LoraLinear, ModuleId, Pass, StepLora, Target};
use std::sync::Arc;

fn bench(c: &mut Criterion) {
    loraplex::runtime::init_process();
    let dev = Device::Cpu;
    let mut cfg = DecoderConfig::tiny();
    (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) =
        (576, 9, 3, 64, 1);
    let rows = 32;
    let id = ModuleId { layer: 0, target: Target::Q };
    let mixes: Vec<AdapterMix> = (0..rows)
        .map(|i| {
            AdapterMix::single(
                Arc::new(
                    random_adapter(&format!("a{i}"), &cfg, 8, &["q_proj"], i as u64, &dev).unwrap(),
                ),
                1.0,
            )
        })
        .collect();
    let refs: Vec<&AdapterMix> = mixes.iter().collect();
    let w = Tensor::randn(0f32, 0.05, (576, 576), &dev).unwrap();
    let layer = LoraLinear { id, base: BaseWeight::Dense(w.clone()), bias: None };
    let x = Tensor::randn(0f32, 1.0, (rows, 576), &dev).unwrap();
    let lens = vec![1; rows];
    let batched = StepLora::batched(&refs, 1, DType::F32, &dev).unwrap();
    let per_row = StepLora::per_row(&refs);
    // Merged: every row has its own merged weight, so 32 separate matmuls of one row each.
    let merged: Vec<Tensor> = mixes
        .iter()
        .map(|m| {
            let (lw, coef) = m.terms(id).next().unwrap();
            (&w + (lw.b.matmul(&lw.a).unwrap() * coef).unwrap()).unwrap()
        })
        .collect();
    let stacked = StepLora::stacked(&refs, 1, &dev).unwrap();
    let kernels = Kernels::new(loraplex::kernels::Pool::default_threads(), Exec::Fused);
    let pass = |lora| Pass { seq_lens: &lens, lora, kernels: &kernels };
    let packed = LoraLinear {
        id,
        base: loraplex::model::weights::packed_from_dense(&w).unwrap(),
        bias: None,
    };
    let mut g = c.benchmark_group("lora_linear_b32_r8_distinct");
    g.bench_function("base_only", |b| {
        b.iter(|| layer.forward(&x, &pass(&StepLora::None)).unwrap())
    });
    g.bench_function("batched_fast_path", |b| {
        b.iter(|| layer.forward(&x, &pass(&batched)).unwrap())
    });
    g.bench_function("stacked_bmm_path", |b| {
        b.iter(|| layer.forward(&x, &pass(&stacked)).unwrap())
    });
    g.bench_function("per_row_reference", |b| {
        b.iter(|| layer.forward(&x, &pass(&per_row)).unwrap())
    });
    g.bench_function("packed_base_only", |b| {
        b.iter(|| packed.forward(&x, &pass(&StepLora::None)).unwrap())
    });
    g.bench_function("packed_batched_fast_path", |b| {
        b.iter(|| packed.forward(&x, &pass(&batched)).unwrap())
    });
    g.bench_function("merged_per_row", |b| {
        b.iter(|| {
            let outs: Vec<Tensor> = merged
                .iter()
                .enumerate()
                .map(|(i, m)| x.narrow(0, i, 1).unwrap().matmul(&m.t().unwrap()).unwrap())
                .collect();
            Tensor::cat(&outs, 0).unwrap()
        })
    });
    g.bench_function("build_batched_operands", |b| {
        b.iter(|| StepLora::batched(&refs, 1, DType::F32, &dev).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
