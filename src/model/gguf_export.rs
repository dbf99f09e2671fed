//! Writes a Hugging Face folder as an f32 GGUF file in llama.cpp's conventions (its tensor names,
//! Llama's Q/K rows interleaved per head, Llama 3 rope scaling as `rope_freqs.weight`, the
//! byte-level BPE vocabulary as `tokenizer.ggml.*`): so that the GGUF loader is tested against
//! the same reference outputs as the folder it came from, and users can convert a folder.

use super::config::{DecoderConfig, RopeScaling};
use super::names::{self, bias_of, Role};
use super::{ModelError, ModuleId, Result, Target};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

fn invalid(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid { path: path.display().to_string(), reason: reason.into() }
}

/// HF rows of a Q/K weight (or bias) in llama.cpp's order: GGUF row `2i + j` of a head is HF
/// row `j · hd/2 + i` (the inverse of the loader's un-permutation).
fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let (out, rest) = (dims[0], w.elem_count() / dims[0]);
    let hd = out / heads;
    Ok(w.reshape((heads, 2, hd / 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// `tokenizer.json`'s byte-level BPE as GGUF metadata, with the pre-tokenizer named `pre`.
fn tokenizer_metadata(dir: &Path, pre: &str) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
    let tok: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(&path, e.to_string()))?;
    if tok["model"]["type"] != "BPE" {
        return Err(ModelError::Unsupported(format!(
            "tokenizer model `{}`; only byte-level BPE converts",
            tok["model"]["type"]
        )));
    }
    let vocab =
        tok["model"]["vocab"].as_object().ok_or_else(|| invalid(&path, "no model.vocab"))?;
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < tokens.len())
            .ok_or_else(|| invalid(&path, format!("bad id for `{t}`")))?;
        tokens[id] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), true) = (added["id"].as_u64(), added["special"].as_bool() == Some(true)) {
            if let Some(t) = types.get_mut(id as usize) {
                *t = 3; // control
            }
        }
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            ))),
            other => Err(invalid(&path, format!("bad merge {other}"))),
        })
        .collect::<Result<_>>()?;
    let tcfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let id_of = |key: &str| -> Option<u32> {
        let name = match &tcfg[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        vocab.get(&name).and_then(|v| v.as_u64()).map(|v| v as u32)
    };
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(tcfg["add_bos_token"].as_bool().unwrap_or(false)),
        ),
    ];
    for (key, gguf) in
        [("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")]
    {
        if let Some(id) = id_of(key) {
            meta.push((gguf.to_string(), Value::U32(id)));
        }
    }
    if let Some(t) = tcfg["chat_template"].as_str() {
        meta.push(("tokenizer.chat_template".to_string(), Value::String(t.into())));
    }
    Ok(meta)
}

