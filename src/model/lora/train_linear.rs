//! A training step's LoRA projection as one graph node: `y = W x + b + c · B (A · drop(x))`
//! for a frozen `W` (dense f32 or packed) and trainable `A`, `B`, with a backward that returns
//! the gradients of `x`, `A` and `B` at once.
//!
//! Composed of candle ops, each projection was ten nodes (the mask, its product, two matmuls,
//! the scaling, the sum), and candle's backward gave each of them a zeroed gradient buffer and
//! an accumulating add, one pool dispatch apiece: on the issue-31 recipe those adds and their
//! barrier waits were a fifth of a step. Here the forward keeps what the backward needs (the
//! dropped input and `A·drop(x)`) and the backward is five products and one pass over `x`'s
//! gradient. The composed path ([`super::StepLora::apply`]) stays for mixes, DoRA and other
//! devices, and is the reference the tests hold this to (values and all three gradients).

use super::super::frozen::{base_input_grad, base_product};
use super::super::linear::BaseWeight;
use super::super::ops::{HostF32, Kernels};
use super::step::dropout_mask;
use super::weights::LoraWeights;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// What the forward leaves for the backward.
#[derive(Default)]
struct Saved {
    /// `drop(x)` (`(n, in)`); empty without dropout (then `x` itself).
    dropped: Vec<f32>,
    /// The mask (`0` or `1 / (1 − p)`); empty without dropout.
    mask: Vec<f32>,
    /// `A · drop(x)` per row, `(n, r)`.
    u: Vec<f32>,
}

struct TrainLinear {
    base: BaseWeight,
    bias: Option<Vec<f32>>,
    kernels: Kernels,
    c: f32,
    dropout: f32,
    seed: u64,
    saved: Mutex<Saved>,
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("lora-train-linear: {what} is not contiguous host f32"),
    }
}

impl CustomOp3 for TrainLinear {
    fn name(&self) -> &'static str {
        "lora-train-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(sx, lx, "the input")?;
        let (a, b) = (contiguous(sa, la, "A")?, contiguous(sb, lb, "B")?);
        let (n, k) = lx.shape().dims2()?;
        let (r, ka) = la.shape().dims2()?;
        let (out, rb) = lb.shape().dims2()?;
        if ka != k || rb != r {
            candle_core::bail!("lora-train-linear: x {n}×{k}, A {r}×{ka}, B {out}×{rb}");
        }
        let mut y = base_product(&self.base, x, n, k, &self.kernels)?;
        if let Some(bias) = &self.bias {
            y.chunks_exact_mut(out)
                .for_each(|row| row.iter_mut().zip(bias).for_each(|(y, b)| *y += b));
        }
        let mut saved = Saved::default();
        if self.dropout > 0.0 {
            saved.mask = dropout_mask(x.len(), self.dropout, self.seed);
            saved.dropped = x.iter().zip(&saved.mask).map(|(x, m)| x * m).collect();
        }
        let xd = if saved.dropped.is_empty() { x } else { &saved.dropped };
        let pool = &self.kernels.pool;
        saved.u = vec![0f32; n * r];
        crate::kernels::dense::matmul_f32(pool, xd, n, k, a, r, &mut saved.u);
        let mut d = vec![0f32; n * out];
        crate::kernels::dense::matmul_f32(pool, &saved.u, n, r, b, out, &mut d);
        // `y + d · c`, the composed path's roundings: the scaled delta, then the sum.
        y.iter_mut().zip(&d).for_each(|(y, d)| *y += d * self.c);
        if let Ok(mut s) = self.saved.lock() {
            *s = saved;
        }
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    /// With `du = c · g B` (`(n, r)`): `dA = duᵀ drop(x)`, `dB = c · gᵀ u`, and
    /// `dx = g W + mask ⊙ (du A)`.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let r = a.dim(0)?;
        let saved = match self.saved.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => candle_core::bail!("lora-train-linear: the forward's state is poisoned"),
        };
        if saved.u.len() != n * r {
            candle_core::bail!("lora-train-linear: backward without its forward");
        }
        let dev = Device::Cpu;
        let g = g.contiguous()?;
        let (a, b) = (a.detach(), b.detach());
        let u = Tensor::from_vec(saved.u, (n, r), &dev)?;
        let xd = match saved.dropped.is_empty() {
            true => x.detach(),
            false => Tensor::from_vec(saved.dropped, (n, k), &dev)?,
        };
        let du = (g.matmul(&b)? * self.c as f64)?;
        let da = du.t()?.matmul(&xd)?;
        let db = (g.t()?.matmul(&u)? * self.c as f64)?;
        let dxd = du.matmul(&a)?;
        let base = base_input_grad(&self.base, &g, &self.kernels)?;
        let mut dx = base.flatten_all()?.to_vec1::<f32>()?;
        let Some(dxd) = HostF32::of(&dxd) else {
            candle_core::bail!("lora-train-linear: the LoRA input gradient is not host f32")
        };
        match saved.mask.is_empty() {
            true => dx.iter_mut().zip(dxd.slice()).for_each(|(d, l)| *d += l),
            false => {
                dx.iter_mut().zip(dxd.slice()).zip(&saved.mask).for_each(|((d, l), m)| *d += l * m)
            }
        }
        let dx = Tensor::from_vec(dx, (n, k), &dev)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// The fused projection for `x` (`(n, in)`), or `None` where it does not apply (not host
