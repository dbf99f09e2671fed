//! The one decoder every family runs (Llama, Mistral, Qwen2/3, Phi-3, Gemma 3, BLOOM: an
//! architecture is data, `model::config`), over ragged batches: every linear is a
//! [`LoraLinear`], tokens of all sequences are flattened into one matrix for the projections,
//! attention (`model::attention`) runs per sequence against its own KV cache. How the ops run
//! is an [`Exec`] each forward is given: serving runs the model's inference mode (fused CPU
//! kernels or candle's composed ops, chosen at load); a training step passes
//! [`Exec::Differentiable`] down its own calls ([`Decoder::forward_in`]), so the trainer
//! reuses the serving model without any step seeing another's mode.

use super::kv_cache::SeqCache;
use super::linear::{BaseWeight, LoraLinear, Pass};
use super::lora::StepLora;
use super::names::Role;
use super::ops::{Exec, Kernels};
use super::weights::WeightSource;
use super::{DecoderConfig, ModuleId, Result, Target, WeightFormat};
use candle_core::{DType, Device, Tensor};

/// A norm's weight, and its bias for a LayerNorm (an RMS norm has none).
#[derive(Debug, Clone)]
pub(super) struct Norm {
    pub(super) w: Tensor,
    pub(super) b: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) attn_norm: Norm,
    pub(super) mlp_norm: Norm,
    /// Norms of the attention and MLP outputs before their residual adds (Gemma 3).
    pub(super) out_norms: Option<(Norm, Norm)>,
    /// q, k, v, o, gate, up, down in [`Target::ALL`] order; `None` where the architecture
    /// has no such projection (a gateless MLP).
    pub(super) proj: Vec<Option<LoraLinear>>,
    /// Per-head RMS norms `(head_dim)` on q and k before rope (Qwen3, Gemma 3).
    pub(super) qk_norm: Option<(Norm, Norm)>,
}

impl Block {
    pub(super) fn proj(&self, t: Target) -> Result<&LoraLinear> {
        self.proj[t as usize].as_ref().ok_or_else(|| {
            super::ModelError::Generation(format!("the model has no `{}`; this is a bug", t.name()))
        })
    }
}

