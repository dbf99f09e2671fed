//! Hugging Face model folders (`config.json`, `*.safetensors`, `tokenizer.json`), local or
//! fetched from the Hub with `hf:ORG/NAME` (needs network; cannot be exercised offline).

use super::config::Arch;
use super::family::Windows;
use super::linear::BaseWeight;
use super::names::{bias_of, Role};
use super::weights::{dense_to_base, WeightSource};
use super::{DecoderConfig, ModelError, ModuleId, Result, Target, WeightFormat};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct HfSource {
    pub dir: PathBuf,
    pub cfg: DecoderConfig,
    tensors: HashMap<String, Tensor>,
    device: Device,
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|source| ModelError::Io { path: path.display().to_string(), source })
}

/// Reads `config.json`: the family from `model_type`, and every field that changes the forward
/// honoured or refused by name.
pub fn read_config(dir: &Path) -> Result<DecoderConfig> {
    let path = dir.join("config.json");
    let text = read_to_string(&path)?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Invalid {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let arch = arch_from_hf(&raw)?;
    let (theta, scaling) = super::config::rope_from_hf(&raw).map_err(ModelError::Unsupported)?;
    let cfg: super::config::HfConfigJson = serde_json::from_value(raw).map_err(|e| {
        ModelError::Invalid { path: path.display().to_string(), reason: e.to_string() }
    })?;
    Ok(cfg.into_config(theta, scaling, arch))
}

/// The family's description ([`super::family`]) from `model_type`, and the fields of the
/// config that vary within the family (biases, windows, Gemma's score scale and local rope
/// base); what the family does not compute is refused by name.
fn arch_from_hf(raw: &serde_json::Value) -> Result<Arch> {
    use Target::*;
    let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("llama");
    let fam = super::family::from_hf(model_type).map_err(ModelError::Unsupported)?;
    let set = |k: &str| raw.get(k).is_some_and(|v| !v.is_null() && v.as_bool() != Some(false));
    if let Some(k) = fam.hf_refused.iter().find(|k| set(k)) {
        return Err(ModelError::Unsupported(format!(
            "`{k}` is not supported for model_type `{model_type}`"
        )));
    }
    let act =
        raw.get("hidden_activation").or_else(|| raw.get("hidden_act")).and_then(|v| v.as_str());
    if let (Some(want), Some(act)) = (fam.hf_activation, act) {
        if act != want {
            return Err(ModelError::Unsupported(format!(
                "`hidden_act` `{act}` is not supported for model_type `{model_type}` (only {want})"
            )));
        }
    }
    let mut a = fam.arch(model_type);
    let flag = |k: &str| raw.get(k).is_some_and(|v| v.as_bool() == Some(true));
    if fam.hf_attention_bias && flag("attention_bias") {
        a.biased.extend([Q, K, V, O]);
    }
    if fam.hf_mlp_bias && flag("mlp_bias") {
        a.biased.extend([Gate, Up, Down]);
    }
    a.windows = sliding_windows(raw, model_type, fam.windows)?;
    if a.query_pre_attn_scalar.is_some() {
        if let Some(s) = raw.get("query_pre_attn_scalar").and_then(|v| v.as_f64()) {
            a.query_pre_attn_scalar = Some(s);
        }
    }
    if a.local_rope_theta.is_some() {
        if let Some(t) =
            super::config::local_rope_theta_from_hf(raw).map_err(ModelError::Unsupported)?
        {
            a.local_rope_theta = Some(t);
        }
    }
    Ok(a)
}

/// Each layer's attention window: transformers 5's `layer_types` where written, else (older
/// configs) as the family's rule says ([`Windows`]): `sliding_window` on every layer; for Qwen
/// only with `use_sliding_window`, from layer `max_window_layers` on, as transformers applies
/// it; for Gemma 3 every `sliding_window_pattern`-th layer global.
fn sliding_windows(
    raw: &serde_json::Value,
    model_type: &str,
    rule: Windows,
) -> Result<Vec<Option<usize>>> {
    let layers = raw.get("num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let window = raw.get("sliding_window").and_then(|v| v.as_u64()).map(|w| w as usize);
    let sliding: Vec<bool> = match (raw.get("layer_types").and_then(|v| v.as_array()), rule) {
        (Some(types), _) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                other => Err(ModelError::Unsupported(format!(
                    "`layer_types` entry {other:?} is not supported for model_type `{model_type}`"
                ))),
            })
            .collect::<Result<_>>()?,
        (None, Windows::Qwen) => {
            let on = raw.get("use_sliding_window").is_some_and(|v| v.as_bool() == Some(true));
            let from = raw.get("max_window_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
            (0..layers).map(|l| on && l >= from).collect()
        }
        (None, Windows::EveryNthGlobal(default)) => {
            if window.is_none() {
                return Err(ModelError::Unsupported(format!(
                    "model_type `{model_type}` without a `sliding_window`"
                )));
            }
            let n = raw
                .get("sliding_window_pattern")
                .and_then(|v| v.as_u64())
                .map_or(default, |n| n as usize)
                .max(1);
            (0..layers).map(|l| (l + 1) % n != 0).collect()
        }
        (None, Windows::Every) => vec![window.is_some(); layers],
    };
    if sliding.len() != layers {
        return Err(ModelError::Unsupported(format!(
            "`layer_types` has {} entries for {layers} layers",
            sliding.len()
        )));
    }
    if sliding.iter().any(|&s| s) && window.is_none() {
        return Err(ModelError::Unsupported(
            "sliding-window layers without a `sliding_window`".into(),
        ));
    }
    if sliding.iter().all(|&s| !s) {
        return Ok(Vec::new());
    }
    Ok(sliding.iter().map(|&s| if s { window } else { None }).collect())
}

impl HfSource {
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = read_config(dir)?;
        let entries = std::fs::read_dir(dir)
            .map_err(|source| ModelError::Io { path: dir.display().to_string(), source })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::Missing {
                key: "*.safetensors".into(),
                what: dir.display().to_string(),
            });
        }
        let mut tensors = HashMap::new();
        for f in &files {
            tensors.extend(candle_core::safetensors::load(f, &Device::Cpu)?);
        }
        Ok(Self { dir: dir.to_path_buf(), cfg, tensors, device: device.clone() })
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => Ok(t.to_dtype(DType::F32)?),
            None => Err(ModelError::Missing {
                key: name.to_string(),
                what: self.dir.display().to_string(),
            }),
        }
    }
}

