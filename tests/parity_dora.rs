//! DoRA parity with Python PEFT on the real default model (GGUF dequantized to f32): the
//! reference in `../shared/reference/dora` holds PEFT 0.21.2's unmerged forward for a DoRA
//! adapter alone at request scales 1 and 0.5 and mixed after a plain LoRA adapter. Required,
//! as for plain LoRA: identical greedy continuations and logits within 1e-3, on the fused
//! host path, the stacked path GPUs run and the per-row reference; and PEFT's semantics —
//! order matters in a mix, scale 0 is not the base, DoRA and plain rows share a batch.

mod common;

use candle_core::{DType, Device, Tensor};
use common::reference::{greedy, prefill_with, RefFile};
use common::*;
use loraplex::adapters::{load_adapter, load_adapter_on, AdapterMix, MixEntry};
use loraplex::engine::{LoraPath, Request};
use loraplex::generate::generate;
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::{Decoder, StepLora, WeightFormat};
use std::path::PathBuf;
use std::sync::Arc;

const PROMPTS: [&str; 4] = ["short", "squad", "chat", "multilingual"];
const LOGIT_TOL: f32 = 1e-3;

fn dora_dir() -> PathBuf {
    shared_dir().join("reference/dora")
}

fn cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dora_dir().join("cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn load(format: WeightFormat) -> LoadedModel {
    load_model(real_model_path().to_str().unwrap(), format, &Device::Cpu).unwrap()
}

/// `(name, scale)` pairs as a mix, each adapter loaded from the reference's folder against
/// `m`'s frozen weights.
fn mix_of(m: &LoadedModel, entries: &[(&str, f64)]) -> AdapterMix {
    let base = m.model.projections();
    AdapterMix::new(
        entries
            .iter()
            .map(|(name, scale)| {
                let dir = dora_dir().join("adapters").join(name);
                let a = load_adapter_on(&dir, name, &m.model.cfg, &Device::Cpu, Some(&base))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                MixEntry { adapter: Arc::new(a), scale: *scale }
            })
            .collect(),
    )
}

fn case_mix(m: &LoadedModel, case: &serde_json::Value) -> AdapterMix {
    let entries: Vec<(&str, f64)> = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap(), a["scale"].as_f64().unwrap()))
        .collect();
    mix_of(m, &entries)
}

#[derive(Clone, Copy, Debug)]
enum Path {
    Fused,
    Stacked,
    PerRow,
}

/// All-position logits of each prompt, prefilled together with `mix` on `path`.
fn prefill(model: &Decoder, prompts: &[Vec<u32>], mix: &AdapterMix, path: Path) -> Vec<Tensor> {
    let mixes: Vec<&AdapterMix> = prompts.iter().map(|_| mix).collect();
    let lora = match path {
        Path::Fused => {
            StepLora::batched(&mixes, model.cfg.num_layers, model.dtype(), model.device()).unwrap()
        }
        Path::Stacked => StepLora::stacked(&mixes, model.cfg.num_layers, model.device()).unwrap(),
        Path::PerRow => StepLora::per_row(&mixes),
    };
    prefill_with(model, prompts, &lora)
}

fn prompts(rf: &RefFile) -> Vec<Vec<u32>> {
    PROMPTS.iter().map(|p| rf.ints(&format!("{p}.input_ids"))).collect()
}

fn logit_diffs(rf: &RefFile, ours: &[Tensor]) -> Vec<(f32, f32)> {
    common::reference::logit_diffs(rf, &PROMPTS, ours)
}

