//! Shared test helpers: the tiny random model, random PEFT adapters written to disk, the
//! real default model's location, and the finite-difference check of a LoRA gradient.
#![allow(dead_code)]

pub mod http;
pub mod reference;
pub mod server;

use candle_core::{Device, Tensor};
use loraplex::adapters::{load_adapter, LoraAdapter, PeftConfig};
use loraplex::model::random::RandomSource;
use loraplex::model::{Decoder, DecoderConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn tiny() -> (Decoder, DecoderConfig) {
    let cfg = DecoderConfig::tiny();
    (Decoder::random(cfg.clone(), 7, &Device::Cpu).unwrap(), cfg)
}

/// A tiny random model per architecture description ([`DecoderConfig::tiny_families`]).
pub fn tiny_all() -> Vec<(Decoder, DecoderConfig)> {
    DecoderConfig::tiny_families()
        .into_iter()
        .map(|cfg| (Decoder::random(cfg.clone(), 7, &Device::Cpu).unwrap(), cfg))
        .collect()
}

/// The stored (PEFT) modules of `cfg` as `(path, layer, in, out)`: a fused module once.
pub fn stored_modules(cfg: &DecoderConfig) -> Vec<(String, usize, usize, usize)> {
    let mut out: Vec<(String, usize, usize, usize)> = Vec::new();
    for id in cfg.projections() {
        let m = cfg.stored_module(id);
        if out.last().is_none_or(|l| l.0 != m.path) {
            out.push((m.path, id.layer, cfg.proj_dims(id.target).0, m.out));
        }
    }
    out
}

/// Projection names as `cfg`'s checkpoint spells them (`q_proj` → `qkv_proj` where fused).
pub fn targets_for(cfg: &DecoderConfig, names: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let bloom = cfg.arch.naming == loraplex::model::config::Naming::Bloom;
    for n in names {
        let n = match (*n, cfg.arch.combined_modules) {
            ("q_proj" | "k_proj" | "v_proj", true) if bloom => "query_key_value",
            ("o_proj", true) if bloom => "dense",
            ("up_proj", true) if bloom => "dense_h_to_4h",
            ("down_proj", true) if bloom => "dense_4h_to_h",
            ("gate_proj", true) if bloom => continue,
            ("q_proj" | "k_proj" | "v_proj", true) => "qkv_proj",
            ("gate_proj" | "up_proj", true) => "gate_up_proj",
            (n, _) => n,
        };
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    out
}

/// [`lora_config`] with the targets spelled for `cfg`.
pub fn lora_config_for(
    cfg: &DecoderConfig,
    r: usize,
    alpha: f64,
    targets: &[&str],
) -> serde_json::Value {
    serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets_for(cfg, targets), "bias": "none"})
}

/// Writes a PEFT folder with random non-zero A and B for the modules `config_json` selects.
pub fn write_random_adapter(
    dir: &Path,
    cfg: &DecoderConfig,
    config_json: &serde_json::Value,
    seed: u64,
) {
    let config = PeftConfig::from_json(&config_json.to_string()).unwrap();
    let mut src = RandomSource::new(cfg.clone(), seed, Device::Cpu);
    let weights: Vec<(String, Tensor, Tensor)> = stored_modules(cfg)
        .into_iter()
        .filter(|(path, layer, _, _)| config.targets_module(path, *layer))
        .map(|(path, _, fan_in, fan_out)| {
            let (r, _) = config.rank_alpha_module(&path);
            let (a, b) =
                (src.uniform((r, fan_in), 0.5).unwrap(), src.uniform((fan_out, r), 0.5).unwrap());
            (path, a, b)
        })
        .collect();
    loraplex::adapters::writer::save_modules(dir, &config, &weights, &[]).unwrap();
    // Keep the caller's exact JSON (it may carry fields the writer does not emit).
    std::fs::write(dir.join("adapter_config.json"), config_json.to_string()).unwrap();
}

