//! Fused CPU f32 kernels with a backward for the training forward: RMS-norm (frozen weight),
//! rotary embedding, causal softmax with its scale, and the gated MLP's `silu(gate) · up`. candle's fused versions of these have
//! no backward, and its differentiable compositions (`rms_norm_slow`, `rope_slow`, `softmax`)
//! allocate five to eight intermediate tensors each that the graph keeps until backward ends.
//! One op each keeps one output per call. The compositions stay as the reference path
//! (other devices and dtypes) and the tests check that both agree, values and gradients.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Whether the fused ops apply to `t` (CPU, f32).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

fn input_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("{op}: needs a contiguous f32 input"),
    }
}

/// Runs `f` over the contiguous f32 data of `t`.
fn with_data<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(input_slice(c, l, op)?),
        _ => bail!("{op}: needs a CPU tensor"),
    }
}

/// Rows per parallel task: enough work per task to amortise rayon's scheduling.
fn rows_per_task(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension, `w` frozen.
pub struct RmsNorm {
    w: Vec<f32>,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input_slice(storage, layout, self.name())?;
        let d = self.w.len();
        let mut out = vec![0f32; x.len()];
        let per = rows_per_task(d) * d;
        out.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                let r = inv_rms(x, self.eps);
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(&self.w) {
                    *o = x * r * w;
                }
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `dx = r·(g∘w) − x·r³·mean(g∘w∘x)` with `r = 1/rms(x)`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = self.w.len();
        let dx = with_data(arg, self.name(), |x| {
            with_data(grad, self.name(), |g| {
                let mut dx = vec![0f32; x.len()];
                let per = rows_per_task(d) * d;
                dx.par_chunks_mut(per).zip(x.par_chunks(per)).zip(g.par_chunks(per)).for_each(
                    |((dx, x), g)| {
                        for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                            let r = inv_rms(x, self.eps);
                            let dot: f32 = g
                                .iter()
                                .zip(&self.w)
                                .zip(x)
                                .map(|((g, w), x)| g * w * x)
                                .sum::<f32>()
                                / d as f32;
                            let k = r * r * r * dot;
                            for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(&self.w) {
                                *dx = r * g * w - x * k;
                            }
                        }
                    },
                );
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// Differentiable RMS-norm of `x` (`(.., d)`) with the frozen weight `w` (`(d,)`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if !supported(x) {
        return candle_nn::ops::rms_norm_slow(x, w, eps);
    }
    let w = w.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    x.contiguous()?.apply_op1(RmsNorm { w, eps })
}

/// Rotary embedding (Hugging Face's rotate-half layout) of `x` `(n, heads, hd)` with per-token
/// `cos`/`sin` rows `(n, hd/2)`.
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    heads: usize,
    hd: usize,
}

impl Rope {
    /// Rotates every `(hd)` row of `x` by its token's angle; `sign = -1` is the inverse
    /// rotation, which is also the backward (a rotation's transpose is its inverse).
    fn rotate(&self, x: &[f32], sign: f32) -> Vec<f32> {
        let (hd, half) = (self.hd, self.hd / 2);
        let per_token = self.heads * hd;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per_token).zip(x.par_chunks(per_token)).enumerate().for_each(
            |(t, (o, x))| {
                let cos = &self.cos[t * half..(t + 1) * half];
                let sin = &self.sin[t * half..(t + 1) * half];
                for (o, x) in o.chunks_mut(hd).zip(x.chunks(hd)) {
                    for i in 0..half {
                        let (a, b) = (x[i], x[i + half]);
                        let s = sign * sin[i];
                        o[i] = a * cos[i] - b * s;
                        o[i + half] = b * cos[i] + a * s;
                    }
                }
            },
        );
        out
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input_slice(storage, layout, self.name())?;
        Ok((CpuStorage::F32(self.rotate(x, 1.0)), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_data(grad, self.name(), |g| Ok(self.rotate(g, -1.0)))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Differentiable LayerNorm of `x` (`(.., d)`) with the frozen weight and bias `(d,)`, from
/// candle's basic ops (their backward is candle's own), in f32.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    let f = x.to_dtype(candle_core::DType::F32)?;
    let centred = f.broadcast_sub(&f.mean_keepdim(candle_core::D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps as f64)?.sqrt()?)?;
    let (w, b) = (w.to_dtype(candle_core::DType::F32)?, b.to_dtype(candle_core::DType::F32)?);
    normed.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(x.dtype())
}

/// Differentiable rotary embedding of `x` `(n, heads, hd)` with `(n, hd/2)` tables.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, heads, hd) = x.dims3()?;
    if !supported(x) {
        let y = candle_nn::rotary_emb::rope_slow(&x.unsqueeze(0)?.transpose(1, 2)?, cos, sin)?;
        return y.transpose(1, 2)?.squeeze(0);
    }
    if cos.dims2()? != (n, hd / 2) || sin.dims2()? != (n, hd / 2) {
        bail!("fused-rope: tables must be ({n}, {})", hd / 2);
    }
    let cos = cos.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let sin = sin.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    x.contiguous()?.apply_op1(Rope { cos, sin, heads, hd })
}

/// `softmax(scale · s + causal mask)` over the last dimension of scores `(b, rows, total)`
/// whose row `r` is the query `r mod t`, at absolute position `total − t + (r mod t)`; keys after
/// it get probability 0.
pub struct CausalSoftmax {
    scale: f32,
    t: usize,
}

impl CausalSoftmax {
    fn visible(&self, row: usize, total: usize) -> usize {
        total - self.t + row % self.t + 1
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = input_slice(storage, layout, self.name())?;
        let total = layout.shape().dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; s.len()];
        let per = rows_per_task(total);
        out.par_chunks_mut(per * total).zip(s.par_chunks(per * total)).enumerate().for_each(
            |(task, (o, s))| {
                for (i, (o, s)) in o.chunks_mut(total).zip(s.chunks(total)).enumerate() {
                    let vis = self.visible(task * per + i, total);
                    let (o, s) = (&mut o[..vis], &s[..vis]);
                    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
                    let mut sum = 0f32;
                    for (o, &v) in o.iter_mut().zip(s) {
                        *o = (v * self.scale - max).exp();
                        sum += *o;
                    }
                    let inv = 1.0 / sum;
                    o.iter_mut().for_each(|o| *o *= inv);
                }
            },
        );
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `ds = scale · y ∘ (g − Σ g∘y)`; masked entries have `y = 0`, so no gradient.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let total = arg.dims().last().copied().unwrap_or(1);
        let ds = with_data(res, self.name(), |y| {
            with_data(grad, self.name(), |g| {
                let mut ds = vec![0f32; y.len()];
                let per = rows_per_task(total) * total;
                ds.par_chunks_mut(per).zip(y.par_chunks(per)).zip(g.par_chunks(per)).for_each(
                    |((ds, y), g)| {
                        for ((ds, y), g) in
                            ds.chunks_mut(total).zip(y.chunks(total)).zip(g.chunks(total))
                        {
                            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                            for ((ds, &y), &g) in ds.iter_mut().zip(y).zip(g) {
                                *ds = self.scale * y * (g - dot);
                            }
                        }
                    },
                );
                Ok(ds)
            })
        })?;
        Ok(Some(Tensor::from_vec(ds, arg.shape(), arg.device())?))
    }
}

/// Differentiable causal softmax of raw scores `(b, rows, total)` (rows = groups of `t`
/// queries), f32 out.
pub fn causal_softmax(scores: &Tensor, scale: f64, t: usize) -> Result<Tensor> {
    let (_, rows, total) = scores.dims3()?;
    if rows % t != 0 || total < t {
        bail!("causal-softmax: {rows} rows are not groups of {t} queries over {total} keys");
    }
    if !supported(scores) {
        let s = (scores.to_dtype(candle_core::DType::F32)? * scale)?;
        return candle_nn::ops::softmax(&add_causal_mask(&s, t)?, candle_core::D::Minus1);
    }
    scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32, t })
}

