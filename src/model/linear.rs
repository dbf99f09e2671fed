//! The one linear layer every targeted projection uses: a frozen base weight — dense, candle
//! quantized, or packed for the integer CPU kernel — plus the per-row LoRA deltas of the step.

use super::lora::StepLora;
use super::ops::{host_tensor, HostF32, Kernels};
use super::{ModuleId, Result};
use crate::kernels::matmul::{matmul_many, quantize};
use crate::kernels::{PackedMatrix, QuantActs};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

/// A frozen base weight of shape `(out, in)` in Hugging Face row order.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>, QMatMul),
    /// The packed 4/8-bit layout of [`crate::kernels::packed`]; CPU only.
    Packed(Arc<PackedMatrix>),
}

/// What a projection's forward needs besides its input: the rows' sequence lengths, the step's
/// LoRA operands, and the kernels (with the model's [`super::ops::Exec`]).
#[derive(Clone, Copy)]
pub struct Pass<'a> {
    pub seq_lens: &'a [usize],
    pub lora: &'a StepLora,
    pub kernels: &'a Kernels,
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
            BaseWeight::Packed(p) => (p.rows, p.cols),
        };
        Ok(dims)
    }

    /// `x · Wᵀ` for `x` of shape `(n, in)`.
    pub fn forward(&self, x: &Tensor, kernels: &Kernels) -> Result<Tensor> {
        if let Some(y) = self.host_vec(x, kernels)? {
            let (n, _) = x.dims2()?;
            return host_tensor(y, (n, self.dims()?.0));
        }
        let y = match self {
            BaseWeight::Dense(w) => x.matmul(&w.t()?)?,
            BaseWeight::Quantized(_, mm) => mm.forward(&x.contiguous()?)?,
            BaseWeight::Packed(_) => {
                return Err(super::ModelError::Unsupported(
                    "packed weights need f32 activations on the CPU".into(),
                ))
            }
        };
        Ok(y)
    }

    /// The product as a host vector `(n, out)` when a CPU kernel computes it: always for packed
    /// weights, for dense f32 ones when the fused kernels are on; `None` otherwise.
    fn host_vec(&self, x: &Tensor, kernels: &Kernels) -> Result<Option<Vec<f32>>> {
        let dense_host = matches!(self, BaseWeight::Dense(w) if kernels.fused() && w.dtype() == DType::F32 && w.device().is_cpu());
        if !matches!(self, BaseWeight::Packed(_)) && !dense_host {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let Some(xs) = HostF32::of(&x) else { return Ok(None) };
        let (n, k) = x.dims2()?;
        match self {
            BaseWeight::Packed(p) => Ok(packed_products(&[p], xs.slice(), n, k, kernels).pop()),
            BaseWeight::Dense(w) => {
                let Some(ws) = HostF32::of(w) else { return Ok(None) };
                let out = w.dim(0)?;
                let mut y = vec![0f32; n * out];
                crate::kernels::dense::matmul_f32(
                    &kernels.pool,
                    xs.slice(),
                    n,
                    k,
                    ws.slice(),
                    out,
                    &mut y,
                );
                Ok(Some(y))
            }
            BaseWeight::Quantized(..) => Ok(None),
        }
    }

    /// The weight as a dense f32 tensor (dequantized if needed); for merging and training.
    pub fn to_dense_f32(&self) -> Result<Tensor> {
        let w = match self {
            BaseWeight::Dense(w) => w.to_dtype(DType::F32)?,
            BaseWeight::Quantized(q, _) => q.dequantize(&q.device())?,
            BaseWeight::Packed(p) => host_tensor(p.unpack(), (p.rows, p.cols))?,
        };
        Ok(w)
    }

    /// Bytes the weight occupies on its device.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            BaseWeight::Quantized(q, _) => q.storage_size_in_bytes(),
            BaseWeight::Packed(p) => p.size_in_bytes(),
        }
    }
}

/// A targetable projection: `y = W x + b + Σ_i c_i · B_i (A_i x)` per row, where the terms
/// come from the step's [`StepLora`] and the bias `b` exists where the architecture has one.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub id: ModuleId,
    pub base: BaseWeight,
    /// `(out)`, in the activation dtype.
    pub bias: Option<Tensor>,
}

