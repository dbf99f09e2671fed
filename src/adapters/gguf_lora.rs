//! Export of a PEFT adapter to llama.cpp's GGUF LoRA format (`general.type = adapter`,
//! `adapter.type = lora`, tensors `<base tensor>.lora_a` / `.lora_b`), so the same adapter can
//! be served by llama.cpp (the side-by-side benchmark does exactly that).
//!
//! Two conventions differ from PEFT: llama.cpp's converter permutes the rows of Q and K for its
//! interleaved rope, so `lora_B` rows of `q_proj`/`k_proj` are permuted the same way; and its
//! scale is `alpha / rank` with one `alpha` per file, so each module's own scaling (rank and
//! alpha patterns, rsLoRA) is folded into `lora_B` and `alpha` is written as 0, which llama.cpp
//! reads as "scale = the request's scale".

use super::{AdapterError, LoraAdapter};
use crate::model::{DecoderConfig, ModuleId, Target};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The Hugging Face row that GGUF row `g` of a Q/K weight holds (heads of `head_dim` rows,
/// llama.cpp interleaving the two rotary halves).
pub fn hf_row_of_gguf_row(g: usize, head_dim: usize) -> usize {
    let (head, w) = (g / head_dim, g % head_dim);
    head * head_dim + (w % 2) * (head_dim / 2) + w / 2
}

/// Writes `adapter` for a base of `arch` (GGUF `general.architecture`) with `cfg` to `path`.
pub fn write_gguf_lora(
    adapter: &LoraAdapter,
    cfg: &DecoderConfig,
    arch: &str,
    path: &Path,
) -> Result<(), AdapterError> {
    if !adapter.vocab.is_empty() {
        // llama.cpp's LoRA covers the linear layers: the embedding and head parts would be lost.
        return Err(AdapterError::Unsupported(
            "an adapter that changes the embedding or the output head (LoRA there, \
             `modules_to_save`, trainable tokens) has no GGUF LoRA form; serve it from its PEFT folder"
                .into(),
        ));
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for id in ModuleId::all(cfg.num_layers) {
        let Some(w) = adapter.module(id) else { continue };
        if w.dora.is_some() {
            // llama.cpp's LoRA format has no magnitude: a DoRA adapter is not a sum of B A.
            return Err(AdapterError::Unsupported(
                "DoRA (`use_dora: true`) has no GGUF LoRA form; serve it from its PEFT folder"
                    .into(),
            ));
        }
        let b = (w.b.to_device(&Device::Cpu)? * w.scaling)?;
        let b = match id.target {
            Target::Q | Target::K if cfg.arch.gguf_qk_interleaved => {
                let rows = b.dim(0)?;
                let order: Vec<u32> =
                    (0..rows).map(|g| hf_row_of_gguf_row(g, cfg.head_dim) as u32).collect();
                b.index_select(&Tensor::from_vec(order, rows, &Device::Cpu)?, 0)?
            }
            _ => b,
        };
        let name = crate::model::names::gguf_projection(id, "weight");
        tensors.push((
            format!("{name}.lora_a"),
            QTensor::quantize(&w.a.to_device(&Device::Cpu)?.contiguous()?, GgmlDType::F32)?,
        ));
        tensors
            .push((format!("{name}.lora_b"), QTensor::quantize(&b.contiguous()?, GgmlDType::F32)?));
    }
    let meta = [
        ("general.type", Value::String("adapter".into())),
        ("general.architecture", Value::String(arch.into())),
        ("general.name", Value::String(adapter.name.clone())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(0.0)),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let io = |source| AdapterError::Io { path: path.display().to_string(), source };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    gguf_file::write(&mut f, &meta, &refs)?;
    std::io::Write::flush(&mut f).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_map_inverts_the_loaders_unpermutation() {
        // The loader reads HF row r from GGUF row 2i + j where r = j·half + i within a head.
        let hd = 8;
        for g in 0..3 * hd {
            let r = hf_row_of_gguf_row(g, hd);
            let (head, within) = (r / hd, r % hd);
            let (j, i) = (within / (hd / 2), within % (hd / 2));
            assert_eq!(head * hd + 2 * i + j, g);
        }
    }
}