/// Writes a DoRA adapter (`use_dora: true`) for `model`: a random one as
/// [`write_random_adapter`] writes, plus magnitudes of `0.7–1.3 ×` each base row's norm (a
/// stored module's rows filled from each projection it holds), so DoRA's rescaling shows.
pub fn write_random_dora_adapter(
    dir: &Path,
    model: &Decoder,
    config_json: &serde_json::Value,
    seed: u64,
) {
    let mut json = config_json.clone();
    json["use_dora"] = true.into();
    write_random_adapter(dir, &model.cfg, &json, seed);
    let file = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let base = model.projections();
    let mut mags: std::collections::BTreeMap<String, Vec<f32>> = Default::default();
    for id in model.cfg.projections() {
        let m = model.cfg.stored_module(id);
        let key = format!("base_model.model.{}.lora_magnitude_vector", m.path);
        if !tensors.contains_key(&format!("base_model.model.{}.lora_A.weight", m.path)) {
            continue;
        }
        let w = base.dense_f32(id).unwrap().unwrap();
        let norms: Vec<f32> = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1().unwrap();
        let mag = mags.entry(key).or_insert_with(|| vec![0.0; m.out]);
        for (i, &row) in m.rows.iter().enumerate() {
            let u = ((seed as usize * 31 + row * 17 + i) % 61) as f32 / 60.0;
            mag[row] = norms[i] * (0.7 + 0.6 * u);
        }
    }
    for (k, v) in mags {
        let n = v.len();
        tensors.insert(k, Tensor::from_vec(v, n, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

pub fn lora_config(r: usize, alpha: f64, targets: &[&str]) -> serde_json::Value {
    serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "bias": "none"})
}

pub fn tiny_adapter(
    root: &Path,
    name: &str,
    cfg: &DecoderConfig,
    json: serde_json::Value,
    seed: u64,
) -> Arc<LoraAdapter> {
    let dir = root.join(name);
    write_random_adapter(&dir, cfg, &json, seed);
    Arc::new(load_adapter(&dir, name, cfg, &Device::Cpu).unwrap())
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The real default model: `LORAPLEX_TEST_MODEL`, else the file `scripts/fetch-model.sh` fetches.
pub fn real_model_path() -> PathBuf {
    let p = std::env::var("LORAPLEX_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(p.exists(), "real model missing at {}: run scripts/fetch-model.sh", p.display());
    p
}

/// `../shared` beside the checkout (CI lays it there too), or `LORAPLEX_SHARED`.
pub fn shared_dir() -> PathBuf {
    let p = std::env::var("LORAPLEX_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        p.join("reference/cases.json").exists(),
        "shared reference data missing at {}",
        p.display()
    );
    p
}

/// Serve options on the real model with a fresh adapters folder holding copies of the shared
/// reference adapters (`qa-r8`, `all-r16`, `rslora-r4`).
pub fn serve_options(adapters: &Path) -> loraplex::config::ServeOptions {
    for name in ["qa-r8", "all-r16", "rslora-r4"] {
        copy_adapter(&shared_dir().join("adapters").join(name), &adapters.join(name));
    }
    loraplex::config::ServeOptions {
        model: Some(real_model_path().display().to_string()),
        adapters: Some(adapters.to_path_buf()),
        rescan_interval_ms: Some(200),
        ..Default::default()
    }
}

pub fn copy_adapter(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Checks the autograd gradient of `var`'s largest-gradient element against central finite
/// differences of `loss_of` (ε = 0.01): within 3 % + 1e-4. Leaves `var` as it found it.
pub fn assert_grad_matches(
    var: &candle_core::Var,
    grads: &candle_core::backprop::GradStore,
    loss_of: impl Fn() -> f64,
    what: &str,
) {
    let g = grads.get(var).unwrap_or_else(|| panic!("{what} got no gradient"));
    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (idx, &gi) = g.iter().enumerate().max_by(|x, y| x.1.abs().total_cmp(&y.1.abs())).unwrap();
    let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eps = 1e-2f32;
    let bump = |d: f32| {
        let mut v = orig.clone();
        v[idx] += d;
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
        loss_of()
    };
    let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
    var.set(&Tensor::from_vec(orig, var.shape(), &Device::Cpu).unwrap()).unwrap();
    assert!(
        (numeric - gi as f64).abs() <= 0.03 * gi.abs() as f64 + 1e-4,
        "{what}: numeric {numeric} vs autograd {gi}"
    );
}
