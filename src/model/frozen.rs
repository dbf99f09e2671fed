//! `x · Wᵀ` for a frozen `W` as a custom op whose backward returns only the input gradient
//! `grad · W`. candle's matmul backward always computes the weight gradient too (a GEMM as
//! large as the forward), even for an untracked weight; skipping it halves backward time.
//! Packed weights train too (QLoRA-style): the forward is the serving kernel itself, so the
//! trained loss is the served one, and the backward multiplies the output gradient by an 8-bit
//! transpose of each weight through the same integer kernels (made once, 1.25 bytes per
//! weight) instead of unpacking an f32 copy per step.

use super::linear::BaseWeight;
use super::ops::Kernels;
use crate::kernels::matmul::{matmul, quantize};
use crate::kernels::{Isa, PackedMatrix, Pool, QuantActs};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor};
use std::sync::Arc;

pub struct FrozenLinear {
    /// `(out, in)`, f32, on the CPU.
    pub w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = storage.as_slice::<f32>()?;
        let x = match layout.contiguous_offsets() {
            Some((start, end)) => {
                Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)?
            }
            None => candle_core::bail!("frozen-linear needs a contiguous input"),
        };
        let y = x.matmul(&self.w.t()?)?;
        let (s, l) = y.storage_and_layout();
        match (&*s, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                Ok((CpuStorage::F32(v[a..b].to_vec()), y.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: unexpected output storage"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x · Wᵀ` through [`FrozenLinear`] on CPU f32, else a plain matmul.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
    {
        x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() })
    } else {
        x.matmul(&w.t()?)
    }
}

/// `x · Wᵀ` for a packed `W` through the integer kernel (activations quantized as in serving;
/// the backward passes the gradient straight through that rounding).
struct FrozenPacked {
    p: Arc<PackedMatrix>,
    kernels: Kernels,
}

impl CustomOp1 for FrozenPacked {
    fn name(&self) -> &'static str {
        "frozen-packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = storage.as_slice::<f32>()?;
        let (n, k) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-packed-linear needs a contiguous input")
        };
        let y = packed_product(&self.p, &data[start..end], n, k, &self.kernels)?;
        Ok((CpuStorage::F32(y), Shape::from((n, self.p.rows))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        packed_input_grad(&self.p, grad, &self.kernels.pool, self.kernels.isa).map(Some)
    }
}

/// `grad · W` for a packed `W` through the integer kernels and `Wᵀ` in 8 bits, as the forward
/// runs (the gradient quantized per 32 values as activations are); [`unpacked_input_grad`],
/// the reference, where `W` has no 8-bit transpose.
pub fn packed_input_grad(p: &PackedMatrix, grad: &Tensor, pool: &Pool, isa: Isa) -> Result<Tensor> {
    let Some(t) = p.transposed_8bit() else {
        return unpacked_input_grad(p, grad);
    };
    let grad = grad.contiguous()?;
    let (n, rows) = grad.dims2()?;
    if rows != p.rows {
        candle_core::bail!("frozen-packed-linear: gradient width {rows}, weight {}", p.rows);
    }
    let Some(g) = super::ops::HostF32::of(&grad) else {
        candle_core::bail!("frozen-packed-linear: the gradient is not host f32")
    };
    let mut acts = QuantActs::default();
    quantize(pool, g.slice(), n, rows, &mut acts);
    let mut dx = vec![0f32; n * t.rows];
    matmul(pool, isa, t, &acts, &mut dx);
    Tensor::from_vec(dx, (n, t.rows), grad.device())
}

/// `x · Wᵀ` (`x` host f32, `n × k`) for a frozen dense or packed `W` as a host vector, as
/// [`frozen_base`]'s forward computes it.
pub fn base_product(
    base: &BaseWeight,
    x: &[f32],
    n: usize,
    k: usize,
    kernels: &Kernels,
) -> Result<Vec<f32>> {
    match base {
        BaseWeight::Packed(p) => packed_product(p, x, n, k, kernels),
        BaseWeight::Dense(w) => {
            let y = Tensor::from_slice(x, (n, k), &Device::Cpu)?.matmul(&w.t()?)?;
            y.flatten_all()?.to_vec1::<f32>()
        }
        BaseWeight::Quantized(..) => {
            candle_core::bail!("training needs dense or packed base weights")
        }
    }
}

/// `x · Wᵀ` for a packed `W` as serving computes it ([`super::linear::packed_products`]).
fn packed_product(
    p: &Arc<PackedMatrix>,
    x: &[f32],
    n: usize,
    k: usize,
    kernels: &Kernels,
) -> Result<Vec<f32>> {
    if k != p.cols {
        candle_core::bail!("frozen-packed-linear: input width {k}, weight {}", p.cols);
    }
    match super::linear::packed_products(&[p], x, n, k, kernels).pop() {
        Some(y) => Ok(y),
        None => candle_core::bail!("frozen-packed-linear: no product; this is a bug"),
    }
}

/// `grad · W` for [`base_product`]'s `W`.
pub fn base_input_grad(base: &BaseWeight, grad: &Tensor, kernels: &Kernels) -> Result<Tensor> {
    match base {
        BaseWeight::Packed(p) => packed_input_grad(p, grad, &kernels.pool, kernels.isa),
        BaseWeight::Dense(w) => grad.matmul(w),
        BaseWeight::Quantized(..) => {
            candle_core::bail!("training needs dense or packed base weights")
        }
    }
}

/// `grad · W` in f32 with `W` unpacked for this call (one f32 copy of the weight at a time):
/// the reference for [`FrozenPacked`]'s backward.
pub fn unpacked_input_grad(p: &PackedMatrix, grad: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (rows, cols) = (p.rows, p.cols);
    let mut w = vec![0f32; rows * cols];
    let per = 64usize;
    w.par_chunks_mut(per * cols).enumerate().for_each(|(i, chunk)| p.unpack_rows(i * per, chunk));
    let w = Tensor::from_vec(w, (rows, cols), grad.device())?;
    grad.matmul(&w)
}

/// `x · Wᵀ` with a backward to `x` only, for any base weight that has one: dense (f32 on the
/// CPU through [`FrozenLinear`]) and packed; candle's quantized matmul has no backward.
pub fn frozen_base(x: &Tensor, base: &BaseWeight, kernels: &Kernels) -> super::Result<Tensor> {
    match base {
        BaseWeight::Dense(w) => Ok(frozen_matmul(x, w)?),
        BaseWeight::Packed(p) if x.dtype() == candle_core::DType::F32 && x.device().is_cpu() => {
            let op = FrozenPacked { p: p.clone(), kernels: kernels.clone() };
            Ok(x.contiguous()?.apply_op1(op)?)
        }
        _ => Err(super::ModelError::Unsupported(
            "training needs dense or packed base weights (candle's quantized matmul has no backward)"
                .into(),
        )),
    }
}
