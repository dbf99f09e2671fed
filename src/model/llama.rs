//! The Llama-family decoder over ragged batches: every linear is a [`LoraLinear`], tokens of
//! all sequences are flattened into one matrix for the projections, attention runs per
//! sequence against its own KV cache. A `differentiable` model uses only ops with a backward
//! (candle's fused rms-norm, softmax and rope have none) so the trainer can reuse it.

use super::kv_cache::SeqCache;
use super::linear::{BaseWeight, LoraLinear, Pass};
use super::lora::StepLora;
use super::ops::{host_tensor, HostF32, Kernels};
use super::{LlamaConfig, ModuleId, Result, Target, WeightFormat};
use crate::adapters::AdapterMix;
use candle_core::{DType, Device, Tensor};

/// Where a loader's tensors come from; implemented by the GGUF and Hugging Face loaders.
/// Every tensor is returned in Hugging Face layout (GGUF Q/K rows un-permuted).
pub trait WeightSource {
    /// `(vocab, hidden)`, f32.
    fn embed(&mut self) -> Result<Tensor>;
    /// Norm weight by Hugging Face name, f32, checked to hold `len` values.
    fn norm(&mut self, name: &str, len: usize) -> Result<Tensor>;
    /// The bias of a LayerNorm, by its weight's Hugging Face name.
    fn norm_bias(&mut self, name: &str, len: usize) -> Result<Tensor>;
    /// The additive bias `(out)` of a projection the architecture gives one, f32.
    fn bias(&mut self, id: ModuleId) -> Result<Tensor>;
    fn linear(&mut self, id: ModuleId, format: WeightFormat) -> Result<BaseWeight>;
    /// The output head; tied models return the embedding in `format`.
    fn lm_head(&mut self, format: WeightFormat) -> Result<BaseWeight>;
}

/// A norm's weight, and its bias for a LayerNorm (an RMS norm has none).
#[derive(Debug, Clone)]
struct Norm {
    w: Tensor,
    b: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Norm,
    mlp_norm: Norm,
    /// Norms of the attention and MLP outputs before their residual adds (Gemma 3).
    out_norms: Option<(Norm, Norm)>,
    /// q, k, v, o, gate, up, down in [`Target::ALL`] order; `None` where the architecture
    /// has no such projection (a gateless MLP).
    proj: Vec<Option<LoraLinear>>,
    /// Per-head RMS norms `(head_dim)` on q and k before rope (Qwen3, Gemma 3).
    qk_norm: Option<(Norm, Norm)>,
}

impl Block {
    fn proj(&self, t: Target) -> Result<&LoraLinear> {
        self.proj[t as usize].as_ref().ok_or_else(|| {
            super::ModelError::Generation(format!("the model has no `{}`; this is a bug", t.name()))
        })
    }
}

/// A norm by its Hugging Face weight name, with its bias where the architecture's norms have one.
fn load_norm(
    src: &mut dyn WeightSource,
    cfg: &LlamaConfig,
    name: &str,
    dtype: DType,
) -> Result<Norm> {
    let len = cfg.hidden_size;
    let w = src.norm(name, len)?.to_dtype(dtype)?;
    let b = match cfg.arch.norm {
        super::config::NormKind::Rms => None,
        super::config::NormKind::Layer => Some(src.norm_bias(name, len)?.to_dtype(dtype)?),
    };
    Ok(Norm { w, b })
}

/// A batch of token runs, one per sequence: `seq_lens[i]` tokens of sequence `i`, flattened
/// in order into `tokens`. Each sequence continues from its cache's length.
#[derive(Debug, Clone, Default)]
pub struct BatchInput {
    pub tokens: Vec<u32>,
    pub seq_lens: Vec<usize>,
}

impl BatchInput {
    pub fn push(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
        self.seq_lens.push(tokens.len());
    }
}

/// The frozen base model.
#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub format: WeightFormat,
    /// Use only differentiable ops (training); slower than the fused inference ops.
    pub differentiable: bool,
    /// The CPU kernels (pool, instruction set) and whether the fused ops run.
    pub kernels: Kernels,
    dtype: DType,
    device: Device,
    embed: Tensor,
    /// The norm right after the embeddings (BLOOM).
    embed_norm: Option<Norm>,
    /// √hidden as a one-element tensor in the activation dtype, where embeddings are scaled (Gemma).
    embed_scale: Option<Tensor>,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: BaseWeight,
    /// Rope tables `(max_positions, head_dim / 2)` in the activation dtype: the global one,
    /// and the sliding-window layers' own where their base differs.
    ropes: Vec<(Tensor, Tensor)>,
    /// Which of `ropes` each layer uses.
    rope_of: Vec<usize>,
}

