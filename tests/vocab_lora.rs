//! Adapters on the vocabulary layers against what Python PEFT computes
//! (`scripts/peft_vocab_reference.py`, outputs in `tests/data/vocab`): LoRA on the embedding
//! and on the output head, `modules_to_save` copies and trainable tokens, alone, scaled and in
//! mixes, on the tiny random models of three families (Llama with an untied head, Qwen2 tied,
//! Gemma 3 tied with scaled embeddings) and on the default model; the refusals PEFT makes too
//! (two owners of one row, LoRA over replaced rows), and bad files refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::reference::{greedy, prefill_logits, prefill_with};
use common::*;
use loraplex::adapters::{load_adapter_on, AdapterError, AdapterMix, LoraAdapter, MixEntry};
use loraplex::engine::LoraPath;
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::{StepLora, WeightFormat};
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn data(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vocab").join(arch)
}

fn cases(arch: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data(arch).join("cases.json")).unwrap()).unwrap()
}

fn load_tiny(arch: &str) -> LoadedModel {
    let dir = shared_dir().join("reference/archs").join(arch).join("model");
    load_model(dir.to_str().unwrap(), WeightFormat::Dense(DType::F32), &Device::Cpu).unwrap()
}

fn adapter(m: &LoadedModel, dir: &Path, name: &str) -> Result<LoraAdapter, AdapterError> {
    let base = m.model.projections();
    load_adapter_on(dir, name, &m.model.cfg, &Device::Cpu, Some(&base))
}

fn mix_of(m: &LoadedModel, arch: &str, case: &Value) -> AdapterMix {
    let entries = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let name = a["name"].as_str().unwrap();
            let ad = adapter(m, &data(arch).join("adapters").join(name), name).unwrap();
            MixEntry { adapter: Arc::new(ad), scale: a["scale"].as_f64().unwrap() }
        })
        .collect();
    AdapterMix::new(entries)
}

