//! Writing a PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors` with
//! PEFT's key names, written into a temporary sibling folder and renamed into place so that a
//! watcher never sees a half-written adapter.

use super::loader::{CONFIG_FILE, WEIGHTS_FILE};
use super::{AdapterError, PeftConfig};
use crate::model::ModuleId;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

fn io(path: &Path, source: std::io::Error) -> AdapterError {
    AdapterError::Io { path: path.display().to_string(), source }
}

/// Writes `weights` (`module → (A, B)`) and `config` as a PEFT folder at `dir`, replacing any
/// previous content atomically (rename of a complete folder).
pub fn save_adapter(
    dir: &Path,
    config: &PeftConfig,
    weights: &[(ModuleId, Tensor, Tensor)],
) -> Result<(), AdapterError> {
    save_adapter_with(dir, config, weights, &[])
}

/// [`save_adapter`] plus extra files (model card, logs, plots) written before the rename.
pub fn save_adapter_with(
    dir: &Path,
    config: &PeftConfig,
    weights: &[(ModuleId, Tensor, Tensor)],
    extra: &[(&str, Vec<u8>)],
) -> Result<(), AdapterError> {
    let by_path: Vec<(String, Tensor, Tensor)> =
        weights.iter().map(|(id, a, b)| (id.to_string(), a.clone(), b.clone())).collect();
    save_modules(dir, config, &by_path, extra)
}

/// [`save_adapter_with`] keyed by stored module path (`model.layers.0.self_attn.qkv_proj`), for
/// models whose PEFT modules are fused projections.
pub fn save_modules(
    dir: &Path,
    config: &PeftConfig,
    weights: &[(String, Tensor, Tensor)],
    extra: &[(&str, Vec<u8>)],
) -> Result<(), AdapterError> {
    save_dora_modules(dir, config, weights, &[], extra)
}

/// [`save_modules`] with DoRA's magnitudes (`(stored module path, magnitude)`), written as
/// PEFT's `lora_magnitude_vector` tensors.
pub fn save_dora_modules(
    dir: &Path,
    config: &PeftConfig,
    weights: &[(String, Tensor, Tensor)],
    magnitudes: &[(String, Tensor)],
    extra: &[(&str, Vec<u8>)],
) -> Result<(), AdapterError> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (path, a, b) in weights {
        tensors.insert(format!("base_model.model.{path}.lora_A.weight"), a.contiguous()?);
        tensors.insert(format!("base_model.model.{path}.lora_B.weight"), b.contiguous()?);
    }
    for (path, m) in magnitudes {
        tensors.insert(format!("base_model.model.{path}.lora_magnitude_vector"), m.contiguous()?);
    }
    candle_core::safetensors::save(&tensors, tmp.join(WEIGHTS_FILE))?;
    let json = serde_json::to_string_pretty(&config.to_peft_json())
        .map_err(|e| AdapterError::ConfigJson(e.to_string()))?;
    std::fs::write(tmp.join(CONFIG_FILE), json).map_err(|e| io(&tmp, e))?;
    for (name, bytes) in extra {
        std::fs::write(tmp.join(name), bytes).map_err(|e| io(&tmp, e))?;
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
    }
    Ok(())
}
