//! Parity with transformers + PEFT on the tiny random models of `../shared/reference/archs`
//! (one Hugging Face folder per base family, its own PEFT adapters, and what transformers 5.24 +
//! PEFT 0.21.2 compute; see that folder's README). Required per supported family: the
//! reference's token ids, identical 16-token greedy continuations, and logits within 1e-3 at
//! every prompt position (from the folder, and for all but Gemma 3 also from the same weights
//! written as GGUF; Gemma 3's GGUF is tested on the real Gemma-3-270m). A family not described must be refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::reference::{greedy, mix_for, prefill_logits, RefFile};
use common::*;
use loraplex::adapters::AdapterMix;
use loraplex::engine::LoraPath;
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::WeightFormat;
use serde_json::Value;
use std::path::PathBuf;

const LOGIT_TOL: f32 = 1e-3;

fn arch_dir(arch: &str) -> PathBuf {
    shared_dir().join("reference/archs").join(arch)
}

fn cases(arch: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(arch_dir(arch).join("cases.json")).unwrap())
        .unwrap()
}

fn load(arch: &str) -> LoadedModel {
    load_model(
        arch_dir(arch).join("model").to_str().unwrap(),
        WeightFormat::Dense(DType::F32),
        &Device::Cpu,
    )
    .unwrap()
}

/// Every case of `arch`: tokenization of every prompt, logits at every prompt position (the
/// reference's top-20 ids) and the whole last-position row, and the greedy continuation.
fn check_arch(arch: &str) {
    check_model(arch, &load(arch));
}

/// [`check_arch`] on the same model written as an f32 GGUF by `gguf_export` and loaded back:
/// the GGUF conventions (names, Llama's interleaved Q/K rows, rope_freqs, the BPE vocabulary in
/// metadata) must give the same outputs.
fn check_arch_via_gguf(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{arch}.gguf"));
    loraplex::model::gguf_export::write_gguf(&arch_dir(arch).join("model"), &path, "gpt2").unwrap();
    let m =
        load_model(path.to_str().unwrap(), WeightFormat::Dense(DType::F32), &Device::Cpu).unwrap();
    assert_eq!(
        m.model.cfg.arch,
        load(arch).model.cfg.arch,
        "{arch}: the GGUF's architecture description"
    );
    check_model(arch, &m);
    check_packed_tracks_f32(arch, &path);
}

/// The packed path (`--dtype auto`) on the GGUF tracks the f32 one: the rows each projection
/// takes from a fused or interleaved tensor are the same in both (8-bit rounding aside).
fn check_packed_tracks_f32(arch: &str, path: &std::path::Path) {
    let f32m =
        load_model(path.to_str().unwrap(), WeightFormat::Dense(DType::F32), &Device::Cpu).unwrap();
    let packed = load_model(path.to_str().unwrap(), WeightFormat::Packed, &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> = cases(arch)["prompts"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| {
            p["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
        })
        .collect();
    let (a, b) = (
        prefill_logits(&f32m.model, &ids, &AdapterMix::default(), LoraPath::Batched),
        prefill_logits(&packed.model, &ids, &AdapterMix::default(), LoraPath::Batched),
    );
    // Relative RMS error over every position and vocabulary entry: 8-bit rounding gives a few
    // per cent; a projection reading the wrong rows gives the order of 100 %.
    let (mut err, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        err += x.iter().zip(&y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>();
        norm += x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>();
    }
    let rel = (err / norm).sqrt();
    println!("{arch}: packed vs f32 GGUF, relative RMS error {rel:.4}");
    assert!(rel < 0.2, "{arch}: packed vs f32 relative error {rel}");
}

fn check_model(arch: &str, m: &LoadedModel) {
    let cases = cases(arch);
    let prompts: Vec<(&str, Vec<u32>)> = cases["prompts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, p)| {
            let want: Vec<u32> = p["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                m.tokenizer.encode(p["text"].as_str().unwrap()).unwrap(),
                want,
                "{arch}: tokenization of prompt {name}"
            );
            (name.as_str(), want)
        })
        .collect();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|(_, ids)| ids.clone()).collect();
    let n_new = cases["generation"]["n_new"].as_u64().unwrap() as usize;
    for case in cases["cases"].as_array().unwrap() {
        let rf = RefFile::open(&arch_dir(arch).join(case["file"].as_str().unwrap()));
        let mix = mix_for(case, &arch_dir(arch).join("adapters"), m);
        let logits = prefill_logits(&m.model, &ids, &mix, LoraPath::Batched);
        for ((p, _), ours) in prompts.iter().zip(&logits) {
            let t = ours.dim(0).unwrap();
            let last = Tensor::new(rf.floats(&format!("{p}.last_logits")), &Device::Cpu).unwrap();
            let d_last = max_abs_diff(&ours.get(t - 1).unwrap(), &last);
            let top_ids = rf.ints(&format!("{p}.topk_ids"));
            let want = rf.floats(&format!("{p}.topk_logits"));
            let k = top_ids.len() / t;
            let ours = ours.to_vec2::<f32>().unwrap();
            let d_all = top_ids
                .iter()
                .zip(&want)
                .enumerate()
                .map(|(i, (&id, &w))| (ours[i / k][id as usize] - w).abs())
                .fold(0f32, f32::max);
            println!("{arch} case {} prompt {p}: max |Δlogit| last {d_last:.2e}, all positions {d_all:.2e}", case["id"]);
            assert!(
                d_last <= LOGIT_TOL && d_all <= LOGIT_TOL,
                "{arch} case {} prompt {p}: last {d_last}, all positions {d_all}",
                case["id"]
            );
        }
        let got = greedy(m, &ids, &mix, LoraPath::Batched, n_new);
        for ((p, _), got) in prompts.iter().zip(&got) {
            assert_eq!(
                got,
                &rf.ints(&format!("{p}.greedy_ids")),
                "{arch} case {} prompt {p}: greedy continuation differs",
                case["id"]
            );
        }
    }
}

/// A family this decoder does not describe: loading must fail with an error that names it.
fn check_refused(model_type: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(arch_dir("qwen2").join("model/config.json")).unwrap(),
    )
    .unwrap();
    cfg["model_type"] = Value::from(model_type);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = match load_model(
        dir.path().to_str().unwrap(),
        WeightFormat::Dense(DType::F32),
        &Device::Cpu,
    ) {
        Ok(_) => panic!("model_type `{model_type}` loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("`{model_type}`")),
        "the error does not name model_type `{model_type}`: {err}"
    );
}

/// Llama 3.x: untied head, `rope_parameters` with `rope_type: llama3` (transformers 5's layout).
#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_arch("llama");
}