/// Writes the folder `dir` as an f32 GGUF at `out`; `pre` names its pre-tokenizer
/// (`tokenizer.ggml.pre`, e.g. `gpt2`, `qwen2`, `llama-bpe`).
pub fn write_gguf(dir: &Path, out: &Path, pre: &str) -> Result<()> {
    let cfg = super::hf::read_config(dir)?;
    let arch = cfg.arch.name.clone();
    if cfg.arch.sandwich_norms || cfg.arch.embed_scale {
        return Err(ModelError::Unsupported(format!("writing model_type `{arch}` as GGUF")));
    }
    if cfg.arch.windows.iter().any(Option::is_some) {
        return Err(ModelError::Unsupported("writing sliding windows into GGUF metadata".into()));
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io { path: dir.display().to_string(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for f in &files {
        tensors.extend(candle_core::safetensors::load(f, &Device::Cpu)?);
    }
    let mut take = |name: &str| -> Result<Tensor> {
        Ok(tensors
            .remove(name)
            .ok_or_else(|| ModelError::Missing {
                key: name.into(),
                what: dir.display().to_string(),
            })?
            .to_dtype(DType::F32)?)
    };
    let a = &cfg.arch;
    let mut out_tensors: Vec<(String, Tensor)> =
        vec![(Role::Embed.gguf(), take(&Role::Embed.hf(a))?)];
    if !cfg.tie_word_embeddings {
        out_tensors.push((Role::LmHead.gguf(), take(&Role::LmHead.hf(a))?));
    }
    // Every norm, by the table; LayerNorms (BLOOM) with their biases.
    for role in Role::norms(a, cfg.num_layers) {
        out_tensors.push((role.gguf(), take(&role.hf(a))?));
        if a.norm == super::config::NormKind::Layer {
            out_tensors.push((bias_of(&role.gguf()), take(&bias_of(&role.hf(a)))?));
        }
    }
    let bloom = a.naming == super::config::Naming::Bloom;
    for layer in 0..cfg.num_layers {
        if bloom {
            // `[q | k | v]` blocks out of the per-head interleaved rows.
            let order: Vec<usize> = [Target::Q, Target::K, Target::V]
                .into_iter()
                .flat_map(|t| cfg.stored_module(ModuleId { layer, target: t }).rows)
                .collect();
            let qkv = names::module_path(a, ModuleId { layer, target: Target::Q });
            for what in ["weight", "bias"] {
                let t = take(&format!("{qkv}.{what}"))?;
                out_tensors.push((names::gguf_qkv(layer, what), super::select_rows(&t, &order)?));
            }
            for target in [Target::O, Target::Up, Target::Down] {
                let id = ModuleId { layer, target };
                for what in ["weight", "bias"] {
                    let hf = format!("{}.{what}", names::module_path(a, id));
                    out_tensors.push((names::gguf_projection(id, what), take(&hf)?));
                }
            }
            continue;
        }
        if cfg.arch.combined_modules {
            // Phi-3: llama.cpp keeps the combined modules whole (`attn_qkv`, and `ffn_up` for
            // `gate_up_proj`), rows in the checkpoint's own order.
            let path = |target| names::module_path(a, ModuleId { layer, target });
            out_tensors.push((
                names::gguf_qkv(layer, "weight"),
                take(&format!("{}.weight", path(Target::Q)))?,
            ));
            out_tensors
                .push((names::gguf_gate_up(layer), take(&format!("{}.weight", path(Target::Up)))?));
        }
        for target in Target::ALL {
            if cfg.arch.combined_modules && !matches!(target, Target::O | Target::Down) {
                continue;
            }
            let id = ModuleId { layer, target };
            let heads = match target {
                Target::Q if a.gguf_qk_interleaved => Some(cfg.num_heads),
                Target::K if a.gguf_qk_interleaved => Some(cfg.num_kv_heads),
                _ => None,
            };
            let path = names::module_path(a, id);
            let mut parts = vec![("weight", take(&format!("{path}.weight"))?)];
            if cfg.arch.has_bias(target) {
                parts.push(("bias", take(&format!("{path}.bias"))?));
            }
            for (what, t) in parts {
                let t = match heads {
                    Some(h) => permute_rows(&t, h)?,
                    None => t,
                };
                out_tensors.push((names::gguf_projection(id, what), t));
            }
        }
    }
    if cfg.rope_scaling != RopeScaling::None {
        let plain = DecoderConfig { rope_scaling: RopeScaling::None, ..cfg.clone() }.inv_freq();
        let divisors: Vec<f32> = plain.iter().zip(cfg.inv_freq()).map(|(p, s)| p / s).collect();
        let n = divisors.len();
        out_tensors
            .push(("rope_freqs.weight".into(), Tensor::from_vec(divisors, n, &Device::Cpu)?));
    }
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.clone())),
        (
            "general.name".into(),
            Value::String(
                dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            ),
        ),
        (format!("{arch}.block_count"), u32v(cfg.num_layers)),
        (format!("{arch}.context_length"), u32v(cfg.max_position_embeddings)),
        (format!("{arch}.embedding_length"), u32v(cfg.hidden_size)),
        (format!("{arch}.feed_forward_length"), u32v(cfg.intermediate_size)),
        (format!("{arch}.attention.head_count"), u32v(cfg.num_heads)),
        (format!("{arch}.attention.head_count_kv"), u32v(cfg.num_kv_heads)),
        (format!("{arch}.attention.key_length"), u32v(cfg.head_dim)),
        (format!("{arch}.attention.value_length"), u32v(cfg.head_dim)),
        (format!("{arch}.rope.dimension_count"), u32v(cfg.head_dim)),
        (
            format!(
                "{arch}.attention.{}",
                if bloom { "layer_norm_epsilon" } else { "layer_norm_rms_epsilon" }
            ),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (format!("{arch}.vocab_size"), u32v(cfg.vocab_size)),
    ];
    meta.extend(tokenizer_metadata(dir, pre)?);
    let q: Vec<(String, QTensor)> = out_tensors
        .into_iter()
        .map(|(n, t)| Ok((n, QTensor::quantize(&t, GgmlDType::F32)?)))
        .collect::<Result<_>>()?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out)
        .map_err(|source| ModelError::Io { path: out.display().to_string(), source })?;
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

/// Writes a GGUF model (Llama, Qwen2, Qwen3 or Gemma 3) as a Hugging Face folder with its
/// weights dequantized to f32: `config.json`, `model.safetensors`, `tokenizer.json`,
/// `tokenizer_config.json`. Weights are read through the GGUF loader, so they arrive in
/// Hugging Face layout; Gemma's norms are written as `w` (the GGUF stores `1 + w`).
pub fn write_hf_from_gguf(gguf: &Path, out: &Path) -> Result<()> {
    use super::weights::WeightSource;
    use super::WeightFormat;
    let mut src = super::gguf::GgufSource::open(gguf, &Device::Cpu)?;
    let cfg = src.cfg.clone();
    let arch = cfg.arch.clone();
    let model_type = super::family::hf_model_type(&arch.name).to_string();
    // A config carries no bias flags we write: the family's own biases are all it can say.
    let family_biases =
        super::family::from_hf(&model_type).map(|f| f.arch(&model_type).biased).unwrap_or_default();
    if arch.combined_modules
        || arch.naming != super::config::Naming::Llama
        || arch.biased != family_biases
    {
        return Err(ModelError::Unsupported(format!(
            "writing `{}` as a Hugging Face folder",
            arch.name
        )));
    }
    let tokenizer = super::tokenizer::TextTokenizer::from_gguf(&src.content)?;
    std::fs::create_dir_all(out)
        .map_err(|source| ModelError::Io { path: out.display().to_string(), source })?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(Role::Embed.hf(&arch), src.embed()?);
    if !cfg.tie_word_embeddings {
        let head = src.lm_head(WeightFormat::Dense(DType::F32))?.to_dense_f32()?;
        tensors.insert(Role::LmHead.hf(&arch), head);
    }
    for role in Role::norms(&arch, cfg.num_layers) {
        let len = match role {
            Role::QNorm(_) | Role::KNorm(_) => cfg.head_dim,
            _ => cfg.hidden_size,
        };
        // Written as `w`: the GGUF (and so the loader) holds `1 + w` where norms scale by it.
        let w = src.norm(role, len)?;
        tensors.insert(role.hf(&arch), if arch.norm_plus_one { (w - 1.0)? } else { w });
    }
    for layer in 0..cfg.num_layers {
        for target in Target::ALL {
            let id = ModuleId { layer, target };
            let path = names::module_path(&arch, id);
            let w = src.linear(id, WeightFormat::Dense(DType::F32))?.to_dense_f32()?;
            tensors.insert(format!("{path}.weight"), w);
            if arch.has_bias(target) {
                tensors.insert(format!("{path}.bias"), src.bias(id)?);
            }
        }
    }
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    let mut config = serde_json::json!({
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    });
    if cfg.rope_scaling != RopeScaling::None {
        return Err(ModelError::Unsupported(
            "writing rope scaling into a Hugging Face config".into(),
        ));
    }
    // Gemma 3 (the one family with sandwich norms): its windows, score scale and activation.
    if arch.sandwich_norms {
        let window = arch.windows.iter().flatten().next().copied();
        config["sliding_window"] = serde_json::json!(window);
        config["layer_types"] = serde_json::json!(arch
            .windows
            .iter()
            .map(|w| if w.is_some() { "sliding_attention" } else { "full_attention" })
            .collect::<Vec<_>>());
        config["query_pre_attn_scalar"] = serde_json::json!(arch.query_pre_attn_scalar);
        config["hidden_activation"] = serde_json::json!("gelu_pytorch_tanh");
        config["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": arch.local_rope_theta.unwrap_or(10_000.0)},
        });
    }
    let write = |name: &str, text: String| {
        std::fs::write(out.join(name), text)
            .map_err(|source| ModelError::Io { path: out.join(name).display().to_string(), source })
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&config).map_err(|e| invalid(out, e.to_string()))?,
    )?;
    tokenizer.save_dir(out)
}