impl LoraLinear {
    /// `x`: `(n_tokens, in)`, rows grouped by sequence with `pass.seq_lens` tokens each.
    pub fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        if pass.kernels.exec() == super::ops::Exec::Differentiable {
            if let Some(term) = pass.lora.single_training_term(self.id) {
                let fused = super::lora::train_linear::forward(
                    x,
                    &self.base,
                    self.bias.as_ref(),
                    term,
                    pass.kernels,
                )?;
                if let Some(y) = fused {
                    return Ok(y);
                }
            }
            let y = super::frozen::frozen_base(x, &self.base, pass.kernels)?;
            if pass.lora.rescales(self.id) {
                // DoRA under dropout: PEFT rescales the base product of the dropped input.
                if let Some(xd) = pass.lora.dropped_input(self.id, x)? {
                    let base_d = super::frozen::frozen_base(&xd, &self.base, pass.kernels)?;
                    let y = pass.lora.apply_dropped(self.id, &xd, y, &base_d, pass.seq_lens)?;
                    return self.add_bias(y);
                }
            }
            return self.finish(y, x, pass);
        }
        // Host path: the base product as a vector, bias and LoRA delta added into it in place.
        if let Some(y) = self.base.host_vec(x, pass.kernels)? {
            return self.finish_host(y, x, pass);
        }
        let y = self.base.forward(x, pass.kernels)?;
        self.finish(y, x, pass)
    }

    /// Bias and LoRA on the base product `y`: the bias first (as before DoRA, so plain
    /// mixes round as they always have), or last where a DoRA term rescales the product.
    fn finish(&self, y: Tensor, x: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        if pass.lora.rescales(self.id) {
            return self.add_bias(pass.lora.apply(self.id, x, y, pass.seq_lens)?);
        }
        pass.lora.apply(self.id, x, self.add_bias(y)?, pass.seq_lens)
    }

    /// The forwards of several projections of the same input (a layer's q, k and v; its gate
    /// and up). Packed weights share one quantization of `x` and one pool job
    /// ([`crate::kernels::matmul::matmul_many`]), so the threads stream all of them without a
    /// join between; each output equals its own [`LoraLinear::forward`] bit for bit.
    pub fn forward_many<const N: usize>(
        linears: [&LoraLinear; N],
        x: &Tensor,
        pass: &Pass<'_>,
    ) -> Result<[Tensor; N]> {
        let packed: Option<Vec<&Arc<PackedMatrix>>> = linears
            .iter()
            .map(|l| match &l.base {
                BaseWeight::Packed(p) => Some(p),
                _ => None,
            })
            .collect();
        let x = x.contiguous()?;
        let host = HostF32::of(&x);
        let (Some(packed), Some(xs), false) =
            (packed, host, pass.kernels.exec() == super::ops::Exec::Differentiable)
        else {
            let ys = linears.iter().map(|l| l.forward(&x, pass)).collect::<Result<Vec<_>>>()?;
            return ys.try_into().map_err(|_| unreachable_len());
        };
        let (n, k) = x.dims2()?;
        let ys = packed_products(&packed, xs.slice(), n, k, pass.kernels);
        let outs = linears
            .iter()
            .zip(ys)
            .map(|(l, y)| l.finish_host(y, &x, pass))
            .collect::<Result<Vec<_>>>()?;
        outs.try_into().map_err(|_| unreachable_len())
    }

    /// Bias and LoRA delta added into a host base product `y` of `x` (in [`Self::finish`]'s
    /// order).
    fn finish_host(&self, mut y: Vec<f32>, x: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let shape = (x.dim(0)?, self.base.dims()?.0);
        let bias_last = pass.lora.rescales(self.id);
        if !bias_last && !self.add_host_bias(&mut y) {
            return self.finish(host_tensor(y, shape)?, x, pass);
        }
        if self.add_host_delta(x, &mut y, pass)? {
            if bias_last && !self.add_host_bias(&mut y) {
                return self.add_bias(host_tensor(y, shape)?);
            }
            return host_tensor(y, shape);
        }
        let y = host_tensor(y, shape)?;
        match bias_last {
            true => self.finish(y, x, pass),
            false => pass.lora.apply(self.id, x, y, pass.seq_lens),
        }
    }

    /// Adds the bias into host rows `y`; `false` (with `y` untouched) when the bias is not a
    /// host f32 one.
    fn add_host_bias(&self, y: &mut [f32]) -> bool {
        let Some(b) = &self.bias else { return true };
        let Some(b) = HostF32::of(b) else { return false };
        y.chunks_exact_mut(b.slice().len())
            .for_each(|row| row.iter_mut().zip(b.slice()).for_each(|(y, b)| *y += b));
        true
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// The fused host LoRA kernel, when the step's operands and `x` are host ones.
    fn add_host_delta(&self, x: &Tensor, y: &mut [f32], pass: &Pass<'_>) -> Result<bool> {
        if !pass.lora.touches(self.id) {
            return Ok(true);
        }
        if !pass.kernels.fused() {
            return Ok(false);
        }
        let x = x.contiguous()?;
        let handled = match HostF32::of(&x) {
            Some(xs) => {
                pass.lora.add_host(self.id, xs.slice(), pass.seq_lens, y, &pass.kernels.pool)?
            }
            None => false,
        };
        Ok(handled)
    }
}

/// `x · Wᵀ` (`x` host f32, `n × k`) for each packed `W`, with `x` quantized once and every
/// product in one pool job (also the training forward's, [`super::frozen`]).
pub(super) fn packed_products(
    ws: &[&Arc<PackedMatrix>],
    x: &[f32],
    n: usize,
    k: usize,
    kernels: &Kernels,
) -> Vec<Vec<f32>> {
    let mut acts = QuantActs::default();
    quantize(&kernels.pool, x, n, k, &mut acts);
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|p| vec![0f32; n * p.rows]).collect();
    let mut jobs: Vec<(&PackedMatrix, &mut [f32])> =
        ws.iter().zip(ys.iter_mut()).map(|(p, y)| (p.as_ref(), y.as_mut_slice())).collect();
    matmul_many(&kernels.pool, kernels.isa, &mut jobs, &acts);
    ys
}

fn unreachable_len() -> super::ModelError {
    super::ModelError::Generation("projection count changed; this is a bug".into())
}
