//! The packed integer path (`--dtype auto` on CPU) on a tiny random model whose weights went
//! through Q4_1, as a GGUF's do: a row's logits are bit for bit the same whatever else shares
//! its batch (mixes, ranks, lengths, prefill or decode; for every architecture description), zero scale is bit for bit the base,
//! deltas stay linear in the scales, and the packed model tracks the same weights in f32.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::adapters::{AdapterMix, MixEntry};
use loraplex::model::{BatchInput, Decoder, DecoderConfig, SeqCache, StepLora, WeightFormat};

fn packed() -> (Decoder, DecoderConfig) {
    let cfg = DecoderConfig::tiny_packable();
    (Decoder::random_with(cfg.clone(), 11, &Device::Cpu, WeightFormat::Packed).unwrap(), cfg)
}

/// [`packed`] once per architecture description (`DecoderConfig::tiny_families`).
fn packed_families() -> Vec<(Decoder, DecoderConfig)> {
    DecoderConfig::tiny_families()
        .into_iter()
        .map(|f| {
            let kv = if f.num_kv_heads == f.num_heads { 4 } else { 2 };
            let cfg =
                DecoderConfig { arch: f.arch, num_kv_heads: kv, ..DecoderConfig::tiny_packable() };
            (
                Decoder::random_with(cfg.clone(), 11, &Device::Cpu, WeightFormat::Packed).unwrap(),
                cfg,
            )
        })
        .collect()
}

fn lora(model: &Decoder, mixes: &[&AdapterMix]) -> StepLora {
    StepLora::batched(mixes, model.cfg.num_layers, DType::F32, &Device::Cpu).unwrap()
}

fn alone(model: &Decoder, prompt: &[u32], mix: &AdapterMix) -> Vec<Vec<f32>> {
    let mut input = BatchInput::default();
    input.push(prompt);
    let h = model.forward(&input, None, &lora(model, &[mix])).unwrap();
    model.logits(&h).unwrap().to_vec2().unwrap()
}

