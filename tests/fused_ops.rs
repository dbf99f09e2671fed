//! The fused CPU kernels of the inference path against their references: each op against
//! candle's composition on random tensors, and whole forwards (prefill and decode with host KV
//! caches, LoRA mixes) of the fused model against the composed one on the same weights.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::adapters::{AdapterMix, MixEntry};
use loraplex::model::ops::{Exec, Kernels};
use loraplex::model::{BatchInput, Decoder, SeqCache, StepLora};

fn rand(shape: (usize, usize), seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-2.0..2.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Relative max difference: `max |a - b| / max |b|`.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-30);
    max_abs_diff(a, b) / scale
}

#[test]
fn norms_and_silu_mul_equal_their_compositions() {
    let (fused, composed) = (Kernels::new(2, Exec::Fused), Kernels::new(2, Exec::Composed));
    for &(n, h) in &[(1usize, 576usize), (7, 64), (33, 1536), (2, 17)] {
        let (x, y) = (rand((n, h), 1), rand((n, h), 2));
        let w = rand((1, h), 3).reshape(h).unwrap();
        let a = fused.rms_norm(&x, &w, 1e-5).unwrap();
        let b = composed.rms_norm(&x, &w, 1e-5).unwrap();
        assert!(rel(&a, &b) < 1e-6, "rms_norm {n}x{h}: {}", rel(&a, &b));
        let (s1, n1) = fused.add_rms_norm(&x, &y, &w, 1e-5).unwrap();
        let (s2, n2) = composed.add_rms_norm(&x, &y, &w, 1e-5).unwrap();
        assert_eq!(
            s1.to_vec2::<f32>().unwrap(),
            s2.to_vec2::<f32>().unwrap(),
            "residual sum {n}x{h}"
        );
        assert!(rel(&n1, &n2) < 1e-6, "add_rms_norm {n}x{h}: {}", rel(&n1, &n2));
        let g = (rand((n, h), 4) * 8.0).unwrap(); // saturating tails of the sigmoid too
        let a = fused.silu_mul(&g, &y).unwrap();
        let b = composed.silu_mul(&g, &y).unwrap();
        assert!(rel(&a, &b) < 1e-6, "silu_mul {n}x{h}: {}", rel(&a, &b));
    }
}

/// Prefill (ragged, with mixes) then three decode steps: the fused model (fused attention over
/// host caches, fused norms and LoRA kernel) equals the composed one (candle's ops, device
/// caches, stacked LoRA matmuls) within float tolerance, and both agree without caches.
#[test]
fn the_fused_forward_equals_the_composed_forward() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let a = tiny_adapter(
            dir.path(),
            "a",
            &cfg,
            lora_config_for(&cfg, 4, 8.0, &["q_proj", "v_proj", "down_proj"]),
            1,
        );
        let b = tiny_adapter(
            dir.path(),
            "b",
            &cfg,
            lora_config_for(&cfg, 8, 4.0, &["o_proj", "gate_proj", "k_proj"]),
            2,
        );
        let mixes = [
            AdapterMix::single(a.clone(), 1.0),
            AdapterMix::default(),
            AdapterMix::new(vec![
                MixEntry { adapter: a, scale: 0.5 },
                MixEntry { adapter: b, scale: -1.5 },
            ]),
        ];
        let prompts: Vec<Vec<u32>> = vec![
            (0..37).map(|i| (i * 7 % 64) as u32).collect(),
            vec![5],
            vec![9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15, 16, 17, 18],
        ];
        let refs: Vec<&AdapterMix> = mixes.iter().collect();
        let composed = model.with_exec(Exec::Composed);
        let run = |m: &Decoder, lora: &StepLora| -> Vec<Tensor> {
            let mut caches: Vec<SeqCache> =
                prompts.iter().map(|p| SeqCache::new(cfg.num_layers, p.len() + 4)).collect();
            let mut input = BatchInput::default();
            prompts.iter().for_each(|p| input.push(p));
            let mut out = Vec::new();
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            out.push(m.logits(&m.forward(&input, Some(&mut refs), lora).unwrap()).unwrap());
            for t in 0..3u32 {
                let mut step = BatchInput::default();
                (0..prompts.len()).for_each(|i| step.push(&[(t * 13 + i as u32) % 64]));
                let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
                out.push(m.logits(&m.forward(&step, Some(&mut refs), lora).unwrap()).unwrap());
            }
            out
        };
        let fused_out = run(
            &model,
            &StepLora::batched(&refs, cfg.num_layers, DType::F32, &Device::Cpu).unwrap(),
        );
        let composed_out =
            run(&composed, &StepLora::stacked(&refs, cfg.num_layers, &Device::Cpu).unwrap());
        for (step, (f, c)) in fused_out.iter().zip(&composed_out).enumerate() {
            assert!(rel(f, c) < 1e-5, "step {step}: {}", rel(f, c));
        }
        let mut input = BatchInput::default();
        prompts.iter().for_each(|p| input.push(p));
        let lora = StepLora::batched(&refs, cfg.num_layers, DType::F32, &Device::Cpu).unwrap();
        let f = model.logits(&model.forward(&input, None, &lora).unwrap()).unwrap();
        let c = composed.logits(&composed.forward(&input, None, &lora).unwrap()).unwrap();
        assert!(rel(&f, &c) < 1e-5, "no cache: {}", rel(&f, &c));
        assert!(rel(&f, &fused_out[0]) < 1e-5, "cached prefill = uncached prefill");
    }
}

/// Long prompts cross the attention kernel's 16-query blocks and 16-key tiles at odd offsets.
#[test]
fn fused_attention_handles_long_and_chunked_prompts() {
    for (model, cfg) in tiny_all() {
        let composed = model.with_exec(Exec::Composed);
        let prompt: Vec<u32> = (0..83).map(|i| (i * 11 % 64) as u32).collect();
        let mut outs = Vec::new();
        for m in [&model, &composed] {
            // The prompt in two chunks (prefill continuing from a cache), then one decode step.
            let mut cache = [SeqCache::new(cfg.num_layers, 100)];
            let mut logits = Vec::new();
            for part in [&prompt[..50], &prompt[50..], &[3u32][..]] {
                let mut input = BatchInput::default();
                input.push(part);
                let mut refs: Vec<&mut SeqCache> = cache.iter_mut().collect();
                logits.push(
                    m.logits(&m.forward(&input, Some(&mut refs), &StepLora::None).unwrap())
                        .unwrap(),
                );
            }
            outs.push(Tensor::cat(&logits, 0).unwrap());
        }
        assert!(rel(&outs[0], &outs[1]) < 1e-5, "{}", rel(&outs[0], &outs[1]));
    }
}