impl WeightSource for HfSource {
    fn embed(&mut self) -> Result<Tensor> {
        Ok(self.get(&Role::Embed.hf(&self.cfg.arch))?.to_device(&self.device)?)
    }

    fn norm(&mut self, role: Role, len: usize) -> Result<Tensor> {
        let name = role.hf(&self.cfg.arch);
        let w = self.get(&name)?;
        if w.dims() != [len] {
            return Err(ModelError::Invalid {
                path: self.dir.display().to_string(),
                reason: format!("`{name}` has shape {:?}, expected [{len}]", w.dims()),
            });
        }
        // Gemma's norms multiply by (1 + w): folded once here (in f32, as transformers adds).
        let w = if self.cfg.arch.norm_plus_one { (w + 1.0)? } else { w };
        Ok(w.to_device(&self.device)?)
    }

    fn norm_bias(&mut self, role: Role, len: usize) -> Result<Tensor> {
        let bias = bias_of(&role.hf(&self.cfg.arch));
        let b = self.get(&bias)?;
        if b.dims() != [len] {
            return Err(ModelError::Invalid {
                path: self.dir.display().to_string(),
                reason: format!("`{bias}` has shape {:?}, expected [{len}]", b.dims()),
            });
        }
        Ok(b.to_device(&self.device)?)
    }

