//! Every PEFT feature we cannot honour is refused with a specific message, never loaded
//! partially: one test per rejected feature.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::adapters::{load_adapter, AdapterError};
use std::collections::HashMap;
use std::path::Path;

/// Writes a valid tiny adapter, lets `edit` change its config JSON, and loads it.
fn load_with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<(), AdapterError> {
    let (_, cfg) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x");
    write_random_adapter(&path, &cfg, &lora_config(2, 4.0, &["q_proj", "v_proj"]), 1);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut json);
    std::fs::write(path.join("adapter_config.json"), json.to_string()).unwrap();
    load_adapter(&path, "x", &cfg, &Device::Cpu).map(|_| ())
}

/// Writes a valid tiny adapter, lets `edit` change its tensors, and loads it.
fn load_with_tensors(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<(), AdapterError> {
    let (_, cfg) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x");
    write_random_adapter(&path, &cfg, &lora_config(2, 4.0, &["q_proj", "v_proj"]), 1);
    let file = path.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    load_adapter(&path, "x", &cfg, &Device::Cpu).map(|_| ())
}

fn err_text(r: Result<(), AdapterError>) -> String {
    match r {
        Ok(()) => panic!("expected the adapter to be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_valid_adapter_loads() {
    assert!(load_with(|_| {}).is_ok());
}

/// A DoRA config whose weights hold no magnitudes is refused naming the missing tensor, even
/// with the base weights at hand; loaded by shape only, DoRA is refused by name.
#[test]
fn dora_without_magnitudes_is_rejected() {
    let (model, cfg) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x");
    let mut json = lora_config(2, 4.0, &["q_proj", "v_proj"]);
    json["use_dora"] = true.into();
    write_random_adapter(&path, &cfg, &json, 1);
    let base = model.projections();
    let e = loraplex::adapters::load_adapter_on(&path, "x", &cfg, &Device::Cpu, Some(&base))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_magnitude_vector"), "{e}");
    let e = err_text(load_with(|j| j["use_dora"] = true.into()));
    assert!(e.contains("use_dora") && e.contains("DoRA"), "{e}");
}

/// The vocabulary layers' parts are served (`tests/vocab_lora.rs`); a config that declares one
/// whose file lacks its tensors is refused naming the tensor, and `modules_to_save` beyond the
/// embedding and the head is refused by name.
#[test]
fn modules_to_save_is_rejected_without_its_weights_or_beyond_the_vocabulary_layers() {
    let e = err_text(load_with(|j| j["modules_to_save"] = serde_json::json!(["lm_head"])));
    assert!(e.contains("missing tensor `base_model.model.lm_head.weight`"), "{e}");
    let e = err_text(load_with(|j| j["modules_to_save"] = serde_json::json!(["norm"])));
    assert!(e.contains("`modules_to_save` entry `norm`"), "{e}");
}

#[test]
fn lora_bias_is_rejected() {
    let e = err_text(load_with(|j| j["lora_bias"] = true.into()));
    assert!(e.contains("lora_bias"), "{e}");
}

#[test]
fn trained_bias_is_rejected() {
    let e = err_text(load_with(|j| j["bias"] = "lora_only".into()));
    assert!(e.contains("bias: lora_only"), "{e}");
}

#[test]
fn embedding_lora_without_its_tensors_is_rejected() {
    let e = err_text(load_with(|j| {
        j["target_modules"] = serde_json::json!(["q_proj", "embed_tokens"])
    }));
    assert!(
        e.contains("missing tensor `base_model.model.model.embed_tokens.lora_embedding_A`"),
        "{e}"
    );
}

#[test]
fn lm_head_lora_without_its_tensors_is_rejected() {
    let e = err_text(load_with(|j| j["target_modules"] = serde_json::json!(["lm_head", "v_proj"])));
    assert!(e.contains("missing tensor `base_model.model.lm_head.lora_A.weight`"), "{e}");
}

#[test]
fn trainable_tokens_without_their_rows_are_rejected() {
    let e = err_text(load_with(|j| j["trainable_token_indices"] = serde_json::json!([1, 2])));
    assert!(e.contains("embed_tokens.token_adapter.trainable_tokens_delta"), "{e}");
}

#[test]
fn other_peft_types_are_rejected() {
    let e = err_text(load_with(|j| j["peft_type"] = "IA3".into()));
    assert!(e.contains("peft_type") && e.contains("IA3"), "{e}");
}

#[test]
fn a_missing_tensor_is_rejected() {
    let e = err_text(load_with_tensors(|t| {
        t.remove("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
    }));
    assert!(e.contains("missing tensor") && e.contains("layers.1.self_attn.v_proj.lora_B"), "{e}");
}

#[test]
fn an_extra_tensor_is_rejected() {
    let e = err_text(load_with_tensors(|t| {
        let extra = Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap();
        t.insert("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(), extra);
    }));
    assert!(e.contains("not described by the config") && e.contains("up_proj"), "{e}");
}

#[test]
fn a_shape_that_does_not_fit_the_base_is_rejected() {
    let e = err_text(load_with_tensors(|t| {
        let wrong = Tensor::zeros((2, 15), DType::F32, &Device::Cpu).unwrap();
        t.insert("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(), wrong);
    }));
    assert!(e.contains("shape [2, 15]") && e.contains("needs [2, 16]"), "{e}");
}

#[test]
fn non_finite_values_are_rejected() {
    let e = err_text(load_with_tensors(|t| {
        let key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
        let mut v = t[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[3] = f32::NAN;
        let shape = t[key].shape().clone();
        t.insert(key.into(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }));
    assert!(e.contains("non-finite"), "{e}");
}

#[test]
fn targets_that_name_no_layer_are_rejected() {
    let e = err_text(load_with(|j| j["target_modules"] = serde_json::json!(["q_proj", "qv_proj"])));
    assert!(e.contains("qv_proj"), "{e}");
}

#[test]
fn a_missing_config_is_an_io_error() {
    let (_, cfg) = tiny();
    let e = load_adapter(Path::new("/nonexistent/adapter"), "x", &cfg, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
}

#[test]
fn alphas_beyond_the_f32_range_are_rejected_by_name() {
    // Finite as f64, infinite as the f32 the delta is computed in.
    let e = err_text(load_with(|c| c["lora_alpha"] = serde_json::json!(1e300)));
    assert!(e.contains("lora_alpha") && e.contains("32-bit"), "{e}");
    let e = err_text(load_with(|c| c["alpha_pattern"] = serde_json::json!({"q_proj": -1e39})));
    assert!(e.contains("alpha_pattern.q_proj"), "{e}");
    load_with(|c| c["lora_alpha"] = serde_json::json!(3e38)).unwrap();
}
