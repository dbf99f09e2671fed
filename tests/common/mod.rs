//! Shared test helpers: the tiny random model, random PEFT adapters written to disk, and the
//! real default model's location.
#![allow(dead_code)]

pub mod http;
pub mod reference;
pub mod server;

use candle_core::{Device, Tensor};
use loraplex::adapters::{load_adapter, LoraAdapter, PeftConfig};
use loraplex::model::random::RandomSource;
use loraplex::model::{Llama, LlamaConfig, ModuleId};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn tiny() -> (Llama, LlamaConfig) {
    let cfg = LlamaConfig::tiny();
    (Llama::random(cfg.clone(), 7, &Device::Cpu).unwrap(), cfg)
}

/// A tiny random model per architecture description ([`LlamaConfig::tiny_families`]).
pub fn tiny_all() -> Vec<(Llama, LlamaConfig)> {
    LlamaConfig::tiny_families().into_iter().map(|cfg| (Llama::random(cfg.clone(), 7, &Device::Cpu).unwrap(), cfg)).collect()
}

/// Writes a PEFT folder with random non-zero A and B for the modules `config_json` selects.
pub fn write_random_adapter(dir: &Path, cfg: &LlamaConfig, config_json: &serde_json::Value, seed: u64) {
    let config = PeftConfig::from_json(&config_json.to_string()).unwrap();
    let mut src = RandomSource::new(cfg.clone(), seed, Device::Cpu);
    let weights: Vec<(ModuleId, Tensor, Tensor)> = ModuleId::all(cfg.num_layers)
        .filter(|id| config.targets(*id))
        .map(|id| {
            let (r, _) = config.rank_alpha(id);
            let (fan_in, fan_out) = cfg.proj_dims(id.target);
            (id, src.uniform((r, fan_in), 0.5).unwrap(), src.uniform((fan_out, r), 0.5).unwrap())
        })
        .collect();
    loraplex::adapters::writer::save_adapter(dir, &config, &weights).unwrap();
    // Keep the caller's exact JSON (it may carry fields the writer does not emit).
    std::fs::write(dir.join("adapter_config.json"), config_json.to_string()).unwrap();
}

pub fn lora_config(r: usize, alpha: f64, targets: &[&str]) -> serde_json::Value {
    serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "bias": "none"})
}

pub fn tiny_adapter(root: &Path, name: &str, cfg: &LlamaConfig, json: serde_json::Value, seed: u64) -> Arc<LoraAdapter> {
    let dir = root.join(name);
    write_random_adapter(&dir, cfg, &json, seed);
    Arc::new(load_adapter(&dir, name, cfg, &Device::Cpu).unwrap())
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The real default model: `LORAPLEX_TEST_MODEL`, else the file `scripts/fetch-model.sh` fetches.
pub fn real_model_path() -> PathBuf {
    let p = std::env::var("LORAPLEX_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(p.exists(), "real model missing at {}: run scripts/fetch-model.sh", p.display());
    p
}

/// `../shared` beside the checkout (CI lays it there too), or `LORAPLEX_SHARED`.
pub fn shared_dir() -> PathBuf {
    let p = std::env::var("LORAPLEX_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(p.join("reference/cases.json").exists(), "shared reference data missing at {}", p.display());
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