/// A hidden-size norm, with its bias where the architecture's norms have one.
fn load_norm(
    src: &mut dyn WeightSource,
    cfg: &DecoderConfig,
    role: Role,
    dtype: DType,
) -> Result<Norm> {
    let len = cfg.hidden_size;
    let w = src.norm(role, len)?.to_dtype(dtype)?;
    let b = match cfg.arch.norm {
        super::config::NormKind::Rms => None,
        super::config::NormKind::Layer => Some(src.norm_bias(role, len)?.to_dtype(dtype)?),
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
pub struct Decoder {
    pub cfg: DecoderConfig,
    pub format: WeightFormat,
    /// The CPU kernels (pool, instruction set) and how the ops run ([`Exec`]).
    pub kernels: Kernels,
    pub(super) dtype: DType,
    pub(super) device: Device,
    embed: Tensor,
    /// The norm right after the embeddings (BLOOM).
    embed_norm: Option<Norm>,
    /// √hidden as a one-element tensor in the activation dtype, where embeddings are scaled (Gemma).
    embed_scale: Option<Tensor>,
    pub(super) blocks: Vec<Block>,
    norm: Norm,
    pub(super) lm_head: BaseWeight,
    /// Rope tables `(max_positions, head_dim / 2)` in the activation dtype: the global one,
    /// and the sliding-window layers' own where their base differs.
    pub(super) ropes: Vec<(Tensor, Tensor)>,
    /// Which of `ropes` each layer uses.
    pub(super) rope_of: Vec<usize>,
}

/// The frozen projections' weights and the vocabulary layers' (reference counted, never
/// copied), for work outside the engine thread that must read them when an adapter loads:
/// DoRA's weight norms, the check of PEFT's saved copies of the embedding and head.
#[derive(Debug, Clone)]
pub struct FrozenProjections {
    proj: std::sync::Arc<[Option<BaseWeight>]>,
    embed: Tensor,
    head: BaseWeight,
}

impl FrozenProjections {
    /// Projection `id`'s weight `(out, in)` as dense f32 (the values its format stands for),
    /// `None` where the model has no such projection.
    pub fn dense_f32(&self, id: ModuleId) -> Result<Option<Tensor>> {
        self.proj.get(id.index()).and_then(Option::as_ref).map(BaseWeight::to_dense_f32).transpose()
    }

    /// The embedding `(vocab, hidden)` in f32.
    pub fn embed_f32(&self) -> Result<Tensor> {
        Ok(self.embed.to_dtype(DType::F32)?)
    }

    /// The output head's weight `(vocab, hidden)` as dense f32 (the embedding's when tied).
    pub fn head_f32(&self) -> Result<Tensor> {
        self.head.to_dense_f32()
    }
}

/// One forward's per-token positions (absolute, per sequence) and their rope rows.
pub(super) struct Positions {
    pub(super) pos: Vec<u32>,
    /// `(n, head_dim / 2)` rows of each rope table, for the composed path only.
    pub(super) rows: Option<Vec<(Tensor, Tensor)>>,
}

/// What the layers of one forward share, and the layer at hand.
pub(super) struct LayerStep<'a> {
    pub(super) layer: usize,
    pub(super) input: &'a BatchInput,
    pub(super) positions: &'a Positions,
    pub(super) pass: &'a Pass<'a>,
}

impl Decoder {
    pub fn load(
        cfg: DecoderConfig,
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
                let norm = |src: &mut dyn WeightSource, role: Role| -> Result<Norm> {
                    Ok(Norm { w: src.norm(role, cfg.head_dim)?.to_dtype(dtype)?, b: None })
                };
                Some((norm(src, Role::QNorm(layer))?, norm(src, Role::KNorm(layer))?))
            } else {
                None
            };
            let norm = |src: &mut dyn WeightSource, role: Role| load_norm(src, &cfg, role, dtype);
            let attn_norm = norm(src, Role::AttnNorm(layer))?;
            let mlp_norm = norm(src, Role::MlpNorm(layer))?;
            let out_norms = match cfg.arch.sandwich_norms {
                true => Some((
                    norm(src, Role::AttnOutNorm(layer))?,
                    norm(src, Role::MlpOutNorm(layer))?,
                )),
                false => None,
            };
            blocks.push(Block { attn_norm, mlp_norm, out_norms, proj, qk_norm });
        }
        let norm = load_norm(src, &cfg, Role::FinalNorm, dtype)?;
        let embed_norm = if cfg.arch.embed_norm {
            Some(load_norm(src, &cfg, Role::EmbedNorm, dtype)?)
        } else {
            None
        };
        let lm_head = src.lm_head(format)?;
        let mut ropes = vec![rope_tables(&cfg, dtype, device)?];
        let local = cfg.arch.local_rope_theta.filter(|t| *t != cfg.rope_theta);
        if let Some(theta) = local {
            let local_cfg = DecoderConfig {
                rope_theta: theta,
                rope_scaling: super::RopeScaling::None,
                ..cfg.clone()
            };
            ropes.push(rope_tables(&local_cfg, dtype, device)?);
        }
        let rope_of = (0..cfg.num_layers)
            .map(|l| usize::from(local.is_some() && cfg.arch.window(l).is_some()))
            .collect();
        let kernels =
            Kernels::new(crate::kernels::Pool::default_threads(), Exec::inference(device, dtype));
        // √hidden rounded to the activation dtype first, as transformers multiplies.
        let embed_scale = if cfg.arch.embed_scale {
            Some(Tensor::new(&[(cfg.hidden_size as f64).sqrt() as f32], device)?.to_dtype(dtype)?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            format,
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

    /// What inference runs on this model (its own kernels' mode, chosen at load).
    pub fn inference_exec(&self) -> Exec {
        self.kernels.exec
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
        Ok(self.run(&self.kernels, input, caches, lora)?.0)
    }

    /// [`Decoder::forward`] with its ops run as `exec` says: a training step passes
    /// [`Exec::Differentiable`]; tests pass [`Exec::Composed`] for the reference path.
    pub fn forward_in(
        &self,
        exec: Exec,
        input: &BatchInput,
        caches: Option<&mut [&mut SeqCache]>,
        lora: &StepLora,
    ) -> Result<Tensor> {
        Ok(self.run(&self.kernels.with_exec(exec), input, caches, lora)?.0)
    }

    /// [`Decoder::forward`], also returning the residual stream before the final norm. A row
    /// whose residual overflowed f32 normalises to zeros (its norm statistic is infinite), so
    /// its logits look finite: the engine checks the residual to tell.
    pub fn forward_with_residual(
        &self,
        input: &BatchInput,
        caches: Option<&mut [&mut SeqCache]>,
        lora: &StepLora,
    ) -> Result<(Tensor, Tensor)> {
        self.run(&self.kernels, input, caches, lora)
    }

    /// The forward on kernels `k` (whose mode every op below reads from `k`, never from the
    /// model).
    fn run(
        &self,
        k: &Kernels,
        input: &BatchInput,
        mut caches: Option<&mut [&mut SeqCache]>,
        lora: &StepLora,
    ) -> Result<(Tensor, Tensor)> {
        let n = input.tokens.len();
        let ids = Tensor::from_slice(&input.tokens, n, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(mixes) = lora.vocab_mixes() {
            x = super::lora::vocab::embed(&x, &input.tokens, &input.seq_lens, mixes)?;
        }
        if let Some(scale) = &self.embed_scale {
            x = x.broadcast_mul(scale)?;
        }
        if let Some(n) = &self.embed_norm {
            x = self.apply_norm(k, &x, n)?;
        }
        let positions = self.positions(k, input, caches.as_deref())?;
        let pass = Pass { seq_lens: &input.seq_lens, lora, kernels: k };
        // Each residual add is fused with the norm after it: the attention norm of the next
        // block, or the final norm after the last.
        let mut h = self.apply_norm(k, &x, &self.blocks[0].attn_norm)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let mut attn = self.attention(
                block,
                &h,
                &LayerStep { layer, input, positions: &positions, pass: &pass },
                caches.as_deref_mut(),
            )?;
            if let Some((attn_out, _)) = &block.out_norms {
                attn = self.apply_norm(k, &attn, attn_out)?;
            }
            let (x1, h1) = self.add_and_norm(k, &x, &attn, &block.mlp_norm)?;
            let mut mlp = self.mlp(block, &h1, &pass)?;
            if let Some((_, mlp_out)) = &block.out_norms {
                mlp = self.apply_norm(k, &mlp, mlp_out)?;
            }
            let next = self.blocks.get(layer + 1).map_or(&self.norm, |b| &b.attn_norm);
            (x, h) = self.add_and_norm(k, &x1, &mlp, next)?;
        }
        Ok((h, x))
    }

    /// Whether the engine's KV caches are host blocks (the fused attention) rather than device
    /// tensors (the composed path).
    pub fn host_kv(&self) -> bool {
        self.kernels.fused_attention(&self.embed, None)
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

    fn positions(
        &self,
        k: &Kernels,
        input: &BatchInput,
        caches: Option<&[&mut SeqCache]>,
    ) -> Result<Positions> {
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
        let fused = k.fused_attention(&self.embed, caches);
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
        self.logits_on(&self.kernels, hidden)
    }

    /// [`Decoder::logits`] with the step's output-head LoRA and replaced rows: hidden row `i`
    /// belongs to sequence `seq_of_row[i]` of the step `lora` was built for.
    pub fn logits_for(
        &self,
        hidden: &Tensor,
        seq_of_row: &[usize],
        lora: &StepLora,
    ) -> Result<Tensor> {
        let logits = self.logits(hidden)?;
        match lora.vocab_mixes() {
            Some(mixes) => super::lora::vocab::head(logits, hidden, seq_of_row, mixes),
            None => Ok(logits),
        }
    }

    /// [`Decoder::logits`] run as `exec` says (training: differentiable).
    pub fn logits_in(&self, exec: Exec, hidden: &Tensor) -> Result<Tensor> {
        self.logits_on(&self.kernels.with_exec(exec), hidden)
    }

    fn logits_on(&self, k: &Kernels, hidden: &Tensor) -> Result<Tensor> {
        let y = if k.exec == Exec::Differentiable {
            super::frozen::frozen_base(hidden, &self.lm_head, k)?
        } else {
            self.lm_head.forward(hidden, k)?
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
    pub(super) fn apply_norm(&self, k: &Kernels, x: &Tensor, n: &Norm) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        let differentiable = k.exec == Exec::Differentiable;
        if let Some(b) = &n.b {
            if differentiable {
                return Ok(super::diffops::layer_norm(x, &n.w, b, eps)?);
            }
            return Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &n.w, b, eps)?);
        }
        if differentiable {
            return Ok(super::diffops::rms_norm(x, &n.w, eps)?);
        }
        k.rms_norm(x, &n.w, eps)
    }

    fn add_and_norm(
        &self,
        k: &Kernels,
        x: &Tensor,
        y: &Tensor,
        n: &Norm,
    ) -> Result<(Tensor, Tensor)> {
        if k.exec == Exec::Differentiable || n.b.is_some() {
            let sum = (x + y)?;
            let normed = self.apply_norm(k, &sum, n)?;
            return Ok((sum, normed));
        }
        k.add_rms_norm(x, y, &n.w, self.cfg.rms_norm_eps as f32)
    }

    fn mlp(&self, block: &Block, h: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let differentiable = pass.kernels.exec == Exec::Differentiable;
        let up = block.proj(Target::Up)?;
        let act = match (block.proj[Target::Gate as usize].as_ref(), self.cfg.arch.activation) {
            (None, super::Activation::Silu) => candle_nn::ops::silu(&up.forward(h, pass)?)?,
            (None, super::Activation::GeluTanh) => up.forward(h, pass)?.gelu()?,
            (Some(g), act) => {
                let [gate, up] = LoraLinear::forward_many([g, up], h, pass)?;
                match (act, differentiable) {
                    (super::Activation::Silu, true) => super::diffops::silu_mul(&gate, &up)?,
                    (super::Activation::Silu, false) => pass.kernels.silu_mul(&gate, &up)?,
                    (super::Activation::GeluTanh, _) => (gate.gelu()? * up)?,
                }
            }
        };
        block.proj(Target::Down)?.forward(&act, pass)
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

    /// The frozen projections' weights, shared by reference.
    pub fn projections(&self) -> FrozenProjections {
        let mut w = vec![None; ModuleId::count(self.cfg.num_layers)];
        for block in &self.blocks {
            for p in block.proj.iter().flatten() {
                w[p.id.index()] = Some(p.base.clone());
            }
        }
        FrozenProjections { proj: w.into(), embed: self.embed.clone(), head: self.lm_head.clone() }
    }

    /// Bytes of weights one batch-1 decode step must read: every projection and the LM head
    /// once (the embedding only one row). What bounds batch-1 decode on a memory-bound host,
    /// with the read bandwidth of `kernels::probe`.
    pub fn bytes_per_token(&self) -> usize {
        let row =
            self.embed.dims().last().copied().unwrap_or(0) * self.embed.dtype().size_in_bytes();
        self.size_in_bytes() - self.embed.elem_count() * self.embed.dtype().size_in_bytes() + row
    }

    /// The projection `id`'s frozen base weight (for training and tests); `None` where the
    /// architecture has no such projection.
    pub fn base_weight(&self, id: ModuleId) -> Option<&BaseWeight> {
        self.blocks.get(id.layer)?.proj.get(id.target as usize)?.as_ref().map(|p| &p.base)
    }
}

fn rope_tables(cfg: &DecoderConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq = cfg.inv_freq();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.max_position_embeddings, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}