/// One forward's per-token positions (absolute, per sequence) and their rope rows.
struct Positions {
    pos: Vec<u32>,
    /// `(n, head_dim / 2)` rows of each rope table, for the composed path only.
    rows: Option<Vec<(Tensor, Tensor)>>,
}

/// What the layers of one forward share, and the layer at hand.
struct LayerStep<'a> {
    layer: usize,
    input: &'a BatchInput,
    positions: &'a Positions,
    pass: &'a Pass<'a>,
}

impl Llama {
    pub fn load(
        cfg: LlamaConfig,
        src: &mut dyn WeightSource,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let dtype = format.activation_dtype();
        let embed = src.embed()?.to_dtype(dtype)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for layer in 0..cfg.num_layers {
            let proj = Target::ALL
                .into_iter()
                .map(|target| {
                    if !cfg.arch.has_target(target) {
                        return Ok(None);
                    }
                    let id = ModuleId { layer, target };
                    let bias = if cfg.arch.has_bias(target) {
                        Some(src.bias(id)?.to_dtype(dtype)?)
                    } else {
                        None
                    };
                    Ok(Some(LoraLinear { id, base: src.linear(id, format)?, bias }))
                })
                .collect::<Result<Vec<_>>>()?;
            let qk_norm = if cfg.arch.qk_norm {
                let norm = |src: &mut dyn WeightSource, p: &str| -> Result<Norm> {
                    Ok(Norm {
                        w: src
                            .norm(
                                &format!("model.layers.{layer}.self_attn.{p}.weight"),
                                cfg.head_dim,
                            )?
                            .to_dtype(dtype)?,
                        b: None,
                    })
                };
                Some((norm(src, "q_norm")?, norm(src, "k_norm")?))
            } else {
                None
            };
            let norm = |src: &mut dyn WeightSource, name: &str| {
                load_norm(src, &cfg, &format!("model.layers.{layer}.{name}.weight"), dtype)
            };
            let attn_norm = norm(src, "input_layernorm")?;
            // Gemma's `post_attention_layernorm` normalises the attention output; Llama's is
            // the MLP's input norm, which Gemma calls `pre_feedforward_layernorm`.
            let (mlp_norm, out_norms) = if cfg.arch.sandwich_norms {
                let attn_out = norm(src, "post_attention_layernorm")?;
                let mlp_in = norm(src, "pre_feedforward_layernorm")?;
                (mlp_in, Some((attn_out, norm(src, "post_feedforward_layernorm")?)))
            } else {
                (norm(src, "post_attention_layernorm")?, None)
            };
            blocks.push(Block { attn_norm, mlp_norm, out_norms, proj, qk_norm });
        }
        let norm = load_norm(src, &cfg, "model.norm.weight", dtype)?;
        let embed_norm = if cfg.arch.embed_norm {
            Some(load_norm(src, &cfg, "model.embed_norm.weight", dtype)?)
        } else {
            None
        };
        let lm_head = src.lm_head(format)?;
        let mut ropes = vec![rope_tables(&cfg, dtype, device)?];
        let local = cfg.arch.local_rope_theta.filter(|t| *t != cfg.rope_theta);
        if let Some(theta) = local {
            let local_cfg = LlamaConfig {
                rope_theta: theta,
                rope_scaling: super::RopeScaling::None,
                ..cfg.clone()
            };
            ropes.push(rope_tables(&local_cfg, dtype, device)?);
        }
        let rope_of = (0..cfg.num_layers)
            .map(|l| usize::from(local.is_some() && cfg.arch.window(l).is_some()))
            .collect();
        let kernels = Kernels::new(crate::kernels::Pool::default_threads(), device.is_cpu());
        // √hidden rounded to the activation dtype first, as transformers multiplies.
        let embed_scale = if cfg.arch.embed_scale {
            Some(Tensor::new(&[(cfg.hidden_size as f64).sqrt() as f32], device)?.to_dtype(dtype)?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            format,
            differentiable: false,
            kernels,
            dtype,
            device: device.clone(),
            embed,
            embed_norm,
            embed_scale,
            blocks,
            norm,
            lm_head,
            ropes,
            rope_of,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs the batch and returns the final-normed hidden states `(n_tokens, hidden)`.
    /// With `caches`, sequence `i` continues from `caches[i]` and appends to it; without, every
    /// sequence starts at position 0 and nothing is cached (training).
    pub fn forward(
        &self,
        input: &BatchInput,
        caches: Option<&mut [&mut SeqCache]>,
        lora: &StepLora,
    ) -> Result<Tensor> {
        Ok(self.forward_with_residual(input, caches, lora)?.0)
    }

    /// [`Llama::forward`], also returning the residual stream before the final norm. A row
    /// whose residual overflowed f32 normalises to zeros (its norm statistic is infinite), so
    /// its logits look finite: the engine checks the residual to tell.
    pub fn forward_with_residual(
        &self,
        input: &BatchInput,
        mut caches: Option<&mut [&mut SeqCache]>,
        lora: &StepLora,
    ) -> Result<(Tensor, Tensor)> {
        let n = input.tokens.len();
        let ids = Tensor::from_slice(&input.tokens, n, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(scale) = &self.embed_scale {
            x = x.broadcast_mul(scale)?;
        }
        if let Some(n) = &self.embed_norm {
            x = self.apply_norm(&x, n)?;
        }
        let positions = self.positions(input, caches.as_deref())?;
        let pass = Pass {
            seq_lens: &input.seq_lens,
            lora,
            kernels: &self.kernels,
            differentiable: self.differentiable,
        };
        // Each residual add is fused with the norm after it: the attention norm of the next
        // block, or the final norm after the last.
        let mut h = self.apply_norm(&x, &self.blocks[0].attn_norm)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let mut attn = self.attention(
                block,
                &h,
                &LayerStep { layer, input, positions: &positions, pass: &pass },
                caches.as_deref_mut(),
            )?;
            if let Some((attn_out, _)) = &block.out_norms {
                attn = self.apply_norm(&attn, attn_out)?;
            }
            let (x1, h1) = self.add_and_norm(&x, &attn, &block.mlp_norm)?;
            let mut mlp = self.mlp(block, &h1, &pass)?;
            if let Some((_, mlp_out)) = &block.out_norms {
                mlp = self.apply_norm(&mlp, mlp_out)?;
            }
            let next = self.blocks.get(layer + 1).map_or(&self.norm, |b| &b.attn_norm);
            (x, h) = self.add_and_norm(&x1, &mlp, next)?;
        }
        Ok((h, x))
    }

    /// Whether the engine's KV caches are host blocks (the fused attention) rather than device
    /// tensors (the composed path).
    pub fn host_kv(&self) -> bool {
        !self.differentiable && self.kernels.fused_attention(&self.embed, None)
    }

    /// Bytes of one KV block's worth of cache ([`super::kv_cache::BLOCK_TOKENS`] tokens, every
    /// layer): f32 host blocks, or device buffers in the activation dtype (bf16 on CUDA).
    pub fn kv_block_bytes(&self) -> usize {
        let elem =
            if self.host_kv() { std::mem::size_of::<f32>() } else { self.dtype.size_in_bytes() };
        super::kv_cache::block_bytes(self.cfg.num_layers, self.kv_width(), elem)
    }

    /// Floats per token per layer in K (and in V): `n_kv_heads · head_dim`.
    pub fn kv_width(&self) -> usize {
        self.cfg.num_kv_heads * self.cfg.head_dim
    }

    fn positions(&self, input: &BatchInput, caches: Option<&[&mut SeqCache]>) -> Result<Positions> {
        let n = input.tokens.len();
        let starts: Vec<usize> = match caches {
            Some(c) => c.iter().map(|c| c.len()).collect(),
            None => vec![0; input.seq_lens.len()],
        };
        let pos: Vec<u32> = starts
            .iter()
            .zip(&input.seq_lens)
            .flat_map(|(&s, &l)| (s..s + l).map(|p| p as u32))
            .collect();
        if pos.iter().any(|&p| p as usize >= self.cfg.max_position_embeddings) {
            return Err(super::ModelError::Unsupported(format!(
                "position beyond the model's context of {} tokens",
                self.cfg.max_position_embeddings
            )));
        }
        let fused = !self.differentiable && self.kernels.fused_attention(&self.embed, caches);
        let rows = if fused {
            None
        } else {
            let p = Tensor::from_slice(&pos, n, &self.device)?;
            Some(
                self.ropes
                    .iter()
                    .map(|(cos, sin)| Ok((cos.index_select(&p, 0)?, sin.index_select(&p, 0)?)))
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        Ok(Positions { pos, rows })
    }

    /// Logits in f32 for hidden rows `(n, hidden)` → `(n, vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let y = match (&self.lm_head, self.differentiable) {
            (BaseWeight::Dense(w), true) => super::frozen::frozen_matmul(hidden, w)?,
            _ => self.lm_head.forward(hidden, &self.kernels)?,
        };
        Ok(y.to_dtype(DType::F32)?)
    }

    /// The hidden row of each sequence's last token.
    pub fn last_rows(hidden: &Tensor, seq_lens: &[usize]) -> Result<Tensor> {
        let mut idx = Vec::with_capacity(seq_lens.len());
        let mut end = 0u32;
        for &l in seq_lens {
            end += l as u32;
            idx.push(end - 1);
        }
        let idx = Tensor::from_vec(idx, seq_lens.len(), hidden.device())?;
        Ok(hidden.index_select(&idx, 0)?)
    }

    /// The model's norm (RMS, or LayerNorm where `n` has a bias) of `x`.
    fn apply_norm(&self, x: &Tensor, n: &Norm) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        if let Some(b) = &n.b {
            return Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &n.w, b, eps)?);
        }
        if self.differentiable {
            return Ok(super::diffops::rms_norm(x, &n.w, eps)?);
        }
        self.kernels.rms_norm(x, &n.w, eps)
    }