fn check_case(index: usize) {
    let m = load(WeightFormat::Dense(DType::F32));
    let case = &cases()[index];
    let rf = RefFile::open(&dora_dir().join(case["file"].as_str().unwrap()));
    let mix = case_mix(&m, case);
    let prompts = prompts(&rf);
    for path in [Path::Fused, Path::Stacked, Path::PerRow] {
        let diffs = logit_diffs(&rf, &prefill(&m.model, &prompts, &mix, path));
        println!("case {} {path:?}: max |Δlogit| (last, all positions) {diffs:?}", case["id"]);
        for (p, (d_last, d_all)) in PROMPTS.iter().zip(diffs) {
            assert!(
                d_last <= LOGIT_TOL && d_all <= LOGIT_TOL,
                "case {} {path:?} prompt {p}: last {d_last}, all positions {d_all}",
                case["id"]
            );
        }
    }
    for path in [LoraPath::Batched, LoraPath::PerRow] {
        let got = greedy(&m, &prompts, &mix, path, 24);
        for (p, ids) in PROMPTS.iter().zip(&got) {
            assert_eq!(
                ids,
                &rf.ints(&format!("{p}.greedy_ids")),
                "case {} {path:?} prompt {p}: greedy continuation differs",
                case["id"]
            );
        }
    }
}

#[test]
fn the_base_case_matches() {
    assert!(cases()[0]["adapters"].as_array().unwrap().is_empty());
    check_case(0);
}

#[test]
fn dora_at_scale_1_matches_peft() {
    check_case(1);
}

#[test]
fn dora_at_scale_half_matches_peft() {
    check_case(2);
}

#[test]
fn dora_after_plain_lora_in_a_mix_matches_peft() {
    check_case(3);
}

/// PEFT applies a mix's adapters in order and each DoRA term rescales what came before it:
/// the reverse order of the reference mix is a different model (0.12–0.18 in logits per the
/// reference's README), which every path computes alike.
#[test]
fn the_order_of_a_dora_mix_changes_the_output() {
    let m = load(WeightFormat::Dense(DType::F32));
    let case = &cases()[3];
    let rf = RefFile::open(&dora_dir().join(case["file"].as_str().unwrap()));
    let prompts = prompts(&rf);
    let swapped = mix_of(&m, &[("dora-qv-r8", 1.0), ("qa-r8", 0.5)]);
    let fused = prefill(&m.model, &prompts, &swapped, Path::Fused);
    let diffs = logit_diffs(&rf, &fused);
    println!("swapped order against the reference order: {diffs:?}");
    assert!(diffs.iter().all(|(last, _)| *last > 0.05), "{diffs:?}");
    for path in [Path::Stacked, Path::PerRow] {
        let other = prefill(&m.model, &prompts, &swapped, path);
        for (a, b) in fused.iter().zip(&other) {
            assert!(max_abs_diff(a, b) <= LOGIT_TOL, "{path:?}: {}", max_abs_diff(a, b));
        }
    }
}

/// A DoRA adapter at request scale 0 still applies its magnitude (`m / ||W||`), as PEFT's
/// `set_scale(0)` does: not the base model. Merging it gives the same model.
#[test]
fn dora_at_scale_0_is_not_the_base() {
    let m = load(WeightFormat::Dense(DType::F32));
    let rf = RefFile::open(&dora_dir().join(cases()[0]["file"].as_str().unwrap()));
    let prompts = prompts(&rf);
    let zero = mix_of(&m, &[("dora-qv-r8", 0.0)]);
    let ours = prefill(&m.model, &prompts, &zero, Path::Fused);
    let from_base = logit_diffs(&rf, &ours);
    println!("scale 0 against the base: {from_base:?}");
    assert!(from_base.iter().all(|(last, _)| *last > 1.0), "{from_base:?}");
    let merged = m.model.merged(&zero).unwrap();
    let merged = prefill(&merged, &prompts, &AdapterMix::default(), Path::Fused);
    for (a, b) in ours.iter().zip(&merged) {
        assert!(max_abs_diff(a, b) <= LOGIT_TOL, "merged: {}", max_abs_diff(a, b));
    }
}

