//! Every family trains through the one decoder, on the tiny random models of each
//! (`DecoderConfig::tiny_families`: BLOOM with ALiBi, LayerNorm and its fused
//! `query_key_value`, Llama, Qwen2 with biases, Qwen3 with q/k norms, Phi-3 with fused `qkv_proj`
//! and `gate_up_proj`, a Llama with every bias, Gemma 3 with sliding windows and sandwich
//! norms): the autograd gradient of every LoRA tensor equals finite differences; the training
//! forward's loss equals the inference path's log-probabilities on the same tokens; a short
//! run drives the loss down; and the adapter it writes (one `A` and one `B` per stored module,
//! as PEFT writes fused projections) loads in serving and computes what training computed.

mod common;

use candle_core::{Device, Tensor, D};
use common::*;
use loraplex::adapters::{load_adapter, AdapterMix, PeftConfig};
use loraplex::model::{BatchInput, Decoder, DecoderConfig, StepLora};
use loraplex::train::data::TrainExample;
use loraplex::train::params::LoraParams;
use loraplex::train::trainer::{batch_loss, train_on};
use loraplex::train::{TrainConfig, TrainOptions};
use std::sync::Arc;

/// The projections trained: attention in and out, and the MLP.
const TARGETS: [&str; 4] = ["q_proj", "v_proj", "up_proj", "down_proj"];

fn examples() -> Vec<TrainExample> {
    (0..6u32)
        .map(|i| {
            TrainExample::tail(
                (0..10 + i).map(|t| (t * 7 + i) % 60 + 3).collect(),
                vec![(i * 5) % 60 + 2, 11, 1],
            )
        })
        .collect()
}

/// The short runs' shared recipe: 30 steps of 3 examples, 2 warm-up steps, no checkpoints.
fn short_run(output: &std::path::Path) -> TrainOptions {
    TrainOptions {
        output: Some(output.to_path_buf()),
        steps: Some(30),
        batch_size: Some(3),
        warmup_steps: Some(2),
        max_seq_len: Some(64),
        checkpoint_every: Some(0),
        ..Default::default()
    }
}

fn peft(cfg: &DecoderConfig) -> PeftConfig {
    PeftConfig::from_json(&lora_config_for(cfg, 2, 4.0, &TARGETS).to_string()).unwrap()
}

fn training_lora(adapter: Arc<loraplex::adapters::LoraAdapter>, n: usize) -> StepLora {
    StepLora::Training { mixes: vec![AdapterMix::single(adapter, 1.0); n], dropout: 0.0, seed: 0 }
}