    /// The attention score scale: `query_pre_attn_scalar^-1/2` where the architecture sets one.
    fn attn_scale(&self) -> f64 {
        1.0 / self.cfg.arch.query_pre_attn_scalar.unwrap_or(self.cfg.head_dim as f64).sqrt()
    }

    /// RMS norm over each head's `head_dim` values of `(n, heads · head_dim)`.
    fn head_norm(&self, x: &Tensor, w: &Norm) -> Result<Tensor> {
        let (n, width) = x.dims2()?;
        let hd = self.cfg.head_dim;
        Ok(self.apply_norm(&x.reshape((n * width / hd, hd))?, w)?.reshape((n, width))?)
    }

    fn add_and_norm(&self, x: &Tensor, y: &Tensor, n: &Norm) -> Result<(Tensor, Tensor)> {
        if self.differentiable || n.b.is_some() {
            let sum = (x + y)?;
            let normed = self.apply_norm(&sum, n)?;
            return Ok((sum, normed));
        }
        self.kernels.add_rms_norm(x, y, &n.w, self.cfg.rms_norm_eps as f32)
    }

    fn attention(
        &self,
        block: &Block,
        h: &Tensor,
        step: &LayerStep<'_>,
        caches: Option<&mut [&mut SeqCache]>,
    ) -> Result<Tensor> {
        let pass = step.pass;
        let mut q = block.proj(Target::Q)?.forward(h, pass)?;
        let mut k = block.proj(Target::K)?.forward(h, pass)?;
        let v = block.proj(Target::V)?.forward(h, pass)?;
        if let Some((qn, kn)) = &block.qk_norm {
            q = self.head_norm(&q, qn)?;
            k = self.head_norm(&k, kn)?;
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
    fn fused_attention(
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
                fused::attention(&self.kernels.pool, dims, &qv, &seqs, &mut out);
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
                fused::attention(&self.kernels.pool, dims, &qv, &seqs, &mut out);
            }
        }
        host_tensor(out, (input.tokens.len(), nh * hd))
    }