    fn bias(&mut self, id: ModuleId) -> Result<Tensor> {
        let m = self.cfg.stored_module(id);
        let name = format!("{}.bias", m.path);
        let b = self.get(&name)?;
        if b.dims() != [m.out] {
            return Err(ModelError::Invalid {
                path: self.dir.display().to_string(),
                reason: format!("`{name}` has shape {:?}, expected [{}]", b.dims(), m.out),
            });
        }
        Ok(super::select_rows(&b, &m.rows)?.to_device(&self.device)?)
    }

    fn linear(&mut self, id: ModuleId, format: WeightFormat) -> Result<BaseWeight> {
        let m = self.cfg.stored_module(id);
        let name = format!("{}.weight", m.path);
        let w = self.get(&name)?;
        let fan_in = self.cfg.proj_dims(id.target).0;
        if w.dims() != [m.out, fan_in] {
            return Err(ModelError::Invalid {
                path: self.dir.display().to_string(),
                reason: format!(
                    "`{name}` has shape {:?}, expected [{}, {fan_in}]",
                    w.dims(),
                    m.out
                ),
            });
        }
        dense_to_base(super::select_rows(&w, &m.rows)?, format, &self.device)
    }

    fn lm_head(&mut self, format: WeightFormat) -> Result<BaseWeight> {
        let head = Role::LmHead.hf(&self.cfg.arch);
        let name = if self.cfg.tie_word_embeddings
            || !self.tensors.contains_key(&head)
            || self.cfg.arch.naming == super::config::Naming::Bloom
        {
            Role::Embed.hf(&self.cfg.arch)
        } else {
            head
        };
        dense_to_base(self.get(&name)?, format, &self.device)
    }
}

/// Downloads (or finds in the local Hub cache) the files of `org/name` and returns the folder.
pub fn fetch_from_hub(repo: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::Api::new().map_err(|e| ModelError::Download(e.to_string()))?;
    let repo = api.model(repo.to_string());
    let get = |f: &str| repo.get(f).map_err(|e| ModelError::Download(format!("`{f}`: {e}")));
    let config = get("config.json")?;
    get("tokenizer.json")?;
    let _ = get("tokenizer_config.json");
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let text = read_to_string(&index)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Download(e.to_string()))?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, f)| f.as_str())
                .collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                get(s)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| ModelError::Download("no snapshot folder".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn windows(cfg: serde_json::Value) -> std::result::Result<Vec<Option<usize>>, String> {
        arch_from_hf(&cfg).map(|a| a.windows).map_err(|e| e.to_string())
    }

    #[test]
    fn sliding_windows_follow_transformers() {
        // Mistral / Phi-3 (older configs): the window on every layer.
        assert_eq!(
            windows(
                json!({"model_type": "mistral", "num_hidden_layers": 2, "sliding_window": 4096})
            ),
            Ok(vec![Some(4096); 2])
        );
        // Qwen: only with `use_sliding_window`, from `max_window_layers` on.
        assert_eq!(
            windows(json!({"model_type": "qwen2", "num_hidden_layers": 3, "sliding_window": 8})),
            Ok(vec![])
        );
        let qwen = json!({"model_type": "qwen2", "num_hidden_layers": 3, "sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1});
        assert_eq!(windows(qwen), Ok(vec![None, Some(8), Some(8)]));
        // transformers 5's `layer_types` wins; an unknown type is refused by name.
        let typed = json!({"model_type": "llama", "num_hidden_layers": 2, "sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"]});
        assert_eq!(windows(typed), Ok(vec![None, Some(4)]));
        let bad = json!({"model_type": "llama", "num_hidden_layers": 1, "layer_types": ["chunked_attention"]});
        assert!(windows(bad).is_err_and(|e| e.contains("chunked_attention")));
        let no_window = json!({"model_type": "llama", "num_hidden_layers": 1, "layer_types": ["sliding_attention"]});
        assert!(windows(no_window).is_err());
    }
}