/// Merged DoRA weights (`m / ||W + c·B A||` times each row of `W + c·B A`, in the mix's
/// order) give the unmerged model, for the reference mix.
#[test]
fn merged_dora_equals_unmerged() {
    let m = load(WeightFormat::Dense(DType::F32));
    let rf = RefFile::open(&dora_dir().join(cases()[3]["file"].as_str().unwrap()));
    let prompts = prompts(&rf);
    let mix = case_mix(&m, &cases()[3]);
    let unmerged = prefill(&m.model, &prompts, &mix, Path::Fused);
    let merged =
        prefill(&m.model.merged(&mix).unwrap(), &prompts, &AdapterMix::default(), Path::Fused);
    for (a, b) in unmerged.iter().zip(&merged) {
        assert!(max_abs_diff(a, b) <= LOGIT_TOL, "{}", max_abs_diff(a, b));
    }
}

/// DoRA rows, plain LoRA rows and base rows in one continuous batch on the default (packed)
/// path: each row's tokens and log-probabilities are bit for bit what it gets alone.
#[test]
fn dora_and_plain_rows_in_one_batch_equal_each_alone() {
    let m = load(WeightFormat::Packed);
    let rf = RefFile::open(&dora_dir().join(cases()[0]["file"].as_str().unwrap()));
    let mixes = [
        mix_of(&m, &[("dora-qv-r8", 1.0)]),
        mix_of(&m, &[("qa-r8", 0.5)]),
        AdapterMix::default(),
        mix_of(&m, &[("qa-r8", 0.5), ("dora-qv-r8", 1.0)]),
        mix_of(&m, &[("dora-qv-r8", 0.0)]),
        mix_of(&m, &[("dora-qv-r8", 0.5), ("qa-r8", -0.3)]),
    ];
    let mut reqs = Vec::new();
    for (i, mix) in mixes.iter().enumerate() {
        for p in ["short", "chat"] {
            reqs.push(Request {
                stop_at_eos: false,
                logprobs: Some(1),
                ..Request::greedy(rf.ints(&format!("{p}.input_ids")), mix.clone(), 12 + i)
            });
        }
    }
    let together = generate(&m.model, &m.tokenizer, &reqs, LoraPath::Batched).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone =
            generate(&m.model, &m.tokenizer, std::slice::from_ref(r), LoraPath::Batched).unwrap();
        assert_eq!(together[i].ids, alone[0].ids, "request {i}");
        assert_eq!(together[i].logprobs, alone[0].logprobs, "request {i}: bit for bit");
    }
    // And the DoRA rows are not the plain ones: the control that the batch mixed something.
    assert_ne!(together[0].ids, together[4].ids);
}

/// The packed default path (8-bit activations inside each matmul) stays as close to PEFT
/// with DoRA as it is for plain LoRA (`parity_real::packed_path_agreement_is_bounded`).
#[test]
fn packed_path_agreement_with_dora_is_bounded() {
    let m = load(WeightFormat::Packed);
    for case in &cases()[1..] {
        let rf = RefFile::open(&dora_dir().join(case["file"].as_str().unwrap()));
        let prompts = prompts(&rf);
        let logits = prefill(&m.model, &prompts, &case_mix(&m, case), Path::Fused);
        let (mut agree, mut total) = (0, 0);
        for (p, ours) in PROMPTS.iter().zip(&logits) {
            let top1: Vec<u32> = ours.argmax(1).unwrap().to_vec1().unwrap();
            let want = rf.ints(&format!("{p}.topk_ids"));
            agree += top1.iter().enumerate().filter(|(i, t)| **t == want[i * 20]).count();
            total += top1.len();
        }
        let diffs = logit_diffs(&rf, &logits);
        println!("packed, case {}: top-1 {agree}/{total}, diffs {diffs:?}", case["id"]);
        assert!(agree as f64 >= 0.93 * total as f64, "case {}: {agree}/{total}", case["id"]);
        assert!(diffs.iter().all(|(last, _)| *last < 3.0), "case {}: {diffs:?}", case["id"]);
    }
}

/// Loading by shape only (no base weights at hand) refuses DoRA by name rather than serving
/// it as plain LoRA.
#[test]
fn dora_without_the_base_weights_is_refused_by_name() {
    let m = load(WeightFormat::Dense(DType::F32));
    let dir = dora_dir().join("adapters/dora-qv-r8");
    let e = load_adapter(&dir, "d", &m.model.cfg, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("use_dora"), "{e}");
}
