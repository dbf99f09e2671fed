//! Base weights as the decoder takes them: the loader trait every weight format implements
//! ([`WeightSource`]: GGUF, Hugging Face folders, the seeded random source), and the
//! conversions they share into a [`BaseWeight`] of the chosen format (dense, candle-quantized,
//! or packed: without loss from GGUF blocks, 8-bit from floats).

use super::linear::BaseWeight;
use super::names::Role;
use super::{ModelError, ModuleId, Result, WeightFormat};
use crate::kernels::{ggml, Kind, PackedMatrix};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

/// Where a loader's tensors come from; implemented by the GGUF and Hugging Face loaders.
/// Every tensor is returned in Hugging Face layout (GGUF Q/K rows un-permuted).
pub trait WeightSource {
    /// `(vocab, hidden)`, f32.
    fn embed(&mut self) -> Result<Tensor>;
    /// A norm's weight, f32, checked to hold `len` values (Gemma's as the `1 + w` it scales by).
    fn norm(&mut self, role: Role, len: usize) -> Result<Tensor>;
    /// The bias of a LayerNorm.
    fn norm_bias(&mut self, role: Role, len: usize) -> Result<Tensor>;
    /// The additive bias `(out)` of a projection the architecture gives one, f32.
    fn bias(&mut self, id: ModuleId) -> Result<Tensor>;
    fn linear(&mut self, id: ModuleId, format: WeightFormat) -> Result<BaseWeight>;
    /// The output head; tied models return the embedding in `format`.
    fn lm_head(&mut self, format: WeightFormat) -> Result<BaseWeight>;
}

/// A dense f32 weight (HF layout, on CPU) as a [`BaseWeight`] of `format` on `device`.
pub fn dense_to_base(w: Tensor, format: WeightFormat, device: &Device) -> Result<BaseWeight> {
    Ok(match format {
        WeightFormat::Dense(dt) => BaseWeight::Dense(w.to_dtype(dt)?.to_device(device)?),
        WeightFormat::Quantized(t) => BaseWeight::quantized(QTensor::quantize_onto(
            &w,
            t.unwrap_or(GgmlDType::Q8_0),
            device,
        )?)?,
        WeightFormat::Packed => packed_from_dense(&w)?,
    })
}

/// Float weights in the packed layout: 8-bit codes per 32 values (the one lossy case).
pub fn packed_from_dense(w: &Tensor) -> Result<BaseWeight> {
    let (rows, cols) = w.dims2()?;
    check_packable(cols)?;
    let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let p = PackedMatrix::pack(rows, cols, Kind::W8, |r, codes| {
        ggml::quantize_row_8bit(&data[r * cols..(r + 1) * cols], codes);
        Ok::<(), ModelError>(())
    })?;
    Ok(BaseWeight::Packed(std::sync::Arc::new(p)))
}

fn check_packable(cols: usize) -> Result<()> {
    if cols % 32 != 0 {
        return Err(ModelError::Unsupported(format!("`--dtype packed` needs input widths that are multiples of 32, got {cols}; use --dtype f32")));
    }
    Ok(())
}

/// A GGUF tensor in the packed layout without loss (its blocks decoded as stored), rows taken
/// in the order `src_row(r)` gives (the Q/K un-permutation).
pub fn packed_from_qtensor(q: &QTensor, src_row: impl Fn(usize) -> usize) -> Result<BaseWeight> {
    packed_rows_from_qtensor(q, q.shape().dims2()?.0, src_row)
}

/// [`packed_from_qtensor`] for `rows` rows (a part of a fused tensor).
pub(super) fn packed_rows_from_qtensor(
    q: &QTensor,
    rows: usize,
    src_row: impl Fn(usize) -> usize,
) -> Result<BaseWeight> {
    let cols = q.shape().dims2()?.1;
    check_packable(cols)?;
    let dt = q.dtype();
    if ggml::code_bits(dt).is_none()
        && !matches!(dt, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    {
        let w = q.dequantize(&Device::Cpu)?;
        let order: Vec<u32> = (0..rows).map(|r| src_row(r) as u32).collect();
        return packed_from_dense(
            &w.index_select(&Tensor::from_vec(order, rows, &Device::Cpu)?, 0)?,
        );
    }
    let data = q.data()?;
    let p = PackedMatrix::pack(rows, cols, ggml::packed_kind(dt), |r, codes| {
        ggml::decode_row(dt, &data, cols, src_row(r), codes)
    })
    .map_err(|e| ModelError::Unsupported(e.to_string()))?;
    Ok(BaseWeight::Packed(std::sync::Arc::new(p)))
}