fn reference(arch: &str, key: &str, shape: &[usize]) -> Tensor {
    let bytes = std::fs::read(data(arch).join("logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v: Vec<f32> = st
        .tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The largest |value| of `t`, at least 1: the reference's random adapters move logits by up to
/// ~60, so tolerances are relative to it.
fn magnitude(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0)
}

/// Every case of a tiny family: logits at every prompt position within 1e-3 of PEFT's (the
/// family parity tests' tolerance; the random adapters move logits by up to ~60, and f32 sums
/// there round at ~2e-4) on both LoRA paths, and the greedy continuation through the engine's
/// loop equal to PEFT's.
fn check_tiny(arch: &str) {
    let m = load_tiny(arch);
    let c = cases(arch);
    let prompt = ids(&c["prompt_ids"]);
    let vocab = m.model.cfg.vocab_size;
    for case in c["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mix = mix_of(&m, arch, case);
        let want = reference(arch, name, &[prompt.len(), vocab]);
        for path in [LoraPath::Batched, LoraPath::PerRow] {
            let got = &prefill_logits(&m.model, std::slice::from_ref(&prompt), &mix, path)[0];
            let d = max_abs_diff(got, &want);
            assert!(d < 1e-3, "{arch} {name} {path:?}: logits differ from PEFT's by {d}");
        }
        let out = greedy(&m, std::slice::from_ref(&prompt), &mix, LoraPath::Batched, 6);
        assert_eq!(out[0], ids(&case["greedy_ids"]), "{arch} {name}: greedy ids");
    }
    // The cases change the outputs: each differs from the base model's.
    let base = reference(arch, "base", &[prompt.len(), vocab]);
    let ours = &prefill_logits(&m.model, &[prompt], &AdapterMix::default(), LoraPath::Batched)[0];
    assert!(max_abs_diff(ours, &base) < 2e-4, "{arch}: base logits");
}

#[test]
fn llama_untied_head_equals_peft() {
    check_tiny("llama");
}

#[test]
fn qwen2_tied_head_equals_peft() {
    check_tiny("qwen2");
}

#[test]
fn gemma3_scaled_embeddings_equal_peft() {
    check_tiny("gemma3");
}

/// Rows of vocabulary adapters and of plain ones in one step give each row what it gives alone.
#[test]
fn vocabulary_rows_are_batch_invariant() {
    let arch = "llama";
    let m = load_tiny(arch);
    let c = cases(arch);
    let prompt = ids(&c["prompt_ids"]);
    let find = |n: &str| c["cases"].as_array().unwrap().iter().find(|x| x["name"] == n).unwrap();
    let mixes: Vec<AdapterMix> = ["emb_mix", "save_head_emb_mix", "tokens_head", "head"]
        .iter()
        .map(|n| mix_of(&m, arch, find(n)))
        .chain([AdapterMix::default()])
        .collect();
    let prompts: Vec<Vec<u32>> =
        (0..mixes.len()).map(|i| prompt[..prompt.len() - i].to_vec()).collect();
    let refs: Vec<&AdapterMix> = mixes.iter().collect();
    let cfg = &m.model.cfg;
    for path in [LoraPath::Batched, LoraPath::PerRow] {
        let lora = match path {
            LoraPath::Batched => {
                StepLora::batched(&refs, cfg.num_layers, DType::F32, &Device::Cpu).unwrap()
            }
            LoraPath::PerRow => StepLora::per_row(&refs),
        };
        let together = prefill_with(&m.model, &prompts, &lora);
        for (i, (p, mix)) in prompts.iter().zip(&mixes).enumerate() {
            let alone = &prefill_logits(&m.model, std::slice::from_ref(p), mix, path)[0];
            let d = max_abs_diff(&together[i], alone) / magnitude(alone);
            assert!(d < 1e-6, "{path:?} row {i}: {d} between the batch and the row alone");
        }
    }
}

/// A zero scale turns LoRA on the vocabulary layers off exactly; replaced rows have no scale in
/// PEFT and stay.
#[test]
fn zero_scale_and_replaced_rows() {
    let arch = "qwen2";
    let m = load_tiny(arch);
    let c = cases(arch);
    let prompt = ids(&c["prompt_ids"]);
    let dir = data(arch).join("adapters");
    let one = |name: &str, scale: f64| {
        AdapterMix::single(Arc::new(adapter(&m, &dir.join(name), name).unwrap()), scale)
    };
    let logits = |mix: &AdapterMix| {
        prefill_logits(&m.model, std::slice::from_ref(&prompt), mix, LoraPath::Batched)
    };
    let base = &logits(&AdapterMix::default())[0];
    let emb = &logits(&one("emb-b-r2", 0.0))[0];
    assert_eq!(max_abs_diff(emb, base), 0.0, "embedding LoRA at scale 0");
    let saved = &logits(&one("save-head", 0.0))[0];
    assert!(max_abs_diff(saved, base) > 0.1, "a saved head applies at scale 0");
}

#[test]
fn conflicting_vocabulary_mixes_are_refused_by_name() {
    let arch = "qwen2";
    let m = load_tiny(arch);
    let dir = data(arch).join("adapters");
    let a = |name: &str| Arc::new(adapter(&m, &dir.join(name), name).unwrap());
    let mix = |names: &[&str]| {
        AdapterMix::new(names.iter().map(|n| MixEntry { adapter: a(n), scale: 1.0 }).collect())
    };
    let why = mix(&["save-head", "head-r4"]).vocab_conflict().unwrap();
    assert!(why.contains("`head-r4`") && why.contains("`save-head`"), "{why}");
    // On a tied model the trainable tokens replace the head's rows too.
    let why = mix(&["tokens", "save-head"]).vocab_conflict().unwrap();
    assert!(why.contains("both replace rows of the output head"), "{why}");
    let why = mix(&["tokens", "emb-r4"]).vocab_conflict().unwrap();
    assert!(why.contains("puts LoRA on the embedding"), "{why}");
    assert!(mix(&["tokens", "plain-r4"]).vocab_conflict().is_none());
    assert!(mix(&["save-head", "emb-r4"]).vocab_conflict().is_none());
    assert!(mix(&["emb-r4", "emb-b-r2", "head-r4"]).vocab_conflict().is_none());
}

/// A copy of `from` with its config edited by `edit_cfg` and each tensor by `edit`.
fn edited(
    from: &Path,
    edit_cfg: impl FnOnce(&mut Value),
    edit: impl Fn(&str, &mut Vec<f32>, &mut Vec<usize>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(from.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let mut v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut shape = view.shape().to_vec();
        edit(&name, &mut v, &mut shape);
        out.push((name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap()));
    }
    candle_core::safetensors::save(
        &out.into_iter().collect(),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    dir
}

fn refused(m: &LoadedModel, dir: &Path) -> String {
    match adapter(m, dir, "bad") {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

type ConfigEdit = fn(&mut Value);
type TensorEdit = fn(&str, &mut Vec<f32>, &mut Vec<usize>);

fn no_config_edit(_: &mut Value) {}
fn no_tensor_edit(_: &str, _: &mut Vec<f32>, _: &mut Vec<usize>) {}

#[test]
fn bad_vocabulary_adapters_are_refused_by_name() {
    let arch = "qwen2";
    let m = load_tiny(arch);
    let dir = data(arch).join("adapters");
    // The loaded copy is the reference's: the edits below are what breaks it.
    let copy = edited(&dir.join("emb-r4"), no_config_edit, no_tensor_edit);
    assert!(adapter(&m, copy.path(), "x").is_ok());
    let cases: [(&str, ConfigEdit, TensorEdit, &[&str]); 9] = [
        (
            "tokens",
            |c| c["trainable_token_indices"] = serde_json::json!([3, 5, 7, 512]),
            no_tensor_edit,
            &["token id 512 is outside the vocabulary of 512"],
        ),
        (
            "tokens",
            |c| c["trainable_token_indices"] = serde_json::json!([3, 3, 7, 9]),
            no_tensor_edit,
            &["distinct token ids"],
        ),
        (
            "emb-r4",
            no_config_edit,
            |n, _, s| {
                if n.ends_with("lora_embedding_A") {
                    s.swap(0, 1)
                }
            },
            &["lora_embedding_A", "shape"],
        ),
        (
            "emb-r4",
            no_config_edit,
            |n, v, _| {
                if n.ends_with("lora_embedding_B") {
                    v[3] = f32::NAN
                }
            },
            &["lora_embedding_B", "non-finite"],
        ),
        // PEFT's saved copy of the base embedding must be this base's.
        (
            "emb-r4",
            no_config_edit,
            |n, v, _| {
                if n.ends_with("embed_tokens.base_layer.weight") {
                    v.reverse()
                }
            },
            &["not this base model's"],
        ),
        (
            "save-head",
            |c| c["modules_to_save"] = serde_json::json!(["norm"]),
            no_tensor_edit,
            &["`modules_to_save` entry `norm`"],
        ),
        (
            "emb-r4",
            |c| c["ensure_weight_tying"] = true.into(),
            no_tensor_edit,
            &["ensure_weight_tying"],
        ),
        (
            "emb-r4",
            |c| c["init_lora_weights"] = "pissa".into(),
            no_tensor_edit,
            &["init_lora_weights: pissa"],
        ),
        (
            "save-head",
            |c| c["trainable_token_indices"] = serde_json::json!({"norm": [1]}),
            no_tensor_edit,
            &["`trainable_token_indices` names `norm`"],
        ),
    ];
    for (from, edit_cfg, edit, wanted) in cases {
        let e = refused(&m, edited(&dir.join(from), edit_cfg, edit).path());
        assert!(wanted.iter().all(|w| e.contains(w)), "{from}: {e}");
    }
    // Training the vocabulary layers is refused, not silently skipped.
    let cfg = loraplex::adapters::PeftConfig::from_json(
        &std::fs::read_to_string(dir.join("save-head/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let e = loraplex::train::params::check_targets(&m.model.cfg, &cfg).unwrap_err();
    assert!(e.contains("modules_to_save"), "{e}");
}

/// The default model (its GGUF dequantized to f32, as transformers loads it): last-position
/// logits within 1e-3 of PEFT's and the same 8 greedy ids, for LoRA on the embedding and head,
/// a mix of two embedding adapters and trainable tokens.
#[test]
fn default_model_equals_peft() {
    let m = load_model(
        real_model_path().to_str().unwrap(),
        WeightFormat::Dense(DType::F32),
        &Device::Cpu,
    )
    .unwrap();
    let arch = "smollm2";
    let c = cases(arch);
    let prompt = ids(&c["prompt_ids"]);
    let vocab = m.model.cfg.vocab_size;
    for case in c["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mix = mix_of(&m, arch, case);
        let want = reference(arch, name, &[vocab]);
        let got =
            &prefill_logits(&m.model, std::slice::from_ref(&prompt), &mix, LoraPath::Batched)[0];
        let d = max_abs_diff(&got.get(prompt.len() - 1).unwrap(), &want);
        assert!(d < 1e-3, "{name}: last logits differ from PEFT's by {d}");
        let out = greedy(&m, std::slice::from_ref(&prompt), &mix, LoraPath::Batched, 8);
        assert_eq!(out[0], ids(&case["greedy_ids"]), "{name}: greedy ids");
    }
}

/// Through HTTP on the real model (the packed serving path): a vocabulary adapter is listed and
/// served, alone and in a mix with a plain one; a mix PEFT cannot apply is a 422 naming both
/// adapters, and the server goes on serving.
#[actix_web::test]
async fn vocabulary_adapters_serve_over_http() {
    use actix_web::http::StatusCode;
    use common::http::{app, assert_error, call, ctx, post};
    let c = ctx();
    for name in ["emb-head-r2", "tokens"] {
        copy_adapter(&data("smollm2").join("adapters").join(name), &c.dir.path().join(name));
    }
    let app = app(&c).await;
    let complete = |body: Value| {
        let mut body = body;
        body["prompt"] = "The capital of France is".into();
        body["max_tokens"] = 8.into();
        body["temperature"] = 0.into();
        post("/v1/completions", body)
    };
    let (status, base) = call(&app, complete(serde_json::json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{base}");
    let (status, v) = call(&app, complete(serde_json::json!({"model": "emb-head-r2"}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_ne!(v["choices"][0]["text"], base["choices"][0]["text"], "the adapter changes the text");
    let mix = serde_json::json!({"adapters": [{"name": "tokens", "scale": 1.0},
                                              {"name": "qa-r8", "scale": 0.5}]});
    let (status, v) = call(&app, complete(mix)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let bad = serde_json::json!({"adapters": [{"name": "tokens", "scale": 1.0},
                                              {"name": "emb-head-r2", "scale": 0.5}]});
    let (status, v) = call(&app, complete(bad)).await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert_eq!(v["error"]["code"], "conflicting_adapters", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`tokens`") && msg.contains("`emb-head-r2`"), "{msg}");
    let (status, again) = call(&app, complete(serde_json::json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["choices"][0]["text"], base["choices"][0]["text"]);
}
