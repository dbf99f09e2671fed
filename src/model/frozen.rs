//! `x · Wᵀ` for a frozen `W` as a custom op whose backward returns only the input gradient
//! `grad · W`. candle's matmul backward always computes the weight gradient too (a GEMM as
//! large as the forward), even for an untracked weight; skipping it halves backward time.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor};

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
