//! The one linear layer every targeted projection uses: a frozen base weight, dense or
//! quantized, plus the per-row LoRA deltas of the current step.

use super::lora::StepLora;
use super::{ModuleId, Result};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

/// A frozen base weight of shape `(out, in)` in Hugging Face row order.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>, QMatMul),
}

impl BaseWeight {
    pub fn quantized(q: QTensor) -> Result<Self> {
        let q = Arc::new(q);
        let mm = QMatMul::from_arc(q.clone())?;
        Ok(BaseWeight::Quantized(q, mm))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let dims = match self {
            BaseWeight::Dense(w) => w.dims2()?,
            BaseWeight::Quantized(q, _) => q.shape().dims2()?,
        };
        Ok(dims)
    }

    /// `x · Wᵀ` for `x` of shape `(n, in)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self {
            BaseWeight::Dense(w) => x.matmul(&w.t()?)?,
            BaseWeight::Quantized(_, mm) => mm.forward(&x.contiguous()?)?,
        };
        Ok(y)
    }

    /// The weight as a dense f32 tensor (dequantized if needed); for merging and training.
    pub fn to_dense_f32(&self) -> Result<Tensor> {
        let w = match self {
            BaseWeight::Dense(w) => w.to_dtype(DType::F32)?,
            BaseWeight::Quantized(q, _) => q.dequantize(&q.device())?,
        };
        Ok(w)
    }

    /// Bytes the weight occupies on its device.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            BaseWeight::Quantized(q, _) => q.storage_size_in_bytes(),
        }
    }
}

/// A targetable projection: `y = W x + Σ_i c_i · B_i (A_i x)` per row, where the terms come
/// from the step's [`StepLora`].
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub id: ModuleId,
    pub base: BaseWeight,
}

impl LoraLinear {
    /// `x`: `(n_tokens, in)`, rows grouped by sequence with `seq_lens` tokens each. With
    /// `frozen_grad` (training), the base matmul skips the unused weight gradient.
    pub fn forward(&self, x: &Tensor, seq_lens: &[usize], lora: &StepLora, frozen_grad: bool) -> Result<Tensor> {
        let y = match (&self.base, frozen_grad) {
            (BaseWeight::Dense(w), true) => super::frozen::frozen_matmul(x, w)?,
            _ => self.base.forward(x)?,
        };
        match lora.delta(self.id, x, seq_lens)? {
            Some(d) => Ok((y + d)?),
            None => Ok(y),
        }
    }
}