#[test]
fn a_row_in_a_mixed_batch_is_bit_identical_to_the_row_alone() {
    for (model, cfg) in packed_families() {
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
        let mixes = [
            AdapterMix::single(a.clone(), 1.0),
            AdapterMix::default(),
            AdapterMix::new(vec![
                MixEntry { adapter: a, scale: 0.3 },
                MixEntry { adapter: b, scale: -0.7 },
            ]),
        ];
        let prompts: Vec<Vec<u32>> = vec![
            (0..21).map(|i| (i * 5 % 96) as u32).collect(),
            vec![4, 8],
            (0..40).map(|i| (i * 3 % 96) as u32).collect(),
        ];
        let next = [7u32, 19, 88];
        let refs: Vec<&AdapterMix> = mixes.iter().collect();
        let step_lora = lora(&model, &refs);
        let mut caches: Vec<SeqCache> =
            prompts.iter().map(|p| SeqCache::new(cfg.num_layers, p.len() + 1)).collect();
        let mut input = BatchInput::default();
        prompts.iter().for_each(|p| input.push(p));
        let mut cache_refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let prefill: Vec<Vec<f32>> = model
            .logits(&model.forward(&input, Some(&mut cache_refs), &step_lora).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut step = BatchInput::default();
        next.iter().for_each(|t| step.push(&[*t]));
        let mut cache_refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let decode: Vec<Vec<f32>> = model
            .logits(&model.forward(&step, Some(&mut cache_refs), &step_lora).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut offset = 0;
        for (i, p) in prompts.iter().enumerate() {
            let mut full = p.clone();
            full.push(next[i]);
            let want = alone(&model, &full, &mixes[i]);
            assert_eq!(
                &prefill[offset..offset + p.len()],
                &want[..p.len()],
                "{}: row {i}: prefill",
                cfg.arch.name
            );
            assert_eq!(decode[i], want[p.len()], "{}: row {i}: decode", cfg.arch.name);
            offset += p.len();
        }
    }
}

#[test]
fn zero_scale_is_bit_for_bit_the_base_and_mixes_are_linear() {
    let (model, cfg) = packed();
    let dir = tempfile::tempdir().unwrap();
    let a = tiny_adapter(dir.path(), "a", &cfg, lora_config(4, 8.0, &["q_proj", "down_proj"]), 3);
    let b = tiny_adapter(dir.path(), "b", &cfg, lora_config(2, 2.0, &["q_proj", "k_proj"]), 4);
    let prompt: Vec<u32> = (0..9).collect();
    let base = alone(&model, &prompt, &AdapterMix::default());
    assert_eq!(alone(&model, &prompt, &AdapterMix::single(a.clone(), 0.0)), base);
    assert_ne!(alone(&model, &prompt, &AdapterMix::single(a.clone(), 1.0)), base);
    // One layer's delta on the packed path's LoRA kernel.
    let x = Tensor::randn(0f32, 1.0, (3, cfg.hidden_size), &Device::Cpu).unwrap();
    let id = loraplex::model::ModuleId { layer: 1, target: loraplex::model::Target::Q };
    let delta = |mix: AdapterMix| lora(&model, &[&mix]).delta(id, &x, &[3]).unwrap().unwrap();
    let (w1, w2) = (0.7, -1.3);
    let mixed = delta(AdapterMix::new(vec![
        MixEntry { adapter: a.clone(), scale: w1 },
        MixEntry { adapter: b.clone(), scale: w2 },
    ]));
    let want = ((delta(AdapterMix::single(a, 1.0)) * w1).unwrap()
        + (delta(AdapterMix::single(b, 1.0)) * w2).unwrap())
    .unwrap();
    assert!(max_abs_diff(&mixed, &want) < 1e-5);
}

/// The packed model against the same weights dequantized to f32 (the exact path): they differ
/// only by the 8-bit activations inside each matmul, a small fraction of the logits' spread.
#[test]
fn the_packed_model_tracks_its_weights_in_f32() {
    let (model, cfg) = packed();
    let dense = model.dense_f32().unwrap();
    let prompt: Vec<u32> = (0..30).map(|i| (i * 13 % 96) as u32).collect();
    let dir = tempfile::tempdir().unwrap();
    let a = tiny_adapter(
        dir.path(),
        "a",
        &cfg,
        lora_config(4, 8.0, &["q_proj", "v_proj", "gate_proj"]),
        5,
    );
    for mix in [AdapterMix::default(), AdapterMix::single(a, 1.0)] {
        let p = Tensor::new(alone(&model, &prompt, &mix), &Device::Cpu).unwrap();
        let d = Tensor::new(alone(&dense, &prompt, &mix), &Device::Cpu).unwrap();
        let spread = d
            .max_keepdim(1)
            .unwrap()
            .sub(&d.min_keepdim(1).unwrap())
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_diff(&p, &d);
        assert!(diff < 0.05 * spread, "max |Δlogit| {diff} vs mean spread {spread}");
        let same_top1 = p
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .zip(d.argmax(1).unwrap().to_vec1::<u32>().unwrap())
            .filter(|(a, b)| **a == *b)
            .count();
        assert!(same_top1 >= 27, "top-1 agreement {same_top1}/30");
    }
}

/// Training through the packed weights (what a fine-tuning job on a `--dtype auto` server
/// does): the training forward's loss is the served path's, its gradient agrees with the one
/// computed on the same weights in f32 (up to the activations' 8-bit rounding), and a short run
/// drives the loss down.
#[test]
fn the_packed_model_trains_through_its_own_kernel() {
    use loraplex::adapters::PeftConfig;
    use loraplex::train::data::TrainExample;
    use loraplex::train::params::LoraParams;
    use loraplex::train::trainer::{batch_loss, mean_loss, train_on};
    use std::sync::Arc;
    let (model, cfg) = packed();
    let dense = model.dense_f32().unwrap();
    let ex: Vec<TrainExample> = (0..4u32)
        .map(|i| {
            TrainExample::tail((0..12 + i).map(|t| (t * 5 + i) % 90 + 3).collect(), vec![7 + i, 1])
        })
        .collect();
    let batch: Vec<&TrainExample> = ex.iter().collect();
    let targets = ["q_proj", "v_proj", "down_proj"];
    let peft = PeftConfig::from_json(&lora_config(4, 8.0, &targets).to_string()).unwrap();
    let params = LoraParams::init(&cfg, peft, 3, &Device::Cpu).unwrap();
    let grads_on = |m: &Decoder| {
        let adapter = Arc::new(params.as_adapter(&cfg, "t").unwrap());
        let mixes = vec![AdapterMix::single(adapter, 1.0); batch.len()];
        let lora = StepLora::Training { mixes, dropout: 0.0, seed: 0 };
        let (loss, _) = batch_loss(m, &lora, &batch).unwrap();
        let g = loss.backward().unwrap();
        let flat: Vec<f32> = params
            .modules
            .iter()
            .flat_map(|(_, _, b)| {
                g.get(b).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        flat
    };
    let (gp, gd) = (grads_on(&model), grads_on(&dense));
    let dot: f32 = gp.iter().zip(&gd).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cosine = dot / (norm(&gp) * norm(&gd));
    assert!(norm(&gp) > 0.0 && cosine > 0.99, "packed vs f32 gradient: cosine {cosine}");

    let adapter = Arc::new(params.detached_adapter(&cfg, "t").unwrap());
    let trained = mean_loss(&model, &adapter, &ex, 4).unwrap();
    let served = {
        let mix = AdapterMix::single(adapter.clone(), 1.0);
        let (mut sum, mut n) = (0f64, 0usize);
        for e in &ex {
            let logits = alone(&model, &e.input, &mix);
            for (&p, &t) in e.positions.iter().zip(&e.targets) {
                let row = &logits[p as usize];
                let max = row.iter().cloned().fold(f32::MIN, f32::max);
                let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
                sum += (lse - row[t as usize]) as f64;
                n += 1;
            }
        }
        sum / n as f64
    };
    assert!((trained - served).abs() < 1e-3 * served.abs().max(1.0), "{trained} vs {served}");

    let dir = tempfile::tempdir().unwrap();
    let tc = loraplex::train::TrainConfig::try_from(loraplex::train::TrainOptions {
        output: Some(dir.path().join("out")),
        rank: Some(4),
        alpha: Some(8.0),
        dropout: Some(0.0),
        target_modules: Some(targets.map(String::from).to_vec()),
        steps: Some(25),
        batch_size: Some(4),
        lr: Some(3e-2),
        warmup_steps: Some(2),
        checkpoint_every: Some(0),
        ..Default::default()
    })
    .unwrap();
    let o = train_on(&model, &ex, &tc, false, None).unwrap();
    let (first, last) = (o.log[0].loss, o.log.last().unwrap().loss);
    assert!(last < 0.5 * first, "loss {first} → {last}");
}
