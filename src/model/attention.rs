//! Attention, the part of the decoder that differs by execution mode: rope, the KV append and
//! causal (or windowed, or ALiBi) attention of every sequence against its own cache, either in
//! one fused CPU kernel call over host caches or composed from candle ops over device caches
//! (which is also what training differentiates through).

use super::decoder::{Block, Decoder, LayerStep, Norm};
use super::kv_cache::SeqCache;
use super::ops::{host_tensor, HostF32};
use super::{Result, Target};
use candle_core::{DType, Device, Tensor};

impl Decoder {
    /// The attention score scale: `query_pre_attn_scalar^-1/2` where the architecture sets one.
    pub(super) fn attn_scale(&self) -> f64 {
        1.0 / self.cfg.arch.query_pre_attn_scalar.unwrap_or(self.cfg.head_dim as f64).sqrt()
    }

    /// RMS norm over each head's `head_dim` values of `(n, heads · head_dim)`.
    pub(super) fn head_norm(&self, step: &LayerStep<'_>, x: &Tensor, w: &Norm) -> Result<Tensor> {
        let (n, width) = x.dims2()?;
        let hd = self.cfg.head_dim;
        let k = step.pass.kernels;
        Ok(self.apply_norm(k, &x.reshape((n * width / hd, hd))?, w)?.reshape((n, width))?)
    }

    pub(super) fn attention(
        &self,
        block: &Block,
        h: &Tensor,
        step: &LayerStep<'_>,
        caches: Option<&mut [&mut SeqCache]>,
    ) -> Result<Tensor> {
        let pass = step.pass;
        let qkv = [block.proj(Target::Q)?, block.proj(Target::K)?, block.proj(Target::V)?];
        let [mut q, mut k, v] = super::linear::LoraLinear::forward_many(qkv, h, pass)?;
        if let Some((qn, kn)) = &block.qk_norm {
            q = self.head_norm(step, &q, qn)?;
            k = self.head_norm(step, &k, kn)?;
        }
        let o = match &step.positions.rows {
            None => self.fused_attention(step, &q, &k, &v, caches)?,
            Some(rows) => {
                let (cos, sin) = &rows[self.rope_of[step.layer]];
                self.composed_attention(step, q, k, v, (cos, sin), caches)?
            }
        };
        block.proj(Target::O)?.forward(&o, pass)
    }

