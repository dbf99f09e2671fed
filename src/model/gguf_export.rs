//! Writes a Hugging Face folder as an f32 GGUF file in llama.cpp's conventions (its tensor names,
//! Llama's Q/K rows interleaved per head, Llama 3 rope scaling as `rope_freqs.weight`, the
//! byte-level BPE vocabulary as `tokenizer.ggml.*`): so that the GGUF loader is tested against
//! the same reference outputs as the folder it came from, and users can convert a folder.

use super::config::{DecoderConfig, RopeScaling};
use super::{ModelError, ModuleId, Result, Target};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

fn invalid(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid { path: path.display().to_string(), reason: reason.into() }
}

/// The GGUF name of a projection's tensor (`weight` or `bias`).
fn proj_name(id: ModuleId, what: &str) -> String {
    super::gguf::tensor_name(id).replace(".weight", &format!(".{what}"))
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
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "bloom") {
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
    if arch == "bloom" {
        // BLOOM's names and its per-head interleaved qkv map onto llama.cpp's by table.
        let renamed: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                let k = match k.as_str() {
                    "transformer.word_embeddings.weight" => "model.embed_tokens.weight".to_string(),
                    n if n.starts_with("transformer.word_embeddings_layernorm.") => {
                        n.replace("transformer.word_embeddings_layernorm.", "model.embed_norm.")
                    }
                    n if n.starts_with("transformer.ln_f.") => {
                        n.replace("transformer.ln_f.", "model.norm.")
                    }
                    n => n.replace("transformer.h.", "model.layers."),
                };
                (k, v)
            })
            .collect();
        tensors = renamed;
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
    let interleave = matches!(arch.as_str(), "llama" | "mistral");
    let mut out_tensors: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), take("model.embed_tokens.weight")?),
        ("output_norm.weight".into(), take("model.norm.weight")?),
    ];
    let bloom = arch == "bloom";
    if bloom {
        out_tensors.push(("output_norm.bias".into(), take("model.norm.bias")?));
        out_tensors.push(("token_embd_norm.weight".into(), take("model.embed_norm.weight")?));
        out_tensors.push(("token_embd_norm.bias".into(), take("model.embed_norm.bias")?));
    }
    if !cfg.tie_word_embeddings {
        out_tensors.push(("output.weight".into(), take("lm_head.weight")?));
    }
    for layer in 0..cfg.num_layers {
        let p = format!("model.layers.{layer}");
        out_tensors.push((
            format!("blk.{layer}.attn_norm.weight"),
            take(&format!("{p}.input_layernorm.weight"))?,
        ));
        out_tensors.push((
            format!("blk.{layer}.ffn_norm.weight"),
            take(&format!("{p}.post_attention_layernorm.weight"))?,
        ));
        if cfg.arch.qk_norm {
            out_tensors.push((
                format!("blk.{layer}.attn_q_norm.weight"),
                take(&format!("{p}.self_attn.q_norm.weight"))?,
            ));
            out_tensors.push((
                format!("blk.{layer}.attn_k_norm.weight"),
                take(&format!("{p}.self_attn.k_norm.weight"))?,
            ));
        }
        if bloom {
            for (hf, gguf) in
                [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]
            {
                out_tensors
                    .push((format!("blk.{layer}.{gguf}.bias"), take(&format!("{p}.{hf}.bias"))?));
            }
            // `[q | k | v]` blocks out of the per-head interleaved rows.
            let order: Vec<usize> = [Target::Q, Target::K, Target::V]
                .into_iter()
                .flat_map(|t| cfg.stored_module(ModuleId { layer, target: t }).rows)
                .collect();
            for what in ["weight", "bias"] {
                let t = take(&format!("{p}.self_attention.query_key_value.{what}"))?;
                out_tensors.push((
                    format!("blk.{layer}.attn_qkv.{what}"),
                    super::select_rows(&t, &order)?,
                ));
            }
            for (target, hf) in [
                (Target::O, "self_attention.dense"),
                (Target::Up, "mlp.dense_h_to_4h"),
                (Target::Down, "mlp.dense_4h_to_h"),
            ] {
                for what in ["weight", "bias"] {
                    out_tensors.push((
                        proj_name(ModuleId { layer, target }, what),
                        take(&format!("{p}.{hf}.{what}"))?,
                    ));
                }
            }
            continue;
        }
        if cfg.arch.combined_modules {
            // Phi-3: llama.cpp keeps the combined modules whole (`attn_qkv`, and `ffn_up` for
            // `gate_up_proj`), rows in the checkpoint's own order.
            out_tensors.push((
                format!("blk.{layer}.attn_qkv.weight"),
                take(&format!("{p}.self_attn.qkv_proj.weight"))?,
            ));
            out_tensors.push((
                format!("blk.{layer}.ffn_up.weight"),
                take(&format!("{p}.mlp.gate_up_proj.weight"))?,
            ));
        }
        for target in Target::ALL {
            if cfg.arch.combined_modules && !matches!(target, Target::O | Target::Down) {
                continue;
            }
            let id = ModuleId { layer, target };
            let heads = match target {
                Target::Q if interleave => Some(cfg.num_heads),
                Target::K if interleave => Some(cfg.num_kv_heads),
                _ => None,
            };
            let mut parts = vec![("weight", take(&format!("{id}.weight"))?)];
            if cfg.arch.has_bias(target) {
                parts.push(("bias", take(&format!("{id}.bias"))?));
            }
            for (what, t) in parts {
                let t = match heads {
                    Some(h) => permute_rows(&t, h)?,
                    None => t,
                };
                out_tensors.push((proj_name(id, what), t));
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
    if arch.combined_modules
        || arch.naming != super::config::Naming::Llama
        || !arch.biased.is_empty() && arch.name != "qwen2"
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
    let gemma = arch.name == "gemma3";
    let norm = |src: &mut super::gguf::GgufSource, name: &str, len: usize| -> Result<Tensor> {
        let w = src.norm(name, len)?;
        Ok(if gemma { (w - 1.0)? } else { w })
    };
    tensors.insert("model.embed_tokens.weight".into(), src.embed()?);
    tensors
        .insert("model.norm.weight".into(), norm(&mut src, "model.norm.weight", cfg.hidden_size)?);
    if !cfg.tie_word_embeddings {
        tensors.insert(
            "lm_head.weight".into(),
            src.lm_head(WeightFormat::Dense(DType::F32))?.to_dense_f32()?,
        );
    }
    for layer in 0..cfg.num_layers {
        let mut norms = vec!["input_layernorm".to_string(), "post_attention_layernorm".to_string()];
        if arch.sandwich_norms {
            norms.extend([
                "pre_feedforward_layernorm".to_string(),
                "post_feedforward_layernorm".to_string(),
            ]);
        }
        for n in norms {
            let name = format!("model.layers.{layer}.{n}.weight");
            tensors.insert(name.clone(), norm(&mut src, &name, cfg.hidden_size)?);
        }
        if arch.qk_norm {
            for n in ["q_norm", "k_norm"] {
                let name = format!("model.layers.{layer}.self_attn.{n}.weight");
                tensors.insert(name.clone(), norm(&mut src, &name, cfg.head_dim)?);
            }
        }
        for target in Target::ALL {
            let id = ModuleId { layer, target };
            tensors.insert(
                format!("{id}.weight"),
                src.linear(id, WeightFormat::Dense(DType::F32))?.to_dense_f32()?,
            );
            if arch.has_bias(target) {
                tensors.insert(format!("{id}.bias"), src.bias(id)?);
            }
        }
    }
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    let model_type = if gemma { "gemma3_text" } else { arch.name.as_str() };
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
    if gemma {
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