/// Mean negative log-probability of the targets under the inference path.
fn inference_loss(
    model: &Decoder,
    adapter: Arc<loraplex::adapters::LoraAdapter>,
    batch: &[&TrainExample],
) -> f64 {
    let mix = AdapterMix::single(adapter, 1.0);
    let (mut sum, mut n) = (0f64, 0usize);
    for ex in batch {
        let mut input = BatchInput::default();
        input.push(&ex.input);
        let lora = StepLora::per_row(&[&mix]);
        let hidden = model.forward(&input, None, &lora).unwrap();
        let logits = model.logits(&hidden).unwrap();
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec2::<f32>().unwrap();
        for (&p, &t) in ex.positions.iter().zip(&ex.targets) {
            sum -= lp[p as usize][t as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn every_family_matches_finite_differences_and_the_inference_path() {
    for (model, cfg) in tiny_all() {
        let family = cfg.arch.name.clone();
        let params = LoraParams::init(&cfg, peft(&cfg), 3, &Device::Cpu).unwrap();
        assert!(!params.modules.is_empty(), "{family}: nothing targeted");
        if cfg.arch.combined_modules {
            assert!(
                params.modules.len() < 4 * cfg.num_layers,
                "{family}: a fused module must be one A and one B"
            );
        }
        // B starts at zero (so A's gradient is zero); give it fixed values to test both.
        for (k, (_, _, b)) in params.modules.iter().enumerate() {
            let v: Vec<f32> =
                (0..b.elem_count()).map(|i| 0.3 * ((i * 7 + k * 13) as f32 * 0.37).sin()).collect();
            b.set(&Tensor::from_vec(v, b.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let ex = examples();
        let batch: Vec<&TrainExample> = ex.iter().take(3).collect();
        // The adapter is viewed again for each loss, as training does after each update.
        let lora_now =
            || training_lora(Arc::new(params.as_adapter(&cfg, "t").unwrap()), batch.len());
        let loss_of = || {
            batch_loss(&model, &lora_now(), &batch).unwrap().0.to_scalar::<f32>().unwrap() as f64
        };
        let (loss, _) = batch_loss(&model, &lora_now(), &batch).unwrap();
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for (path, a, b) in params.modules.iter().take(4) {
            for var in [a, b] {
                assert_grad_matches(var, &grads, loss_of, &format!("{family} {path}"));
                checked += 1;
            }
        }
        assert!(checked >= 4, "{family}: checked {checked}");
        // The training forward's loss is the inference path's mean negative log-probability.
        let train_loss = loss_of();
        let detached = Arc::new(params.detached_adapter(&cfg, "t").unwrap());
        let infer = inference_loss(&model, detached, &batch);
        assert!(
            (train_loss - infer).abs() <= 1e-4 * infer.abs().max(1.0),
            "{family}: training loss {train_loss} vs inference {infer}"
        );
    }
}

#[test]
fn every_family_trains_and_serves_what_it_trained() {
    for (model, cfg) in tiny_all() {
        let family = cfg.arch.name.clone();
        let dir = tempfile::tempdir().unwrap();
        let tc = TrainConfig::try_from(TrainOptions {
            rank: Some(4),
            alpha: Some(8.0),
            dropout: Some(0.0),
            target_modules: Some(targets_for(&cfg, &TARGETS)),
            lr: Some(3e-2),
            ..short_run(&dir.path().join("out"))
        })
        .unwrap();
        let ex: Vec<TrainExample> = examples().into_iter().take(3).collect();
        let o = train_on(&model, &ex, &tc, false, None).unwrap();
        let (first, last) = (o.log.first().unwrap().loss, o.log.last().unwrap().loss);
        assert!(last < 0.5 * first, "{family}: loss {first} → {last}");
        for (path, _, b) in &o.params.modules {
            let norm = b.as_tensor().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{family}: {path} never learned (its B is still zero)");
        }
        // Written as PEFT writes it (stored module paths), loaded as serving loads it.
        let out = dir.path().join("peft");
        loraplex::adapters::writer::save_modules(
            &out,
            &o.params.config,
            &o.params.export().unwrap(),
            &[],
        )
        .unwrap();
        let served = Arc::new(load_adapter(&out, "served", &cfg, &Device::Cpu).unwrap());
        let trained = Arc::new(o.params.detached_adapter(&cfg, "trained").unwrap());
        let batch: Vec<&TrainExample> = ex.iter().collect();
        let (a, b) =
            (inference_loss(&model, served, &batch), inference_loss(&model, trained, &batch));
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{family}: served {a} vs trained {b}");
    }
}

#[test]
fn a_target_the_architecture_lacks_is_refused_by_name() {
    let cfg = DecoderConfig::tiny_families().into_iter().find(|c| c.arch.name == "bloom").unwrap();
    let peft = PeftConfig::from_json(&lora_config(2, 4.0, &["q_proj"]).to_string()).unwrap();
    let e = LoraParams::init(&cfg, peft, 1, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("q_proj") && e.contains("query_key_value"), "{e}");
}

/// The LoRA tutorial's recipe: BLOOM, `target_modules=["query_key_value"]`, r 16, alpha 32,
/// dropout 0.05.
#[test]
fn the_tutorial_recipe_runs_on_the_tiny_bloom() {
    let (model, cfg) = tiny_all().into_iter().find(|(_, c)| c.arch.name == "bloom").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tc = TrainConfig::try_from(TrainOptions {
        rank: Some(16),
        alpha: Some(32.0),
        dropout: Some(0.05),
        target_modules: Some(vec!["query_key_value".into()]),
        lr: Some(2e-2),
        ..short_run(&dir.path().join("bloom-lora"))
    })
    .unwrap();
    let ex: Vec<TrainExample> = examples().into_iter().take(3).collect();
    let o = train_on(&model, &ex, &tc, false, None).unwrap();
    let (first, last) = (o.log.first().unwrap().loss, o.log.last().unwrap().loss);
    assert!(last < 0.7 * first, "loss {first} → {last}");
    let paths: Vec<&str> = o.params.modules.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(paths.len(), cfg.num_layers, "one query_key_value module per layer: {paths:?}");
    assert!(paths.iter().all(|p| p.ends_with("self_attention.query_key_value")), "{paths:?}");
}
