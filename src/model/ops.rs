//! The forward's ops between matmuls, each with two implementations: the fused CPU kernel
//! ([`crate::kernels::fused`]) when every operand is a contiguous f32 tensor on the CPU and the
//! model allows fused kernels, else candle's composed ops — the reference the fused kernels
//! are tested against, and the path every other device and dtype takes.

use super::Result;
use crate::kernels::{fused, Isa, Pool};
use candle_core::{CpuStorage, DType, Storage, StorageRef, Tensor};
use std::sync::Arc;

/// A read view of a contiguous f32 CPU tensor's values (holds the storage's read lock).
pub struct HostF32<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> HostF32<'a> {
    /// `None` unless `t` is contiguous f32 on the CPU.
    pub fn of(t: &'a Tensor) -> Option<Self> {
        if t.dtype() != DType::F32 || !t.device().is_cpu() {
            return None;
        }
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))).then_some(Self {
            guard,
            start,
            len: end - start,
        })
    }

    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => &[],
        }
    }
}

/// A host vector as a CPU tensor (moves the vector, no copy).
pub fn host_tensor(v: Vec<f32>, shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?)
}

/// How a forward runs the ops between (and around) its matmuls: a model's inference mode is
/// chosen at load; a training step passes [`Exec::Differentiable`] down its own forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// The fused f32 CPU kernels over host tensors and host KV caches.
    Fused,
    /// candle's composed ops: other devices and dtypes, and the reference the fused kernels
    /// are tested against.
    Composed,
    /// Only ops with a backward (training): candle's fused norm, softmax and rope have none.
    Differentiable,
}

impl Exec {
    /// What inference runs on `device` with `dtype` activations: the fused kernels for f32 on
    /// the CPU, the composed ops elsewhere.
    pub fn inference(device: &candle_core::Device, dtype: DType) -> Exec {
        if device.is_cpu() && dtype == DType::F32 {
            Exec::Fused
        } else {
            Exec::Composed
        }
    }
}

/// The CPU kernels a model runs with: their thread pool, the integer matmul's instruction
/// set, and how the ops between matmuls run ([`Exec`]). The mode is a value, fixed when the
/// kernels are made: a model's own kernels run inference, and a training step runs on a copy
/// with [`Exec::Differentiable`] ([`Kernels::with_exec`]), passed down the forward it runs. No
/// step can see another step's mode.
#[derive(Debug, Clone)]
pub struct Kernels {
    pub pool: Arc<Pool>,
    pub isa: Isa,
    pub exec: Exec,
}

impl Kernels {
    pub fn new(threads: usize, exec: Exec) -> Self {
        Self { pool: Arc::new(Pool::new(threads)), isa: Isa::detect(), exec }
    }

    /// The same pool and instruction set, running the ops as `exec` says.
    pub fn with_exec(&self, exec: Exec) -> Self {
        Self { pool: self.pool.clone(), isa: self.isa, exec }
    }

    pub fn exec(&self) -> Exec {
        self.exec
    }

    /// Whether the fused kernels run (an op still needs host f32 operands to take them).
    pub fn fused(&self) -> bool {
        self.exec() == Exec::Fused
    }

    /// Host views of all of `ts`, when the fused kernels apply to them.
    fn hosts<'t, const N: usize>(&self, ts: [&'t Tensor; N]) -> Option<[HostF32<'t>; N]> {
        if !self.fused() {
            return None;
        }
        let views: Vec<HostF32<'t>> = ts.iter().map(|t| HostF32::of(t)).collect::<Option<_>>()?;
        views.try_into().ok()
    }

    /// `x / rms(x) · w` over the last dimension of `x` (`(n, h)`).
    pub fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        if let Some([xs, ws]) = self.hosts([x, w]) {
            let mut out = vec![0f32; xs.slice().len()];
            fused::rms_norm(xs.slice(), ws.slice(), eps, &mut out);
            return host_tensor(out, x.shape());
        }
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
    }

    /// `(x + y, rms_norm(x + y))`: a residual add and the norm after it.
    pub fn add_rms_norm(
        &self,
        x: &Tensor,
        y: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        if let Some([xs, ys, ws]) = self.hosts([x, y, w]) {
            let mut sum = xs.slice().to_vec();
            let mut out = vec![0f32; sum.len()];
            fused::add_rms_norm(&mut sum, ys.slice(), ws.slice(), eps, &mut out);
            return Ok((host_tensor(sum, x.shape())?, host_tensor(out, x.shape())?));
        }
        let sum = (x + y)?;
        let normed = candle_nn::ops::rms_norm(&sum.contiguous()?, w, eps)?;
        Ok((sum, normed))
    }

    /// `silu(gate) · up`.
    pub fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if let Some([g, u]) = self.hosts([gate, up]) {
            let mut out = vec![0f32; g.slice().len()];
            let chunks = fused::row_chunks(&self.pool, out.len(), 16 * 1024);
            if chunks > 1 {
                let per = out.len().div_ceil(chunks);
                let parts: Vec<std::sync::Mutex<&mut [f32]>> =
                    out.chunks_mut(per).map(std::sync::Mutex::new).collect();
                self.pool.run(parts.len(), |c| {
                    if let Ok(mut o) = parts[c].lock() {
                        let r = c * per..c * per + o.len();
                        fused::silu_mul(&g.slice()[r.clone()], &u.slice()[r], &mut o);
                    }
                });
            } else {
                fused::silu_mul(g.slice(), u.slice(), &mut out);
            }
            return host_tensor(out, gate.shape());
        }
        Ok((candle_nn::ops::silu(gate)? * up)?)
    }

    /// Whether attention for this step can run fused: f32 CPU activations and host caches.
    pub fn fused_attention(&self, x: &Tensor, caches: Option<&[&mut super::SeqCache]>) -> bool {
        self.fused()
            && x.dtype() == DType::F32
            && x.device().is_cpu()
            && caches.is_none_or(|c| c.iter().all(|c| c.is_host_or_empty()))
    }
}