    /// Rope, KV append and causal attention of every sequence in one kernel call over the
    /// host caches (or, without caches, over this step's own keys).
    pub(super) fn fused_attention(
        &self,
        step: &LayerStep<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        caches: Option<&mut [&mut SeqCache]>,
    ) -> Result<Tensor> {
        let (layer, pos, input) = (step.layer, step.positions.pos.as_slice(), step.input);
        use crate::kernels::fused;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let bug = || {
            super::ModelError::Generation(
                "fused attention on non-host tensors; this is a bug".into(),
            )
        };
        let (cos, sin) = &self.ropes[self.rope_of[layer]];
        let (cos, sin) = (HostF32::of(cos).ok_or_else(bug)?, HostF32::of(sin).ok_or_else(bug)?);
        let mut qv = HostF32::of(q).ok_or_else(bug)?.slice().to_vec();
        let mut kv = HostF32::of(k).ok_or_else(bug)?.slice().to_vec();
        let vh = HostF32::of(v).ok_or_else(bug)?;
        let alibi = self.cfg.arch.position == super::config::PositionKind::Alibi;
        if !alibi {
            fused::rope(&mut qv, nh, pos, cos.slice(), sin.slice());
            fused::rope(&mut kv, nkv, pos, cos.slice(), sin.slice());
        }
        let width = nkv * hd;
        let dims = fused::AttnDims {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            scale: self.attn_scale() as f32,
            window: self.cfg.arch.window(layer).unwrap_or(usize::MAX),
            alibi,
        };
        let mut out = vec![0f32; qv.len()];
        let mut row0 = 0;
        match caches {
            Some(caches) => {
                for (c, &t) in caches.iter_mut().zip(&input.seq_lens) {
                    let rows = row0 * width..(row0 + t) * width;
                    c.host_append(layer, width, &kv[rows.clone()], &vh.slice()[rows])?;
                    row0 += t;
                }
                let views = caches
                    .iter()
                    .map(|c| c.host_view(layer).ok_or_else(bug))
                    .collect::<Result<Vec<_>>>()?;
                let seqs = kv_seqs(
                    views.iter().map(|(k, v, len)| (k.as_slice(), v.as_slice(), *len)),
                    &input.seq_lens,
                );
                fused::attention(&step.pass.kernels.pool, dims, &qv, &seqs, &mut out);
            }
            None => {
                // Each sequence attends to its own new keys only: block them as a cache would.
                let mut owned = Vec::with_capacity(input.seq_lens.len());
                for &t in &input.seq_lens {
                    let mut blocks = Vec::with_capacity(t.div_ceil(super::kv_cache::BLOCK_TOKENS));
                    for j0 in (0..t).step_by(super::kv_cache::BLOCK_TOKENS) {
                        let n = (t - j0).min(super::kv_cache::BLOCK_TOKENS);
                        let rows = (row0 + j0) * width..(row0 + j0 + n) * width;
                        let mut b = super::kv_cache::KvBlock::new(1, width, true, None);
                        b.write(0, 0, &kv[rows.clone()], &vh.slice()[rows]);
                        blocks.push(b);
                    }
                    owned.push(blocks);
                    row0 += t;
                }
                let views: Vec<super::kv_cache::HostView<'_>> = owned
                    .iter()
                    .zip(&input.seq_lens)
                    .map(|(bs, &t)| {
                        (
                            bs.iter().map(|b| b.key_tile(0)).collect(),
                            bs.iter().map(|b| b.value_rows(0)).collect(),
                            t,
                        )
                    })
                    .collect();
                let seqs = kv_seqs(
                    views.iter().map(|(k, v, len)| (k.as_slice(), v.as_slice(), *len)),
                    &input.seq_lens,
                );
                fused::attention(&step.pass.kernels.pool, dims, &qv, &seqs, &mut out);
            }
        }
        host_tensor(out, (input.tokens.len(), nh * hd))
    }

