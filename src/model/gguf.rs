//! GGUF files (llama.cpp's format): architecture from the metadata, weights quantized as
//! stored, re-quantized, or dequantized to a float type, Q/K rows un-permuted to Hugging Face
//! order so that PEFT adapters apply unchanged.

use super::linear::BaseWeight;
use super::names::{self, bias_of, Role};
use super::weights::{dense_to_base, packed_from_qtensor, packed_rows_from_qtensor, WeightSource};
use super::{DecoderConfig, ModelError, ModuleId, Result, Target, WeightFormat};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

/// An open GGUF file: its metadata and a reader for its tensors.
pub struct GgufSource {
    pub path: PathBuf,
    pub content: Content,
    pub cfg: DecoderConfig,
    file: File,
    device: Device,
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io { path: path.display().to_string(), source }
}

impl GgufSource {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| io_err(path, e))?;
        let content = Content::read(&mut file).map_err(|e| ModelError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let cfg = config_from_metadata(&content)?;
        let mut src = Self { path: path.to_path_buf(), content, cfg, file, device: device.clone() };
        // Llama 3.x GGUFs carry their rope scaling as per-frequency divisors.
        if src.content.tensor_infos.contains_key("rope_freqs.weight") {
            let d = src
                .dense("rope_freqs.weight")?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            if d.len() != src.cfg.head_dim / 2 || d.iter().any(|x| !x.is_finite() || *x <= 0.0) {
                return Err(ModelError::Invalid {
                    path: path.display().to_string(),
                    reason: format!(
                        "`rope_freqs.weight` must hold {} positive values",
                        src.cfg.head_dim / 2
                    ),
                });
            }
            src.cfg.rope_scaling = super::RopeScaling::Divisors(d);
        }
        Ok(src)
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(ModelError::Missing {
                key: name.to_string(),
                what: self.path.display().to_string(),
            });
        }
        Ok(self.content.tensor(&mut self.file, name, &Device::Cpu)?)
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.qtensor(name)?.dequantize(&Device::Cpu)?)
    }
}

/// Reads the Llama hyper-parameters from `{arch}.*` metadata keys.
pub fn config_from_metadata(c: &Content) -> Result<DecoderConfig> {
    let arch = match c.metadata.get("general.architecture") {
        Some(v) => v.to_string()?.clone(),
        None => {
            return Err(ModelError::Missing {
                key: "general.architecture".into(),
                what: "GGUF metadata".into(),
            })
        }
    };
    let family = super::family::from_gguf(&arch).map_err(ModelError::Unsupported)?;
    let get = |k: &str| -> Result<&Value> {
        let key = format!("{arch}.{k}");
        c.metadata.get(&key).ok_or(ModelError::Missing { key, what: "GGUF metadata".into() })
    };
    let num_heads = get("attention.head_count")?.to_u32()? as usize;
    let hidden_size = get("embedding_length")?.to_u32()? as usize;
    let vocab_size = match get("vocab_size") {
        Ok(v) => v.to_u32()? as usize,
        Err(_) => match c.metadata.get("tokenizer.ggml.tokens") {
            Some(t) => t.to_vec()?.len(),
            None => {
                return Err(ModelError::Missing {
                    key: format!("{arch}.vocab_size"),
                    what: "GGUF metadata".into(),
                })
            }
        },
    };
    if let Ok(kind) = get("rope.scaling.type") {
        let kind = kind.to_string()?;
        if kind != "none" {
            return Err(ModelError::Unsupported(format!(
                "GGUF `{arch}.rope.scaling.type` `{kind}` is not supported"
            )));
        }
    }
    let num_layers = get("block_count")?.to_u32()? as usize;
    Ok(DecoderConfig {
        vocab_size,
        hidden_size,
        intermediate_size: get("feed_forward_length")?.to_u32()? as usize,
        num_layers,
        num_heads,
        num_kv_heads: get("attention.head_count_kv").map_or(Ok(num_heads as u32), |v| v.to_u32())?
            as usize,
        head_dim: get("rope.dimension_count")
            .or_else(|_| get("attention.key_length"))
            .map_or(Ok((hidden_size / num_heads) as u32), |v| v.to_u32())?
            as usize,
        // BLOOM's LayerNorms have their own key.
        rms_norm_eps: get("attention.layer_norm_rms_epsilon")
            .or_else(|_| get("attention.layer_norm_epsilon"))?
            .to_f32()? as f64,
        rope_theta: get("rope.freq_base").map_or(Ok(10_000.0), |v| v.to_f32())? as f64,
        rope_scaling: super::RopeScaling::None,
        max_position_embeddings: get("context_length").map_or(Ok(4096), |v| v.to_u32())? as usize,
        tie_word_embeddings: !c.tensor_infos.contains_key(&Role::LmHead.gguf()),
        arch: arch_from_metadata(c, family, &arch, num_layers)?,
    })
}

