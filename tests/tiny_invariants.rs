//! LoRA invariants on a tiny random model built in code (no files but temporary adapters):
//! zero scale = base, B = 0 = base, linearity in the scales, merged = unmerged, the batched
//! fast path = the per-row reference, batch invariance across mixes, ranks and lengths — for
//! every architecture description (`DecoderConfig::tiny_families`).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::adapters::{AdapterMix, MixEntry};
use loraplex::model::{BatchInput, Decoder, ModuleId, SeqCache, StepLora, Target};

/// All-position logits of one prompt run alone (no cache), with `mix` on the given path.
fn logits_alone(model: &Decoder, prompt: &[u32], mix: &AdapterMix, batched: bool) -> Tensor {
    let mut input = BatchInput::default();
    input.push(prompt);
    let lora = step(model, &[mix], batched);
    let h = model.forward(&input, None, &lora).unwrap();
    model.logits(&h).unwrap()
}

fn step(model: &Decoder, mixes: &[&AdapterMix], batched: bool) -> StepLora {
    if batched {
        StepLora::batched(mixes, model.cfg.num_layers, model.dtype(), &Device::Cpu).unwrap()
    } else {
        StepLora::per_row(mixes)
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 12, 3], vec![7, 2], vec![40, 41, 42, 43, 44, 45, 46, 47], vec![11]]
}

#[test]
fn zero_scale_is_bit_for_bit_the_base() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let a = tiny_adapter(
            dir.path(),
            "a",
            &cfg,
            lora_config_for(&cfg, 4, 8.0, &["q_proj", "v_proj", "down_proj"]),
            1,
        );
        let prompt = &prompts()[0];
        let base = logits_alone(&model, prompt, &AdapterMix::default(), true);
        for batched in [true, false] {
            let zero = logits_alone(&model, prompt, &AdapterMix::single(a.clone(), 0.0), batched);
            assert_eq!(
                base.to_vec2::<f32>().unwrap(),
                zero.to_vec2::<f32>().unwrap(),
                "batched={batched}"
            );
            let one = logits_alone(&model, prompt, &AdapterMix::single(a.clone(), 1.0), batched);
            assert!(max_abs_diff(&base, &one) > 1e-3, "the adapter must visibly change the output");
        }
    }
}

#[test]
fn zero_b_is_bit_for_bit_the_base() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let json = lora_config_for(&cfg, 4, 8.0, &["q_proj", "o_proj", "up_proj"]);
        let config = loraplex::adapters::PeftConfig::from_json(&json.to_string()).unwrap();
        let weights: Vec<_> = stored_modules(&cfg)
            .into_iter()
            .filter(|(path, layer, _, _)| config.targets_module(path, *layer))
            .map(|(path, _, fan_in, fan_out)| {
                let a = Tensor::ones((4, fan_in), candle_core::DType::F32, &Device::Cpu).unwrap();
                let b = Tensor::zeros((fan_out, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
                (path, a, b)
            })
            .collect();
        let path = dir.path().join("zero-b");
        loraplex::adapters::writer::save_modules(&path, &config, &weights, &[]).unwrap();
        let adapter = std::sync::Arc::new(
            loraplex::adapters::load_adapter(&path, "zero-b", &cfg, &Device::Cpu).unwrap(),
        );
        let prompt = &prompts()[2];
        let base = logits_alone(&model, prompt, &AdapterMix::default(), true);
        for batched in [true, false] {
            let with =
                logits_alone(&model, prompt, &AdapterMix::single(adapter.clone(), 1.0), batched);
            assert_eq!(
                base.to_vec2::<f32>().unwrap(),
                with.to_vec2::<f32>().unwrap(),
                "batched={batched}"
            );
        }
    }
}