/// Qwen2: biases on q, k and v; rope θ 1e6; tied head.
#[test]
fn qwen2_matches_transformers() {
    check_arch("qwen2");
}

/// Qwen3: per-head RMS norms on q and k before rope.
#[test]
fn qwen3_matches_transformers() {
    check_arch("qwen3");
}

/// Phi-3: fused `qkv_proj` and `gate_up_proj`, whose PEFT B rows span the fused output.
#[test]
fn phi3_matches_transformers() {
    check_arch("phi3");
}

/// Gemma 3 (text): sliding-window layers with their own rope base, (1 + w) sandwich norms, q/k
/// norms, √hidden embeddings, GELU-tanh, `query_pre_attn_scalar`. The prompts and the greedy
/// loop run past the window of 16.
#[test]
fn gemma3_matches_transformers() {
    check_arch("gemma3");
}

/// BLOOM: ALiBi, LayerNorms with biases, per-head interleaved `query_key_value`, gateless MLP.
#[test]
fn bloom_matches_transformers() {
    check_arch("bloom");
}

#[test]
fn llama3_from_gguf_matches_transformers() {
    check_arch_via_gguf("llama");
}

#[test]
fn qwen2_from_gguf_matches_transformers() {
    check_arch_via_gguf("qwen2");
}

#[test]
fn qwen3_from_gguf_matches_transformers() {
    check_arch_via_gguf("qwen3");
}

#[test]
fn phi3_from_gguf_matches_transformers() {
    check_arch_via_gguf("phi3");
}

#[test]
fn bloom_from_gguf_matches_transformers() {
    check_arch_via_gguf("bloom");
}

#[test]
fn families_not_described_are_refused_by_name() {
    for model_type in ["gpt_neox", "falcon", "gemma3"] {
        check_refused(model_type);
    }
}

/// PEFT names a fused projection by its stored module: on Phi-3 `q_proj` names nothing and is
/// refused by name, and so is `gate_proj` on BLOOM (no gate); `qkv_proj` loads.
#[test]
fn targets_the_architecture_lacks_are_refused_by_name() {
    for (arch, missing, present) in
        [("phi3", "q_proj", "qkv_proj"), ("bloom", "gate_proj", "query_key_value")]
    {
        let m = load(arch);
        let dir = tempfile::tempdir().unwrap();
        let src = arch_dir(arch).join("adapters/attn-r4");
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        cfg["target_modules"] = serde_json::json!([missing]);
        std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        let err = loraplex::adapters::load_adapter(dir.path(), "x", &m.model.cfg, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains(missing), "{arch}: {err}");
        cfg["target_modules"] = serde_json::json!([present]);
        cfg["rank_pattern"] = serde_json::json!({});
        std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        // The file holds more modules than this config names: refused as undescribed tensors,
        // which shows the fused name itself was accepted.
        let err = loraplex::adapters::load_adapter(dir.path(), "x", &m.model.cfg, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not described by the config"), "{arch}: {err}");
    }
}