/// The family's description ([`super::family`]) with what a GGUF shows of the variation
/// within it: biases as tensors of the first block (where the family's GGUFs carry them),
/// windows from `{arch}.attention.sliding_window` by the family's rule. Gemma 3's layer
/// pattern, score scale and local rope base have no keys: they take the table's values (the
/// ones transformers falls back to). A q/k norm the table and the tensors disagree on, and
/// what the family does not compute, are refused by name.
fn arch_from_metadata(
    c: &Content,
    family: &super::family::Family,
    arch: &str,
    num_layers: usize,
) -> Result<super::config::Arch> {
    use super::family::Windows;
    let has = |name: &str| c.tensor_infos.contains_key(name);
    let mut a = family.arch(arch);
    if let Some(t) = family.gguf_refused_tensors.iter().find(|t| has(t)) {
        return Err(ModelError::Unsupported(format!(
            "GGUF tensor `{t}` is not supported for `{arch}`"
        )));
    }
    if let Some(k) =
        family.gguf_refused_keys.iter().find(|k| c.metadata.contains_key(&format!("{arch}.{k}")))
    {
        return Err(ModelError::Unsupported(format!("GGUF `{arch}.{k}` is not supported")));
    }
    if family.gguf_detects_biases {
        a.biased = Target::ALL
            .into_iter()
            .filter(|&t| has(&names::gguf_projection(ModuleId { layer: 0, target: t }, "bias")))
            .collect();
    }
    if has(&Role::QNorm(0).gguf()) != a.qk_norm {
        return Err(ModelError::Invalid {
            path: arch.to_string(),
            reason: format!(
                "a `{arch}` GGUF {} q/k norms",
                if a.qk_norm { "lacks" } else { "has unexpected" }
            ),
        });
    }
    let key = format!("{arch}.attention.sliding_window");
    let window = c.metadata.get(&key).map(|w| w.to_u32()).transpose()?.map(|w| w as usize);
    a.windows = match (family.windows, window) {
        (Windows::EveryNthGlobal(n), Some(w)) => {
            (0..num_layers).map(|l| if (l + 1) % n == 0 { None } else { Some(w) }).collect()
        }
        (Windows::EveryNthGlobal(_), None) => {
            return Err(ModelError::Missing { key, what: "GGUF metadata".into() })
        }
        (_, Some(w)) => vec![Some(w); num_layers],
        (_, None) => Vec::new(),
    };
    Ok(a)
}

/// Hugging Face row `r` of a Q/K weight comes from GGUF row `unpermute_src(r)`: llama.cpp
/// interleaves the two rotary halves of every head.
fn unpermute_src(r: usize, head_dim: usize) -> usize {
    let (head, within) = (r / head_dim, r % head_dim);
    let half = head_dim / 2;
    let (j, i) = (within / half, within % half);
    head * head_dim + 2 * i + j
}