    /// The composed reference: candle's rope, the device caches and batched matmuls per
    /// sequence (and the differentiable ops when training).
    fn composed_attention(
        &self,
        step: &LayerStep<'_>,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mut caches: Option<&mut [&mut SeqCache]>,
    ) -> Result<Tensor> {
        let (layer, input) = (step.layer, step.input);
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
                self.rope(&q.reshape((n, nh, hd))?, cos, sin)?,
                self.rope(&k.reshape((n, nkv, hd))?, cos, sin)?,
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
            let att = match (self.differentiable, window) {
                (true, _) if alibi => {
                    return Err(super::ModelError::Unsupported(
                        "training with ALiBi attention".into(),
                    ))
                }
                (true, None) => {
                    super::diffops::causal_softmax(&qg.matmul(&k_heads.t()?)?, scale, t)?
                }
                (true, Some(_)) => {
                    return Err(super::ModelError::Unsupported(
                        "training with sliding-window attention".into(),
                    ))
                }
                (false, _) => {
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
                    candle_nn::ops::softmax_last_dim(&masked)?
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
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(if self.differentiable {
            super::diffops::rope(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)?
        })
    }

    fn mlp(&self, block: &Block, h: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let up = block.proj(Target::Up)?.forward(h, pass)?;
        let act = match (
            block.proj[Target::Gate as usize].as_ref(),
            self.cfg.arch.activation,
            self.differentiable,
        ) {
            (None, super::Activation::Silu, _) => candle_nn::ops::silu(&up)?,
            (None, super::Activation::GeluTanh, _) => up.gelu()?,
            (Some(g), act, differentiable) => {
                let gate = g.forward(h, pass)?;
                match (act, differentiable) {
                    (super::Activation::Silu, true) => (candle_nn::ops::silu(&gate)? * up)?,
                    (super::Activation::Silu, false) => self.kernels.silu_mul(&gate, &up)?,
                    (super::Activation::GeluTanh, _) => (gate.gelu()? * up)?,
                }
            }
        };
        block.proj(Target::Down)?.forward(&act, pass)
    }

    /// A copy whose weights are `W + Σ c_i B_i A_i` for `mix` (dense f32): the merged path that
    /// the unmerged paths are tested against.
    pub fn merged(&self, mix: &AdapterMix) -> Result<Llama> {
        let mut out = self.clone();
        for block in out.blocks.iter_mut() {
            for p in block.proj.iter_mut().flatten() {
                let mut w = p.base.to_dense_f32()?;
                for (lw, c) in mix.terms(p.id) {
                    w = (w + (lw.b.matmul(&lw.a)? * c)?)?;
                }
                p.base = BaseWeight::Dense(w.to_dtype(self.dtype)?);
            }
        }
        Ok(out)
    }

    /// A copy with every base weight as dense f32 (exactly the values the packed or quantized
    /// weights stand for): the exact path the other formats are measured against.
    pub fn dense_f32(&self) -> Result<Llama> {
        let mut out = self.clone();
        for block in out.blocks.iter_mut() {
            for p in block.proj.iter_mut().flatten() {
                p.base = BaseWeight::Dense(p.base.to_dense_f32()?);
            }
        }
        out.lm_head = BaseWeight::Dense(self.lm_head.to_dense_f32()?);
        out.format = WeightFormat::Dense(DType::F32);
        Ok(out)
    }

    /// Bytes of base weights on the device.
    pub fn size_in_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        t(&self.embed)
            + self.lm_head.size_in_bytes()
            + self
                .blocks
                .iter()
                .map(|b| b.proj.iter().flatten().map(|p| p.base.size_in_bytes()).sum::<usize>())
                .sum::<usize>()
    }

    /// The projection `id`'s frozen base weight (for training and tests); `None` where the
    /// architecture has no such projection.
    pub fn base_weight(&self, id: ModuleId) -> Option<&BaseWeight> {
        self.blocks.get(id.layer)?.proj.get(id.target as usize)?.as_ref().map(|p| &p.base)
    }

    /// A model with random weights (seeded), for invariant tests and benches.
    pub fn random(cfg: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::random_with(cfg, seed, device, WeightFormat::Dense(DType::F32))
    }

    /// [`Llama::random`] stored as `format` (packed: through Q4_1, as a GGUF would arrive).
    pub fn random_with(
        cfg: LlamaConfig,
        seed: u64,
        device: &Device,
        format: WeightFormat,
    ) -> Result<Self> {
        let mut src = super::random::RandomSource::new(cfg.clone(), seed, device.clone());
        Self::load(cfg, &mut src, format, device)
    }

    /// The same weights running the composed candle ops instead of the fused kernels (the
    /// reference the fused path is tested against).
    pub fn with_fused(&self, fused: bool) -> Llama {
        let mut m = self.clone();
        m.kernels.fused = fused;
        m
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

fn rope_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq = cfg.inv_freq();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.max_position_embeddings, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
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