/// Scores `(b, rows, total)` whose rows are groups of `t` queries (the last `t` positions)
/// with `-inf` where a query would see a later key; unchanged for `t = 1` (a decode step sees
/// every key). The composition the fused softmax replaces, and the inference path's mask.
/// [`add_causal_mask`] for a sliding window: the query at position `i` sees keys `j` with
/// `i − window < j ≤ i` (so `window` keys, itself included).
pub fn add_window_mask(scores: &Tensor, t: usize, window: usize) -> Result<Tensor> {
    let (b, rows, total) = scores.dims3()?;
    let past = total - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= past + i && j + window > past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, total), scores.device())?.to_dtype(scores.dtype())?;
    scores.reshape((b, rows / t, t, total))?.broadcast_add(&mask)?.reshape((b, rows, total))
}

pub fn add_causal_mask(scores: &Tensor, t: usize) -> Result<Tensor> {
    if t == 1 {
        return Ok(scores.clone());
    }
    let (b, rows, total) = scores.dims3()?;
    let past = total - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, total), scores.device())?.to_dtype(scores.dtype())?;
    scores.reshape((b, rows / t, t, total))?.broadcast_add(&mask)?.reshape((b, rows, total))
}

/// `silu(gate) · up`, elementwise. Composed, it is a SiLU (whose backward candle builds from
/// eight more ops over the gate) and a product, each a full pass over `(n, intermediate)` with
/// its own buffer: on the issue-31 recipe a tenth of a training step.
struct SiluMul;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (input_slice(sg, lg, self.name())?, input_slice(su, lu, self.name())?);
        if g.len() != u.len() {
            bail!("fused-silu-mul: gate {:?}, up {:?}", lg.shape(), lu.shape());
        }
        let mut out = vec![0f32; g.len()];
        let per = 16 * 1024;
        out.par_chunks_mut(per).zip(g.par_chunks(per)).zip(u.par_chunks(per)).for_each(
            |((o, g), u)| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            },
        );
        Ok((CpuStorage::F32(out), lg.shape().clone()))
    }

    /// `d gate = d · up · σ(g) · (1 + g · (1 − σ(g)))`, `d up = d · silu(g)`.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_data(gate, self.name(), |g| {
            with_data(up, self.name(), |u| {
                with_data(grad, self.name(), |d| {
                    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
                    let per = 16 * 1024;
                    dg.par_chunks_mut(per)
                        .zip(du.par_chunks_mut(per))
                        .zip(g.par_chunks(per).zip(u.par_chunks(per)).zip(d.par_chunks(per)))
                        .for_each(|((dg, du), ((g, u), d))| {
                            for i in 0..g.len() {
                                let s = sigmoid(g[i]);
                                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                                du[i] = d[i] * g[i] * s;
                            }
                        });
                    Ok((dg, du))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// Differentiable `silu(gate) · up` (same shapes).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !supported(gate) || !supported(up) || gate.shape() != up.shape() {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}
