//! DoRA invariants on the tiny random model of every architecture description (biases,
//! combined q/k/v and gate/up modules, gateless MLPs): the fused host path, the stacked path
//! and the per-row reference agree, with fused and with composed ops; merged DoRA weights
//! equal the unmerged forward; DoRA and plain rows batched together with caches equal each
//! row alone; and the PEFT semantics (order matters, scale 0 is not the base) hold in every
//! family.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::adapters::{load_adapter_on, AdapterMix, LoraAdapter, MixEntry};
use loraplex::model::{BatchInput, Decoder, DecoderConfig, SeqCache, StepLora};
use std::path::Path;
use std::sync::Arc;

fn dora(
    root: &Path,
    name: &str,
    model: &Decoder,
    json: serde_json::Value,
    seed: u64,
) -> Arc<LoraAdapter> {
    let dir = root.join(name);
    write_random_dora_adapter(&dir, model, &json, seed);
    let base = model.projections();
    Arc::new(load_adapter_on(&dir, name, &model.cfg, &Device::Cpu, Some(&base)).unwrap())
}

fn mix(entries: &[(&Arc<LoraAdapter>, f64)]) -> AdapterMix {
    AdapterMix::new(
        entries.iter().map(|(a, s)| MixEntry { adapter: (*a).clone(), scale: *s }).collect(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path3 {
    Fused,
    Stacked,
    PerRow,
}

fn step(model: &Decoder, mixes: &[&AdapterMix], path: Path3) -> StepLora {
    let n = model.cfg.num_layers;
    match path {
        Path3::Fused => StepLora::batched(mixes, n, model.dtype(), &Device::Cpu).unwrap(),
        Path3::Stacked => StepLora::stacked(mixes, n, &Device::Cpu).unwrap(),
        Path3::PerRow => StepLora::per_row(mixes),
    }
}

fn logits_alone(model: &Decoder, prompt: &[u32], mix: &AdapterMix, path: Path3) -> Tensor {
    let mut input = BatchInput::default();
    input.push(prompt);
    let h = model.forward(&input, None, &step(model, &[mix], path)).unwrap();
    model.logits(&h).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 12, 3], vec![7, 2], vec![40, 41, 42, 43, 44, 45, 46, 47], vec![11]]
}

/// A DoRA adapter on attention and MLP projections, a plain one, and the mixes of them the
/// tests run, for one family.
fn family_mixes(model: &Decoder, cfg: &DecoderConfig, root: &Path) -> Vec<AdapterMix> {
    let d = dora(
        root,
        "d",
        model,
        lora_config_for(cfg, 4, 8.0, &["q_proj", "v_proj", "o_proj", "down_proj"]),
        1,
    );
    let p = tiny_adapter(root, "p", cfg, lora_config_for(cfg, 2, 4.0, &["q_proj", "up_proj"]), 2);
    vec![
        mix(&[(&d, 1.0)]),
        mix(&[(&d, 0.6), (&p, -0.5)]),
        mix(&[(&p, 0.7), (&d, -0.4)]),
        mix(&[(&d, 0.0)]),
        AdapterMix::default(),
        mix(&[(&p, 1.0)]),
    ]
}

#[test]
fn fused_stacked_per_row_and_merged_agree() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let prompt = &prompts()[2];
        for (i, m) in family_mixes(&model, &cfg, dir.path()).iter().enumerate() {
            let want = logits_alone(
                &model.merged(m).unwrap(),
                prompt,
                &AdapterMix::default(),
                Path3::Fused,
            );
            // The composed-ops model runs the host operands through `StepLora::apply`.
            let composed = model.with_exec(loraplex::model::Exec::Composed);
            for (what, model) in [("fused ops", &model), ("composed ops", &composed)] {
                for path in [Path3::Fused, Path3::Stacked, Path3::PerRow] {
                    let got = logits_alone(model, prompt, m, path);
                    let d = max_abs_diff(&want, &got);
                    assert!(d < 1e-4, "{:?} {what} mix {i} {path:?}: {d}", cfg.arch.name);
                }
            }
        }
    }
}

#[test]
fn order_matters_and_scale_0_is_not_the_base() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dora(
            dir.path(),
            "d",
            &model,
            lora_config_for(&cfg, 4, 8.0, &["q_proj", "v_proj", "down_proj"]),
            1,
        );
        let p = tiny_adapter(
            dir.path(),
            "p",
            &cfg,
            lora_config_for(&cfg, 2, 4.0, &["q_proj", "v_proj"]),
            2,
        );
        let prompt = &prompts()[0];
        let one = logits_alone(&model, prompt, &mix(&[(&d, 1.0), (&p, 1.0)]), Path3::Fused);
        let other = logits_alone(&model, prompt, &mix(&[(&p, 1.0), (&d, 1.0)]), Path3::Fused);
        assert!(max_abs_diff(&one, &other) > 1e-3, "{:?}: order", cfg.arch.name);
        let base = logits_alone(&model, prompt, &AdapterMix::default(), Path3::Fused);
        let zero = logits_alone(&model, prompt, &mix(&[(&d, 0.0)]), Path3::Fused);
        assert!(max_abs_diff(&base, &zero) > 1e-3, "{:?}: scale 0", cfg.arch.name);
    }
}

/// Rows with DoRA, plain, mixed and no adapters prefilled and decoded together with caches
/// give the logits each row gets alone.
#[test]
fn dora_rows_in_a_mixed_batch_equal_each_alone() {
    for (model, cfg) in tiny_all() {
        let dir = tempfile::tempdir().unwrap();
        let mixes = family_mixes(&model, &cfg, dir.path());
        let prompts: Vec<Vec<u32>> = (0..mixes.len()).map(|i| prompts()[i % 4].clone()).collect();
        for path in [Path3::Fused, Path3::Stacked, Path3::PerRow] {
            let mut caches: Vec<SeqCache> =
                prompts.iter().map(|_| SeqCache::new(cfg.num_layers, 16)).collect();
            let refs: Vec<&AdapterMix> = mixes.iter().collect();
            let lora = step(&model, &refs, path);
            let mut input = BatchInput::default();
            prompts.iter().for_each(|p| input.push(p));
            let mut cs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let prefill =
                model.logits(&model.forward(&input, Some(&mut cs), &lora).unwrap()).unwrap();
            let mut dec = BatchInput::default();
            (0..prompts.len()).for_each(|i| dec.push(&[3 + i as u32]));
            let mut cs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let decode = model.logits(&model.forward(&dec, Some(&mut cs), &lora).unwrap()).unwrap();
            let mut offset = 0;
            for (i, p) in prompts.iter().enumerate() {
                let mut full = p.clone();
                full.push(3 + i as u32);
                let alone = logits_alone(&model, &full, &mixes[i], path);
                let d1 = max_abs_diff(
                    &alone.narrow(0, 0, p.len()).unwrap(),
                    &prefill.narrow(0, offset, p.len()).unwrap(),
                );
                let d2 = max_abs_diff(
                    &alone.narrow(0, p.len(), 1).unwrap(),
                    &decode.narrow(0, i, 1).unwrap(),
                );
                assert!(d1 < 1e-4 && d2 < 1e-4, "{:?} {path:?} row {i}: {d1} {d2}", cfg.arch.name);
                offset += p.len();
            }
        }
    }
}