#[test]
fn layer_deltas_are_linear_in_the_scales() {
    let (_, cfg) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let a = tiny_adapter(dir.path(), "a", &cfg, lora_config_for(&cfg, 4, 8.0, &["q_proj"]), 1);
    let b = tiny_adapter(
        dir.path(),
        "b",
        &cfg,
        lora_config_for(&cfg, 2, 3.0, &["q_proj", "k_proj"]),
        2,
    );
    let x = Tensor::randn(0f32, 1.0, (3, cfg.hidden_size), &Device::Cpu).unwrap();
    let id = ModuleId { layer: 1, target: Target::Q };
    let delta = |mix: AdapterMix, batched: bool| {
        let lora = if batched {
            StepLora::batched(&[&mix], cfg.num_layers, candle_core::DType::F32, &Device::Cpu)
                .unwrap()
        } else {
            StepLora::per_row(&[&mix])
        };
        lora.delta(id, &x, &[3]).unwrap().unwrap()
    };
    let (w1, w2) = (0.7, -1.3);
    for batched in [true, false] {
        let da = delta(AdapterMix::single(a.clone(), 1.0), batched);
        let db = delta(AdapterMix::single(b.clone(), 1.0), batched);
        let mixed = delta(
            AdapterMix::new(vec![
                MixEntry { adapter: a.clone(), scale: w1 },
                MixEntry { adapter: b.clone(), scale: w2 },
            ]),
            batched,
        );
        let expected = ((da * w1).unwrap() + (db * w2).unwrap()).unwrap();
        assert!(max_abs_diff(&mixed, &expected) < 1e-5, "batched={batched}");
    }
    // k_proj: only `b` targets it, so a mix gives exactly b's scaled delta there.
    let kid = ModuleId { layer: 0, target: Target::K };
    let only_a = StepLora::batched(
        &[&AdapterMix::single(a.clone(), 1.0)],
        cfg.num_layers,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        only_a.delta(kid, &x, &[3]).unwrap().is_none(),
        "a module the adapter does not target gets no delta"
    );
}

#[test]
fn merged_weights_equal_the_unmerged_paths() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let a = tiny_adapter(
            dir.path(),
            "a",
            &cfg,
            lora_config_for(&cfg, 4, 8.0, &["q_proj", "v_proj", "gate_proj"]),
            1,
        );
        let b = tiny_adapter(
            dir.path(),
            "b",
            &cfg,
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": true, "target_modules": "all-linear"}),
            2,
        );
        let mix = AdapterMix::new(vec![
            MixEntry { adapter: a, scale: 0.6 },
            MixEntry { adapter: b, scale: -0.4 },
        ]);
        let prompt = &prompts()[2];
        let merged = model.merged(&mix).unwrap();
        let want = logits_alone(&merged, prompt, &AdapterMix::default(), true);
        for batched in [true, false] {
            let got = logits_alone(&model, prompt, &mix, batched);
            assert!(
                max_abs_diff(&want, &got) < 1e-4,
                "batched={batched}: {}",
                max_abs_diff(&want, &got)
            );
        }
    }
}

