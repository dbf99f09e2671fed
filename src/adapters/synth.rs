//! Synthetic adapters with random weights, built in memory: for benchmarks and load tests
//! that need many distinct adapters on a real base model.

use super::{AdapterError, LoraAdapter, LoraWeights, PeftConfig};
use crate::model::random::RandomSource;
use crate::model::{DecoderConfig, ModuleId};
use candle_core::Device;

/// The PEFT config of [`random_adapter`]'s adapters: rank `r`, `lora_alpha = 2r`, on `targets`
/// (what writing one as a PEFT folder needs).
pub fn random_config(r: usize, targets: &[&str]) -> Result<PeftConfig, AdapterError> {
    let json = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets});
    PeftConfig::from_json(&json.to_string())
}

/// A rank-`r` adapter on `targets` (e.g. `["q_proj", "v_proj"]`) with non-zero random A and B.
pub fn random_adapter(
    name: &str,
    cfg: &DecoderConfig,
    r: usize,
    targets: &[&str],
    seed: u64,
    device: &Device,
) -> Result<LoraAdapter, AdapterError> {
    let config = random_config(r, targets)?;
    let mut src = RandomSource::new(cfg.clone(), seed, device.clone());
    let mut modules = vec![None; ModuleId::count(cfg.num_layers)];
    for id in ModuleId::all(cfg.num_layers).filter(|id| config.targets(*id)) {
        let (fan_in, fan_out) = cfg.proj_dims(id.target);
        let to_err = |e: crate::model::ModelError| AdapterError::Weights(e.to_string());
        let a = src.uniform((r, fan_in), 1.0 / (fan_in as f32).sqrt()).map_err(to_err)?;
        let b = src.uniform((fan_out, r), 0.01).map_err(to_err)?;
        modules[id.index()] = Some(LoraWeights::new(a, b, config.lora_alpha, false)?);
    }
    let size_bytes = modules.iter().flatten().map(LoraWeights::resident_bytes).sum();
    Ok(LoraAdapter {
        name: name.to_string(),
        path: Default::default(),
        rank: config.r,
        alpha: config.lora_alpha,
        modules,
        vocab: Default::default(),
        size_bytes,
        version: 0,
    })
}