/// Rows `rows` of a quantized tensor, in that order: blocks run along rows, so moving whole
/// rows is exact (no re-quantization). Serves the Q/K un-permutation and fused-tensor parts.
fn gather_quantized_rows(q: &QTensor, rows: &[usize]) -> Result<QTensor> {
    let fan_in = q.shape().dims2()?.1;
    let dt = q.dtype();
    let row_bytes = fan_in / dt.block_size() * dt.type_size();
    let data = q.data()?;
    let mut moved = Vec::with_capacity(rows.len() * row_bytes);
    for &src in rows {
        moved.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(moved), &Device::Cpu, dt)?;
    Ok(QTensor::new(storage, (rows.len(), fan_in))?)
}

impl GgufSource {
    /// A 1-D f32 tensor of `len` values.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let w = self.dense(name)?.to_dtype(DType::F32)?;
        if w.dims() != [len] {
            return Err(ModelError::Invalid {
                path: self.path.display().to_string(),
                reason: format!("`{name}` has shape {:?}, expected [{len}]", w.dims()),
            });
        }
        Ok(w.to_device(&self.device)?)
    }

    /// The GGUF tensor holding projection `id` and which of its rows are the projection's, in
    /// Hugging Face order: Llama's Q/K rows un-interleaved, Phi-3's fused `attn_qkv` (`[q|k|v]`)
    /// and `ffn_up` (`[gate|up]`, llama.cpp's name for `gate_up_proj`) split.
    fn stored_rows(&self, id: ModuleId) -> (String, Vec<usize>) {
        let out = self.cfg.proj_dims(id.target).1;
        if self.cfg.arch.naming == super::config::Naming::Bloom {
            // llama.cpp's converter turns BLOOM's per-head interleaved `query_key_value` into
            // `[q | k | v]` blocks (bias likewise).
            let q = self.cfg.num_heads * self.cfg.head_dim;
            let part = |i: usize| (i * q..(i + 1) * q).collect();
            let qkv = names::gguf_qkv(id.layer, "weight");
            return match id.target {
                Target::Q => (qkv, part(0)),
                Target::K => (qkv, part(1)),
                Target::V => (qkv, part(2)),
                _ => (names::gguf_projection(id, "weight"), (0..out).collect()),
            };
        }
        if self.cfg.arch.combined_modules {
            let m = self.cfg.stored_module(id);
            let name = match id.target {
                Target::Q | Target::K | Target::V => names::gguf_qkv(id.layer, "weight"),
                Target::Gate | Target::Up => names::gguf_gate_up(id.layer),
                _ => names::gguf_projection(id, "weight"),
            };
            return (name, m.rows);
        }
        let rows = match self.qk_heads(id.target) {
            Some(h) => (0..out).map(|r| unpermute_src(r, out / h)).collect(),
            None => (0..out).collect(),
        };
        (names::gguf_projection(id, "weight"), rows)
    }

    /// The head count whose rows llama.cpp interleaved in this Q/K weight: its converter does
    /// that for Llama-family files only (Qwen's rope pairs the halves as Hugging Face does).
    fn qk_heads(&self, target: Target) -> Option<usize> {
        if !self.cfg.arch.gguf_qk_interleaved {
            return None;
        }
        match target {
            Target::Q => Some(self.cfg.num_heads),
            Target::K => Some(self.cfg.num_kv_heads),
            _ => None,
        }
    }

    fn quantized_onto(&self, q: QTensor) -> Result<BaseWeight> {
        if self.device.is_cpu() {
            return BaseWeight::quantized(q);
        }
        let storage = QStorage::from_data(q.data()?, &self.device, q.dtype())?;
        BaseWeight::quantized(QTensor::new(storage, q.shape().clone())?)
    }
}

impl WeightSource for GgufSource {
    fn embed(&mut self) -> Result<Tensor> {
        Ok(self.dense(&Role::Embed.gguf())?.to_device(&self.device)?)
    }

    /// Gemma's GGUF norms already hold `1 + w`.
    fn norm(&mut self, role: Role, len: usize) -> Result<Tensor> {
        self.vector(&role.gguf(), len)
    }