/// Several sequences with different mixes, ranks, targets and prompt lengths, prefilled and
/// decoded together with caches, give the same logits as each sequence run alone.
#[test]
fn a_row_in_a_mixed_batch_equals_the_row_alone() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let a = tiny_adapter(
            dir.path(),
            "a",
            &cfg,
            lora_config_for(&cfg, 4, 8.0, &["q_proj", "v_proj"]),
            1,
        );
        let b = tiny_adapter(
            dir.path(),
            "b",
            &cfg,
            lora_config_for(&cfg, 8, 4.0, &["o_proj", "up_proj", "down_proj"]),
            2,
        );
        let c = tiny_adapter(
            dir.path(),
            "c",
            &cfg,
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_rslora": true, "target_modules": "all-linear"}),
            3,
        );
        let mixes = [
            AdapterMix::single(a.clone(), 1.0),
            AdapterMix::default(),
            AdapterMix::new(vec![
                MixEntry { adapter: b.clone(), scale: 0.5 },
                MixEntry { adapter: c.clone(), scale: -2.0 },
            ]),
            AdapterMix::new(vec![
                MixEntry { adapter: a, scale: 0.3 },
                MixEntry { adapter: b, scale: 0.3 },
                MixEntry { adapter: c, scale: 0.3 },
            ]),
        ];
        let prompts = prompts();
        let next_tokens = [3u32, 17, 29, 63];
        for batched in [true, false] {
            // Batched: prefill all, then one decode step for all.
            let mut caches: Vec<SeqCache> =
                prompts.iter().map(|_| SeqCache::new(cfg.num_layers, 16)).collect();
            let mix_refs: Vec<&AdapterMix> = mixes.iter().collect();
            let lora = step(&model, &mix_refs, batched);
            let mut input = BatchInput::default();
            prompts.iter().for_each(|p| input.push(p));
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let prefill =
                model.logits(&model.forward(&input, Some(&mut refs), &lora).unwrap()).unwrap();
            let mut dec = BatchInput::default();
            next_tokens.iter().for_each(|t| dec.push(&[*t]));
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let decode =
                model.logits(&model.forward(&dec, Some(&mut refs), &lora).unwrap()).unwrap();
            let mut offset = 0;
            for (i, p) in prompts.iter().enumerate() {
                let mut full = p.clone();
                full.push(next_tokens[i]);
                let alone = logits_alone(&model, &full, &mixes[i], batched);
                let got_prefill = prefill.narrow(0, offset, p.len()).unwrap();
                let d1 = max_abs_diff(&alone.narrow(0, 0, p.len()).unwrap(), &got_prefill);
                let d2 = max_abs_diff(
                    &alone.narrow(0, p.len(), 1).unwrap(),
                    &decode.narrow(0, i, 1).unwrap(),
                );
                assert!(
                    d1 < 1e-4 && d2 < 1e-4,
                    "row {i} batched={batched}: prefill {d1}, decode {d2}"
                );
                offset += p.len();
            }
        }
    }
}

#[test]
fn batched_fast_path_agrees_with_the_per_row_reference() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let a = tiny_adapter(
            dir.path(),
            "a",
            &cfg,
            lora_config_for(&cfg, 4, 8.0, &["q_proj", "k_proj", "v_proj", "o_proj"]),
            1,
        );
        let b = tiny_adapter(
            dir.path(),
            "b",
            &cfg,
            lora_config_for(&cfg, 16, 16.0, &["gate_proj", "up_proj", "down_proj", "q_proj"]),
            2,
        );
        let mixes = [
            AdapterMix::single(a.clone(), 2.0),
            AdapterMix::single(b.clone(), -1.0),
            AdapterMix::new(vec![
                MixEntry { adapter: a, scale: 0.5 },
                MixEntry { adapter: b, scale: 0.5 },
            ]),
            AdapterMix::default(),
        ];
        let refs: Vec<&AdapterMix> = mixes.iter().collect();
        let mut input = BatchInput::default();
        prompts().iter().for_each(|p| input.push(p));
        let fast = model.forward(&input, None, &step(&model, &refs, true)).unwrap();
        let slow = model.forward(&input, None, &step(&model, &refs, false)).unwrap();
        assert!(max_abs_diff(&fast, &slow) < 1e-5);
    }
}

#[test]
fn rank_and_alpha_patterns_set_per_layer_scaling() {
    let (_, cfg) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let json = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}
    });
    let a = tiny_adapter(dir.path(), "p", &cfg, json, 1);
    let q0 = a.module(ModuleId { layer: 0, target: Target::Q }).unwrap();
    let q1 = a.module(ModuleId { layer: 1, target: Target::Q }).unwrap();
    let v1 = a.module(ModuleId { layer: 1, target: Target::V }).unwrap();
    assert_eq!((q0.rank, q0.scaling), (4, 2.0));
    assert_eq!((q1.rank, q1.scaling), (2, 4.0));
    assert_eq!((v1.rank, v1.scaling), (4, 0.75));
    let rs = tiny_adapter(
        dir.path(),
        "rs",
        &cfg,
        serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"], "layers_to_transform": [1]}),
        2,
    );
    assert!(
        rs.module(ModuleId { layer: 0, target: Target::Q }).is_none(),
        "layers_to_transform excludes layer 0"
    );
    assert_eq!(rs.module(ModuleId { layer: 1, target: Target::Q }).unwrap().scaling, 4.0);
}
