//! Hugging Face model folders (`config.json`, `*.safetensors`, `tokenizer.json`), local or
//! fetched from the Hub with `hf:ORG/NAME` (needs network; cannot be exercised offline).

use super::config::Arch;
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

/// The family's description from `model_type` and the flags that vary within a family.
fn arch_from_hf(raw: &serde_json::Value) -> Result<Arch> {
    use Target::*;
    let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("llama");
    let flag = |k: &str| raw.get(k).is_some_and(|v| v.as_bool() == Some(true));
    let mut biased = Vec::new();
    if flag("attention_bias") {
        biased.extend([Q, K, V, O]);
    }
    let qk_norm = match model_type {
        "llama" | "mistral" => {
            if flag("mlp_bias") {
                biased.extend([Gate, Up, Down]);
            }
            false
        }
        "qwen2" => {
            biased = vec![Q, K, V];
            false
        }
        "qwen3" => true,
        "phi3" => false,
        "gemma3_text" => return gemma3_arch(raw),
        "bloom" => return bloom_arch(raw),
        "gemma3" => return Err(ModelError::Unsupported("model_type `gemma3` (the multimodal checkpoint); use its text model (`gemma3_text`)".into())),
        other => return Err(ModelError::Unsupported(format!("model_type `{other}`; supported: llama, mistral, qwen2, qwen3, phi3, gemma3_text, bloom"))),
    };
    if let Some(act) = raw.get("hidden_act").and_then(|v| v.as_str()).filter(|a| *a != "silu") {
        return Err(ModelError::Unsupported(format!(
            "`hidden_act` `{act}` is not supported for model_type `{model_type}` (only silu)"
        )));
    }
    let windows = sliding_windows(raw, model_type)?;
    Ok(Arch {
        name: model_type.to_string(),
        biased,
        qk_norm,
        combined_modules: model_type == "phi3",
        gguf_qk_interleaved: matches!(model_type, "llama" | "mistral"),
        windows,
        ..Arch::llama()
    })
}

/// BLOOM ([`Arch::bloom`]), refusing the residual variant it does not compute.
fn bloom_arch(raw: &serde_json::Value) -> Result<Arch> {
    if raw
        .get("apply_residual_connection_post_layernorm")
        .is_some_and(|v| v.as_bool() == Some(true))
    {
        return Err(ModelError::Unsupported("`apply_residual_connection_post_layernorm: true` is not supported for model_type `bloom`".into()));
    }
    Ok(Arch::bloom())
}

/// Gemma 3's text decoder: sandwich norms, q/k norms, √hidden embeddings, GELU-tanh, the
/// `query_pre_attn_scalar` score scale, and sliding-window layers named by `layer_types` (or,
/// in older configs, every `sliding_window_pattern`-th layer global).
fn gemma3_arch(raw: &serde_json::Value) -> Result<Arch> {
    let unsupported = |m: String| Err(ModelError::Unsupported(m));
    for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if raw.get(k).is_some_and(|v| !v.is_null()) {
            return unsupported(format!("`{k}` is not supported for model_type `gemma3_text`"));
        }
    }
    if raw.get("use_bidirectional_attention").is_some_and(|v| v.as_bool() == Some(true)) {
        return unsupported("`use_bidirectional_attention: true` is not supported".into());
    }
    if raw.get("attention_bias").is_some_and(|v| v.as_bool() == Some(true)) {
        return unsupported(
            "`attention_bias: true` is not supported for model_type `gemma3_text`".into(),
        );
    }
    match raw.get("hidden_activation").or_else(|| raw.get("hidden_act")).and_then(|v| v.as_str()) {
        Some("gelu_pytorch_tanh") | None => {}
        Some(other) => {
            return unsupported(format!(
                "`hidden_activation` `{other}` is not supported (only gelu_pytorch_tanh)"
            ))
        }
    }
    // Older Gemma 3 configs name no `layer_types`: every `sliding_window_pattern`-th layer is global.
    let windows = if raw.get("layer_types").is_some() {
        sliding_windows(raw, "gemma3_text")?
    } else {
        let layers = raw.get("num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let pattern =
            raw.get("sliding_window_pattern").and_then(|v| v.as_u64()).unwrap_or(6).max(1) as usize;
        let window = raw.get("sliding_window").and_then(|v| v.as_u64()).map(|w| w as usize);
        if window.is_none() {
            return unsupported("Gemma 3 without a `sliding_window`".into());
        }
        (0..layers).map(|l| if (l + 1) % pattern != 0 { window } else { None }).collect()
    };
    let local = super::config::local_rope_theta_from_hf(raw)
        .map_err(ModelError::Unsupported)?
        .unwrap_or(10_000.0);
    Ok(Arch {
        name: "gemma3_text".into(),
        qk_norm: true,
        norm_plus_one: true,
        gguf_qk_interleaved: false,
        sandwich_norms: true,
        embed_scale: true,
        activation: super::config::Activation::GeluTanh,
        query_pre_attn_scalar: Some(
            raw.get("query_pre_attn_scalar").and_then(|v| v.as_f64()).unwrap_or(256.0),
        ),
        windows,
        local_rope_theta: Some(local),
        ..Arch::llama()
    })
}

/// Each layer's attention window: transformers 5's `layer_types` where written, else (older
/// configs) `sliding_window` on every layer — for Qwen only with `use_sliding_window`, and only
/// from layer `max_window_layers` on, as transformers applies it.
fn sliding_windows(raw: &serde_json::Value, model_type: &str) -> Result<Vec<Option<usize>>> {
    let layers = raw.get("num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let window = raw.get("sliding_window").and_then(|v| v.as_u64()).map(|w| w as usize);
    let sliding: Vec<bool> = match raw.get("layer_types").and_then(|v| v.as_array()) {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                other => Err(ModelError::Unsupported(format!(
                    "`layer_types` entry {other:?} is not supported for model_type `{model_type}`"
                ))),
            })
            .collect::<Result<_>>()?,
        None => match model_type {
            "qwen2" | "qwen3" => {
                let on = raw.get("use_sliding_window").is_some_and(|v| v.as_bool() == Some(true));
                let from =
                    raw.get("max_window_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
                (0..layers).map(|l| on && l >= from).collect()
            }
            _ => vec![window.is_some(); layers],
        },
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