/// f32, a base weight without a host product, a bias off the host); the caller then takes
/// the composed path.
pub fn forward(
    x: &Tensor,
    base: &BaseWeight,
    bias: Option<&Tensor>,
    (w, c, dropout, seed): (&LoraWeights, f64, f32, u64),
    kernels: &Kernels,
) -> Result<Option<Tensor>> {
    let host = |t: &Tensor| super::super::diffops::supported(t);
    let base_ok = match base {
        BaseWeight::Packed(_) => true,
        BaseWeight::Dense(wt) => host(wt),
        BaseWeight::Quantized(..) => false,
    };
    if !base_ok || !host(x) || !host(&w.a) || !host(&w.b) {
        return Ok(None);
    }
    let bias = match bias {
        None => None,
        Some(b) => match HostF32::of(b) {
            Some(v) => Some(v.slice().to_vec()),
            None => return Ok(None),
        },
    };
    let op = TrainLinear {
        base: base.clone(),
        bias,
        kernels: kernels.clone(),
        c: c as f32,
        dropout,
        seed,
        saved: Mutex::default(),
    };
    let y = x.contiguous()?.apply_op3(&w.a.contiguous()?, &w.b.contiguous()?, op)?;
    Ok(Some(y))
}

#[cfg(test)]
mod tests {
    use super::super::super::linear::{LoraLinear, Pass};
    use super::super::super::ops::Exec;
    use super::super::super::{ModuleId, Target};
    use super::super::{AdapterMix, LoraAdapter, LoraWeights, StepLora};
    use super::*;
    use crate::kernels::PackedMatrix;
    use candle_core::Var;
    use std::sync::Arc;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn packed(w: &Tensor) -> BaseWeight {
        let (rows, cols) = w.dims2().unwrap();
        let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let p: std::result::Result<_, std::convert::Infallible> =
            PackedMatrix::pack(rows, cols, crate::kernels::Kind::W8, |r, out| {
                crate::kernels::ggml::quantize_row_8bit(&v[r * cols..(r + 1) * cols], out);
                Ok(())
            });
        BaseWeight::Packed(Arc::new(p.unwrap()))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The fused node against the composed reference (`frozen_base`, the bias, then
    /// `StepLora::apply`): outputs and the gradients of `x`, `A` and `B`, with and without
    /// dropout, on dense and packed bases, with and without a bias.
    #[test]
    fn fused_projection_equals_the_composed_path_and_its_gradients() {
        let (n, k, out, r) = (40, 64, 96, 8);
        let id = ModuleId { layer: 0, target: Target::Q };
        let kernels = Kernels::new(2, Exec::Differentiable);
        let w = random((out, k), 1);
        for base in [BaseWeight::Dense(w.clone()), packed(&w)] {
            let tol = 2e-5f32;
            for (dropout, bias) in [(0.0f32, None), (0.3, Some(random((1, out), 5)))] {
                let bias = bias.map(|b| b.reshape(out).unwrap());
                let x = Var::from_tensor(&random((n, k), 2)).unwrap();
                let a = Var::from_tensor(&(random((r, k), 3) * 0.2).unwrap()).unwrap();
                let b = Var::from_tensor(&(random((out, r), 4) * 0.2).unwrap()).unwrap();
                let weights =
                    LoraWeights::new(a.as_tensor().clone(), b.as_tensor().clone(), 16.0, false)
                        .unwrap();
                let mut modules = vec![None; ModuleId::count(1)];
                modules[id.index()] = Some(weights);
                let adapter = Arc::new(LoraAdapter {
                    name: "t".into(),
                    path: Default::default(),
                    rank: r,
                    alpha: 16.0,
                    modules,
                    vocab: Default::default(),
                    size_bytes: 0,
                    version: 0,
                });
                let lora = StepLora::Training {
                    mixes: vec![AdapterMix::single(adapter, 0.7); 2],
                    dropout,
                    seed: 9,
                };
                let lens = [n / 2, n / 2];
                let pass = Pass { seq_lens: &lens, lora: &lora, kernels: &kernels };
                let linear = LoraLinear { id, base: base.clone(), bias: bias.clone() };
                let probe = random((n, out), 6);
                let term = lora.single_training_term(id).unwrap();
                let fused = super::forward(x.as_tensor(), &base, bias.as_ref(), term, &kernels)
                    .unwrap()
                    .unwrap();
                // The projection routes a plain single-adapter training step to the fused node.
                let routed = linear.forward(x.as_tensor(), &pass).unwrap();
                assert_eq!(max_diff(&fused, &routed), 0.0);
                let mut reference =
                    super::super::super::frozen::frozen_base(x.as_tensor(), &base, &kernels)
                        .unwrap();
                if let Some(bias) = &bias {
                    reference = reference.broadcast_add(bias).unwrap();
                }
                let reference = lora.apply(id, x.as_tensor(), reference, &lens).unwrap();
                assert!(max_diff(&fused, &reference) < 1e-4, "{dropout} {:?}", base.dims());
                let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gr = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
                    let (f, r) = (gf.get(v).unwrap(), gr.get(v).unwrap());
                    let scale = r
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        max_diff(f, r) <= tol * scale.max(1.0),
                        "{name}: {} vs {scale}",
                        max_diff(f, r)
                    );
                }
            }
        }
    }

    /// The packed backward's `g · W` through `Wᵀ` in 8 bits against `W` unpacked in f32: within
    /// the two 8-bit roundings (the weight's and the gradient's), about 1 % of the largest value.
    #[test]
    fn packed_input_gradient_follows_the_unpacked_weight() {
        let w = random((96, 64), 1);
        let BaseWeight::Packed(p) = packed(&w) else { unreachable!() };
        let g = random((40, 96), 2);
        let kernels = Kernels::new(2, Exec::Differentiable);
        let fast =
            super::super::super::frozen::packed_input_grad(&p, &g, &kernels.pool, kernels.isa)
                .unwrap();
        let reference = super::super::super::frozen::unpacked_input_grad(&p, &g).unwrap();
        let scale: f32 =
            reference.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        let err = max_diff(&fast, &reference);
        assert!(err > 0.0 && err < 0.02 * scale, "{err} vs {scale}");
        // Rows whose width is not whole 32-blocks have no transpose and take the reference.
        let odd = random((40, 64), 3);
        let BaseWeight::Packed(q) = packed(&odd) else { unreachable!() };
        assert!(q.transposed_8bit().is_none());
    }
}
