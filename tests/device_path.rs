//! The path a CUDA device runs, exercised on the CPU: bf16 dense weights and activations,
//! candle's composed attention over head-major device KV caches, the stacked LoRA operands
//! (f32, whatever the activation dtype) and the batcher's one-op greedy pick. The same code
//! runs on CUDA with the tensors on the GPU; `scripts/gpu-check.sh` checks it there against PEFT.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::adapters::{AdapterMix, MixEntry};
use loraplex::model::kv_cache::block_bytes;
use loraplex::model::{BatchInput, Decoder, ModuleId, SeqCache, StepLora, WeightFormat};

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
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
    max_abs_diff(&a, &b) / scale
}

fn random_rows(n: usize, width: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * width).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, (n, width), &Device::Cpu).unwrap()
}

/// With bf16 activations the stacked delta is computed in f32 and rounded once: exactly the
/// f32 computation on the (exactly widened) bf16 input, rounded to bf16 at the end. A bf16
/// accumulation (x·A rounded, then ·B) would not be bit-equal to that.
#[test]
fn stacked_lora_deltas_accumulate_in_f32_and_round_once() {
    let (_, cfg) = tiny();
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
        lora_config_for(&cfg, 8, 4.0, &["q_proj", "gate_proj"]),
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
    let refs: Vec<&AdapterMix> = mixes.iter().collect();
    let lens = [3usize, 1, 2];
    let stacked = StepLora::stacked(&refs, cfg.num_layers, &Device::Cpu).unwrap();
    let per_row = StepLora::per_row(&refs);
    let mut checked = 0;
    for id in ModuleId::all(cfg.num_layers) {
        let x = random_rows(6, cfg.proj_dims(id.target).0, id.index() as u64);
        let x_bf = x.to_dtype(DType::BF16).unwrap();
        let Some(d_bf) = stacked.delta(id, &x_bf, &lens).unwrap() else { continue };
        assert_eq!(
            d_bf.dtype(),
            DType::BF16,
            "{id:?}: the delta comes back in the activation dtype"
        );
        let widened = x_bf.to_dtype(DType::F32).unwrap();
        let d_f32 = stacked.delta(id, &widened, &lens).unwrap().unwrap();
        let once: Vec<Vec<f32>> =
            d_f32.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        assert_eq!(d_bf.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(), once, "{id:?}");
        // And it is PEFT's delta: the per-row reference in f32 on the same input.
        let reference = per_row.delta(id, &widened, &lens).unwrap().unwrap();
        assert!(rel(&d_f32, &reference) < 1e-5, "{id:?}: {}", rel(&d_f32, &reference));
        checked += 1;
    }
    assert!(checked >= 2 * cfg.num_layers, "only {checked} modules had terms");
}

/// Prefill (ragged, mixed adapters) and decode steps of the bf16 model over device caches
/// track the f32 model on the same weights within bf16's precision, for every family.
#[test]
fn the_bf16_device_path_tracks_the_f32_model() {
    for (f32_model, cfg) in tiny_all() {
        let bf16 =
            Decoder::random_with(cfg.clone(), 7, &Device::Cpu, WeightFormat::Dense(DType::BF16))
                .unwrap();
        assert!(!bf16.host_kv(), "bf16 runs the composed attention over device caches");
        // The KV pool counts a bf16 device cache at 2 bytes a value, f32 host blocks at 4.
        assert!(f32_model.host_kv());
        let (layers, width) = (cfg.num_layers, f32_model.kv_width());
        assert_eq!(
            (bf16.kv_block_bytes(), f32_model.kv_block_bytes()),
            (block_bytes(layers, width, 2), block_bytes(layers, width, 4))
        );
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
        let refs: Vec<&AdapterMix> = mixes.iter().collect();
        let prompts: Vec<Vec<u32>> = vec![
            (0..37).map(|i| (i * 7 % 64) as u32).collect(),
            vec![5],
            vec![9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12],
        ];
        let run = |m: &Decoder| -> Vec<Tensor> {
            let lora = StepLora::batched(&refs, cfg.num_layers, m.dtype(), m.device()).unwrap();
            let mut caches: Vec<SeqCache> =
                prompts.iter().map(|p| SeqCache::new(cfg.num_layers, p.len() + 4)).collect();
            let mut input = BatchInput::default();
            prompts.iter().for_each(|p| input.push(p));
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let mut out =
                vec![m.logits(&m.forward(&input, Some(&mut refs), &lora).unwrap()).unwrap()];
            for t in 0..3u32 {
                let mut step = BatchInput::default();
                (0..prompts.len()).for_each(|i| step.push(&[(t * 13 + i as u32) % 64]));
                let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
                out.push(m.logits(&m.forward(&step, Some(&mut refs), &lora).unwrap()).unwrap());
            }
            out
        };
        let (want, got) = (run(&f32_model), run(&bf16));
        for (step, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(g.dtype(), DType::F32, "logits are f32");
            let r = rel(g, w);
            assert!(r < 0.05, "{} step {step}: relative logit difference {r}", cfg.arch.name);
        }
    }
}