    fn norm_bias(&mut self, role: Role, len: usize) -> Result<Tensor> {
        self.vector(&bias_of(&role.gguf()), len)
    }

    fn bias(&mut self, id: ModuleId) -> Result<Tensor> {
        let (name, rows) = self.stored_rows(id);
        let name = bias_of(&name);
        let b = self.dense(&name)?.to_dtype(DType::F32)?;
        if b.rank() != 1 || rows.iter().any(|&r| r >= b.dim(0).unwrap_or(0)) {
            return Err(ModelError::Invalid {
                path: self.path.display().to_string(),
                reason: format!("`{name}` has shape {:?}", b.dims()),
            });
        }
        Ok(super::select_rows(&b, &rows)?.to_device(&self.device)?)
    }

    fn linear(&mut self, id: ModuleId, format: WeightFormat) -> Result<BaseWeight> {
        let (name, rows) = self.stored_rows(id);
        let q = self.qtensor(&name)?;
        let (stored, fan_in) = q.shape().dims2()?;
        if fan_in != self.cfg.proj_dims(id.target).0 || rows.iter().any(|&r| r >= stored) {
            return Err(ModelError::Invalid {
                path: self.path.display().to_string(),
                reason: format!("`{name}` has shape {:?}", q.shape().dims()),
            });
        }
        let whole = rows.len() == stored && rows.iter().enumerate().all(|(i, &r)| i == r);
        if format == WeightFormat::Packed {
            return packed_rows_from_qtensor(&q, rows.len(), |r| rows[r]);
        }
        let stored_quantized =
            !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if matches!(format, WeightFormat::Quantized(None)) && stored_quantized {
            let q = if whole { q } else { gather_quantized_rows(&q, &rows)? };
            return self.quantized_onto(q);
        }
        let w = q.dequantize(&Device::Cpu)?;
        let w = if whole { w } else { super::select_rows(&w, &rows)? };
        dense_to_base(w, format, &self.device)
    }

    fn lm_head(&mut self, format: WeightFormat) -> Result<BaseWeight> {
        let role = if self.cfg.tie_word_embeddings { Role::Embed } else { Role::LmHead };
        let name = &role.gguf();
        if format == WeightFormat::Packed {
            return packed_from_qtensor(&self.qtensor(name)?, |r| r);
        }
        if matches!(format, WeightFormat::Quantized(None)) {
            let q = self.qtensor(name)?;
            return self.quantized_onto(q);
        }
        let w = self.dense(name)?;
        dense_to_base(w, format, &self.device)
    }
}

/// Loads a GGUF model (weights and the source, whose metadata the tokenizer reads).
pub fn load(
    path: &Path,
    format: WeightFormat,
    device: &Device,
) -> Result<(super::Decoder, GgufSource)> {
    let mut src = GgufSource::open(path, device)?;
    let cfg = src.cfg.clone();
    let model = super::Decoder::load(cfg, &mut src, format, device)?;
    Ok((model, src))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The un-permutation as a reshape: the reference the row map is checked against.
    fn unpermute_dense(w: &Tensor, heads: usize) -> Result<Tensor> {
        let (out, fan_in) = w.dims2()?;
        let hd = out / heads;
        Ok(w.reshape((heads, hd / 2, 2, fan_in))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((out, fan_in))?)
    }

    #[test]
    fn unpermute_indices_match_the_dense_reshape() {
        let (heads, hd, fan_in) = (3, 8, 2);
        let w = Tensor::arange(0f32, (heads * hd * fan_in) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, fan_in))
            .unwrap();
        let dense = unpermute_dense(&w, heads).unwrap().to_vec2::<f32>().unwrap();
        let rows = w.to_vec2::<f32>().unwrap();
        for (r, row) in dense.iter().enumerate() {
            assert_eq!(row, &rows[unpermute_src(r, hd)], "row {r}");
        }
    }
}