    /// The composed reference: candle's rope, the device caches and batched matmuls per
    /// sequence (and the differentiable ops when training).
    pub(super) fn composed_attention(
        &self,
        step: &LayerStep<'_>,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mut caches: Option<&mut [&mut SeqCache]>,
    ) -> Result<Tensor> {
        let (layer, input) = (step.layer, step.input);
        let differentiable = step.pass.kernels.exec == super::ops::Exec::Differentiable;
        let (n, _) = q.dims2()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let lens = &input.seq_lens;
        // Token-major `(1, n, heads, hd)`: a sequence's rows are one contiguous slice, so
        // decode needs no per-sequence copies; rope uses per-token cos/sin rows.
        let alibi = self.cfg.arch.position == super::config::PositionKind::Alibi;
        let (q, k) = if alibi {
            (q.reshape((n, nh, hd))?, k.reshape((n, nkv, hd))?)
        } else {
            (
                self.rope(differentiable, &q.reshape((n, nh, hd))?, cos, sin)?,
                self.rope(differentiable, &k.reshape((n, nkv, hd))?, cos, sin)?,
            )
        };
        let v = v.reshape((n, nkv, hd))?;
        let groups = nh / nkv;
        let scale = self.attn_scale();
        let window = self.cfg.arch.window(layer);
        let mut outs = Vec::with_capacity(lens.len());
        let mut offset = 0;
        for (i, &t) in lens.iter().enumerate() {
            let q_s = q.narrow(0, offset, t)?;
            // Head-major `(nkv, t, hd)` (for t = 1 a free view): the layout of the device
            // caches, whose per-head views cuBLAS multiplies without copies.
            let k_s = k.narrow(0, offset, t)?.transpose(0, 1)?.contiguous()?;
            let v_s = v.narrow(0, offset, t)?.transpose(0, 1)?.contiguous()?;
            let (k_heads, v_heads) = match caches.as_deref_mut() {
                Some(c) => c[i].append(layer, &k_s, &v_s)?,
                None => (k_s, v_s),
            };
            // GQA without copying K/V: the query heads of one KV group become extra rows,
            // `(nkv, groups·t, hd)`; for t = 1 this is a free reshape.
            let qg = if t == 1 {
                q_s.reshape((nkv, groups, hd))?
            } else {
                q_s.reshape((t, nkv, groups, hd))?
                    .permute((1, 2, 0, 3))?
                    .contiguous()?
                    .reshape((nkv, groups * t, hd))?
            };
            let att = match (differentiable, window.is_some() || alibi) {
                // Plain causal attention trains through the fused causal softmax with its
                // backward.
                (true, false) => {
                    super::diffops::causal_softmax(&qg.matmul(&k_heads.t()?)?, scale, t)?
                }
                (differentiable, _) => {
                    let mut att = (qg.matmul(&k_heads.t()?)? * scale)?.to_dtype(DType::F32)?;
                    if alibi {
                        att = att.broadcast_add(&alibi_bias(
                            nkv,
                            groups,
                            t,
                            k_heads.dim(1)?,
                            att.device(),
                        )?)?;
                    }
                    let masked = match window {
                        None => super::diffops::add_causal_mask(&att, t)?,
                        Some(w) => super::diffops::add_window_mask(&att, t, w)?,
                    };
                    // ALiBi and windows train through candle's composed softmax (it has a
                    // backward; the fused one does not).
                    match differentiable {
                        true => candle_nn::ops::softmax(&masked, candle_core::D::Minus1)?,
                        false => candle_nn::ops::softmax_last_dim(&masked)?,
                    }
                }
            };
            let o = att.to_dtype(self.dtype)?.matmul(&v_heads)?; // (nkv, groups·t, hd)
            outs.push(if t == 1 {
                o.reshape((1, nh * hd))?
            } else {
                o.reshape((nkv, groups, t, hd))?.permute((2, 0, 1, 3))?.reshape((t, nh * hd))?
            });
            offset += t;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Rotary embedding of `(n, heads, hd)` with per-token `(n, hd/2)` cos/sin.
    pub(super) fn rope(
        &self,
        differentiable: bool,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        Ok(if differentiable {
            super::diffops::rope(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)?
        })
    }
}

/// ALiBi's score bias `(kv_heads, groups · t, keys)`: `slope_h · j` for key position `j` (equal,
/// under softmax, to `−slope_h · (i − j)`); row `g · t + i` is query `i` of head `kvh · groups + g`.
fn alibi_bias(
    kv_heads: usize,
    groups: usize,
    t: usize,
    keys: usize,
    device: &Device,
) -> Result<Tensor> {
    let slopes = super::config::Arch::alibi_slopes(kv_heads * groups);
    let mut v = Vec::with_capacity(kv_heads * groups * t * keys);
    for kvh in 0..kv_heads {
        for r in 0..groups * t {
            let slope = slopes[kvh * groups + r / t];
            v.extend((0..keys).map(|j| slope * j as f32));
        }
    }
    Ok(Tensor::from_vec(v, (kv_heads, groups * t, keys), device)?)
}

/// The attention kernel's per-sequence operands: each sequence's blocks and length, its
/// `t` query rows placed after the previous sequences'.
fn kv_seqs<'a>(
    views: impl Iterator<Item = (&'a [&'a [f32]], &'a [&'a [f32]], usize)>,
    seq_lens: &[usize],
) -> Vec<crate::kernels::fused::SeqKv<'a>> {
    let mut row0 = 0;
    views
        .zip(seq_lens)
        .map(|((k, v, len), &t)| {
            let s = crate::kernels::fused::SeqKv { k, v, len, t, row0 };
            row0 += t;
            s
        })
        .collect()
}
