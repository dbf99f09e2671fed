//! The weights of a loaded LoRA adapter as the model computes with them: each adapted module's
//! `A` and `B` (f32, on the model's device, with host copies on the CPU) and its scaling
//! `alpha / r` (or `alpha / sqrt(r)`), resolved per module. Reading them from a PEFT folder is
//! `adapters::loader`'s.
//!
//! Invariant: a [`LoraAdapter`] is immutable once loaded and shared through `Arc`; a reload
//! produces a new value, so a request holding the old `Arc` never sees weights change.

use super::super::ModuleId;
use super::dora::DoraRows;
use candle_core::Tensor;
use std::path::PathBuf;
use std::sync::Arc;

/// `A` and `B` of one adapted module, in f32 on the model's device, with the scaling
/// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA) resolved for this module.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `(r, in)`.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
    /// `Aᵀ` `(in, r)` and `Bᵀ` `(r, out)`, contiguous: what the stacked path stacks. Kept only
    /// where there is no host copy (a device, or trainable weights); read them through
    /// [`LoraWeights::transposes`].
    stacked: Option<(Tensor, Tensor)>,
    pub rank: usize,
    pub alpha: f64,
    pub scaling: f64,
    /// On the CPU: `A` `(r, in)` and `Bᵀ` `(r, out)` as plain shared slices, which the fused
    /// host LoRA kernel reads with no tensor locks (a batch composition only clones the `Arc`s).
    pub host: Option<HostLoraWeights>,
    /// DoRA's magnitude and norm products, for a `use_dora` adapter ([`super::dora`]).
    pub dora: Option<Arc<DoraRows>>,
    /// Training only: the live magnitude `(out)` whose gradient the step wants; the gains are
    /// then `m / ||W + c·B A||` with the norms detached, as PEFT trains them.
    pub trainable_magnitude: Option<Tensor>,
}

/// A module's LoRA scaling: `alpha / r`, or `alpha / sqrt(r)` for rsLoRA.
pub fn scaling(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// Host copies of one module's `A` and `Bᵀ`, row-major f32.
#[derive(Debug, Clone)]
pub struct HostLoraWeights {
    pub a: Arc<[f32]>,
    pub b_t: Arc<[f32]>,
}

impl LoraWeights {
    pub fn new(a: Tensor, b: Tensor, alpha: f64, use_rslora: bool) -> candle_core::Result<Self> {
        let rank = a.dim(0)?;
        let scaling = scaling(alpha, rank, use_rslora);
        let b_t = b.t()?.contiguous()?;
        let (host, stacked) =
            if a.device().is_cpu() && a.dtype() == candle_core::DType::F32 && !a.is_variable() {
                (
                    Some(HostLoraWeights {
                        a: a.flatten_all()?.to_vec1::<f32>()?.into(),
                        b_t: b_t.flatten_all()?.to_vec1::<f32>()?.into(),
                    }),
                    None,
                )
            } else {
                (None, Some((a.t()?.contiguous()?, b_t)))
            };
        Ok(Self {
            a,
            b,
            stacked,
            rank,
            alpha,
            scaling,
            host,
            dora: None,
            trainable_magnitude: None,
        })
    }

    /// The same module as a DoRA one, with `rows` (built against the base weight).
    pub fn with_dora(mut self, rows: DoraRows) -> Self {
        self.dora = Some(Arc::new(rows));
        self
    }

    /// DoRA's gains at coefficient `c` as a `(1, out)` tensor in `dtype`: from the trainable
    /// magnitude when there is one (differentiable in it), else the memoised constants.
    pub fn dora_gains(
        &self,
        c: f64,
        dtype: candle_core::DType,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(d) = &self.dora else { return Ok(None) };
        let dev = self.a.device();
        let k = match &self.trainable_magnitude {
            Some(m) => {
                let norms: Vec<f32> = d.norms(c).iter().map(|&n| n as f32).collect();
                let n = Tensor::from_vec(norms, (1, d.len()), dev)?;
                m.reshape((1, d.len()))?.broadcast_div(&n)?
            }
            None => Tensor::from_slice(&d.shared_gains(c), (1, d.len()), dev)?,
        };
        Ok(Some(k.to_dtype(dtype)?))
    }

    /// `(Aᵀ, Bᵀ)`, contiguous; computed on demand when only the host copy is kept (the stacked
    /// path then serves only as the reference).
    pub fn transposes(&self) -> candle_core::Result<(Tensor, Tensor)> {
        match &self.stacked {
            Some(t) => Ok(t.clone()),
            None => Ok((self.a.t()?.contiguous()?, self.b.t()?.contiguous()?)),
        }
    }

    /// `(in, out)` of the adapted projection.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        Ok((self.a.dim(1)?, self.b.dim(0)?))
    }

    /// Bytes this module keeps resident: `A`, `B`, and either their transposes or the host copies.
    pub fn resident_bytes(&self) -> usize {
        let host = self.host.as_ref().map_or(0, |h| h.a.len() + h.b_t.len());
        let stacked =
            self.stacked.as_ref().map_or(0, |(a_t, b_t)| a_t.elem_count() + b_t.elem_count());
        (self.a.elem_count() + self.b.elem_count() + stacked + host) * 4
            + self.dora.as_ref().map_or(0, |d| d.resident_bytes())
    }
}

/// A loaded adapter: per-module weights, indexed by [`ModuleId::index`].
#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    pub path: PathBuf,
    /// The adapter's `r` and `lora_alpha` as its config states them (modules may differ, by
    /// `rank_pattern` / `alpha_pattern`: each module's own are on its [`LoraWeights`]).
    pub rank: usize,
    pub alpha: f64,
    pub modules: Vec<Option<LoraWeights>>,
    /// LoRA and replaced rows on the embedding and the output head ([`super::vocab`]).
    pub vocab: super::vocab::VocabAdapter,
    /// Bytes this adapter keeps resident ([`LoraWeights::resident_bytes`]): what the budget counts.
    pub size_bytes: usize,
    /// Set by the registry: bumped each time the folder changes (0 outside a registry).
    pub version: u64,
}

impl LoraAdapter {
    pub fn module(&self, id: ModuleId) -> Option<&LoraWeights> {
        self.modules.get(id.index()).and_then(Option::as_ref)
    }

    /// The largest `|alpha / r|` of any module, the vocabulary layers' included: what a
    /// request's scale multiplies.
    pub fn max_scaling(&self) -> Option<f64> {
        let m = self.modules.iter().flatten().map(|w| w.scaling.abs()).reduce(f64::max);
        match (m, self.vocab.max_scaling()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Distinct module names this adapter changes, e.g. `["q_proj", "v_proj"]`, with
    /// `embed_tokens` and `lm_head` (PEFT's usual names) where it changes those.
    pub fn target_names(&self) -> Vec<&'static str> {
        let layers = self.modules.len() / super::super::Target::ALL.len();
        let mut names: Vec<&'static str> = super::super::Target::ALL
            .into_iter()
            .filter(|&target| {
                (0..layers).any(|layer| self.module(ModuleId { layer, target }).is_some())
            })
            .map(|t| t.name())
            .collect();
        for (layer, name) in [(&self.vocab.embed, "embed_tokens"), (&self.vocab.head, "lm_head")] {
            if !layer.is_empty() {
                names.push(name);
            }
        }
        names
    }
}
