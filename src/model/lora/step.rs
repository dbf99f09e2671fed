//! Per-step LoRA state: the deltas `Σ_i c_i · B_i (A_i x)` each row of a batch needs (and
//! DoRA's rescaling of a module's running result, [`super::dora`]), in
//! implementations that must agree — batched fast paths (on the CPU, a fused kernel over each
//! sequence's own adapter weights, added into the base output in place; on other devices,
//! adapters stacked per sequence once per batch composition and two batched matmuls per
//! module) and a plain per-row reference path.

use super::super::ops::HostF32;
use super::super::{ModuleId, Result};
use super::mix::AdapterMix;
use crate::kernels::fused::{lora_batch, LoraRun, LoraTerm};
use crate::kernels::Pool;
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

/// The LoRA work of one forward step, one mix per sequence of the batch.
#[derive(Debug, Clone)]
pub enum StepLora {
    /// No sequence carries an adapter: the base model.
    None,
    /// Fast path: stacked per-sequence `Aᵀ`/`Bᵀ` and coefficients for every module.
    Batched(BatchedLora),
    /// Reference path: loop over sequences and their mix terms, exactly as PEFT writes it.
    PerRow(Vec<AdapterMix>),
    /// Training: the reference path (differentiable) with LoRA dropout on its input, as PEFT
    /// applies it (`B(A(dropout(x)))`).
    /// Masks are drawn from `seed` and the module, so a step is reproducible.
    Training { mixes: Vec<AdapterMix>, dropout: f32, seed: u64 },
}

/// One module's LoRA operands for the step's sequences.
#[derive(Debug, Clone)]
enum ModuleLora {
    Stacked(StackedLora),
    Host(HostLora),
}

/// Host (CPU f32) operands: each sequence's own terms, referenced, not copied, so a new batch
/// composition costs only reference counts.
#[derive(Debug, Clone)]
struct HostLora {
    per_seq: Vec<Vec<HostTerm>>,
    fan_in: usize,
    fan_out: usize,
    /// Some term has a gain (DoRA).
    rescales: bool,
}

#[derive(Debug, Clone)]
struct HostTerm {
    weights: super::weights::HostLoraWeights,
    rank: usize,
    coef: f32,
    /// A DoRA term's `m / ||W + c·B A||` at this step's coefficient.
    gain: Option<Arc<[f32]>>,
}

/// Stacked LoRA operands of one module for `S` sequences, each padded to the largest summed
/// rank `R` of the batch with zero columns (which contribute exactly zero). Always f32 (the
/// adapters' own precision): with bf16 or f16 activations the delta is computed and summed
/// over a mix's terms in f32 and rounded once, where it is added to the base output.
#[derive(Debug, Clone)]
struct StackedLora {
    /// `(S, in, R)`.
    a_t: Tensor,
    /// `(S, R, out)`.
    b_t: Tensor,
    /// `(S, 1, R)`: `c_i` repeated over adapter `i`'s rank columns, zero in the padding.
    coef: Tensor,
    /// With DoRA terms: `(S, out)`, the product of every DoRA gain of the sequence's mix, which
    /// multiplies the base output (each term's `Bᵀ` rows carry the gains of the terms after it,
    /// so `k_m ⊙ (… k_1 ⊙ (W x + d_1) … + d_m)` is one gain on the base plus the deltas).
    base_gain: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct BatchedLora {
    modules: Vec<Option<ModuleLora>>,
    /// The sequences' mixes where one changes the embedding or the head ([`super::vocab`]).
    vocab: Option<Vec<AdapterMix>>,
}

impl StepLora {
    /// The fast path for these per-sequence mixes (or `None` when no mix has a term): the
    /// host kernel for CPU f32, stacked operands elsewhere.
    pub fn batched(
        mixes: &[&AdapterMix],
        num_layers: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(mixes, num_layers, |id| {
            if device.is_cpu() && dtype == DType::F32 {
                if let Some(h) = HostLora::build(id, mixes) {
                    return Ok(Some(ModuleLora::Host(h)));
                }
            }
            StackedLora::build(id, mixes, device).map(|m| m.map(ModuleLora::Stacked))
        })
    }

    /// The stacked-operand path (two batched matmuls per module) on any device, CPU included:
    /// what GPUs run, kept testable here.
    pub fn stacked(mixes: &[&AdapterMix], num_layers: usize, device: &Device) -> Result<Self> {
        Self::build(mixes, num_layers, |id| {
            StackedLora::build(id, mixes, device).map(|m| m.map(ModuleLora::Stacked))
        })
    }

    fn build(
        mixes: &[&AdapterMix],
        num_layers: usize,
        module: impl Fn(ModuleId) -> Result<Option<ModuleLora>>,
    ) -> Result<Self> {
        if mixes.iter().all(|m| m.is_empty()) {
            return Ok(StepLora::None);
        }
        let modules = ModuleId::all(num_layers).map(module).collect::<Result<Vec<_>>>()?;
        let vocab = mixes
            .iter()
            .any(|m| m.touches_vocab())
            .then(|| mixes.iter().map(|m| (*m).clone()).collect());
        Ok(StepLora::Batched(BatchedLora { modules, vocab }))
    }

    /// Each sequence's mix, when some mix changes the embedding or the output head (what
    /// [`super::vocab::embed`] and [`super::vocab::head`] apply); `None` otherwise.
    pub fn vocab_mixes(&self) -> Option<&[AdapterMix]> {
        let mixes = match self {
            StepLora::None => return None,
            StepLora::Batched(b) => return b.vocab.as_deref(),
            StepLora::PerRow(mixes) | StepLora::Training { mixes, .. } => mixes,
        };
        mixes.iter().any(AdapterMix::touches_vocab).then_some(mixes.as_slice())
    }

    pub fn per_row(mixes: &[&AdapterMix]) -> Self {
        if mixes.iter().all(|m| m.is_empty()) {
            return StepLora::None;
        }
        StepLora::PerRow(mixes.iter().map(|m| (*m).clone()).collect())
    }

    /// The delta for module `id` on `x` (`(n_tokens, in)`, rows grouped by sequence), or `None`
    /// when no sequence has a term for this module.
    pub fn delta(&self, id: ModuleId, x: &Tensor, seq_lens: &[usize]) -> Result<Option<Tensor>> {
        match self {
            StepLora::None => Ok(None),
            StepLora::Batched(b) => match b.modules.get(id.index()).and_then(Option::as_ref) {
                Some(ModuleLora::Stacked(m)) => m.delta(x, seq_lens).map(Some),
                Some(ModuleLora::Host(m)) => {
                    let n = x.dim(0)?;
                    m.add_to_tensor(x, vec![0f32; n * m.fan_out], seq_lens).map(Some)
                }
                None => Ok(None),
            },
            StepLora::PerRow(mixes) => per_row_delta(id, mixes, x, seq_lens),
            StepLora::Training { mixes, .. } => {
                if !mixes.iter().any(|m| m.terms(id).next().is_some()) {
                    // No mask drawn for a module no term touches (the MLP of a q/k/v/o run).
                    return Ok(None);
                }
                let x = self.dropped_input(id, x)?.unwrap_or_else(|| x.clone());
                per_row_delta(id, mixes, &x, seq_lens)
            }
        }
    }
}

impl StepLora {
    /// A training step's LoRA input for module `id` under dropout (the seeded mask of this
    /// step and module); `None` without dropout.
    pub fn dropped_input(&self, id: ModuleId, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            StepLora::Training { dropout, seed, .. } if *dropout > 0.0 => {
                Ok(Some(seeded_dropout(x, *dropout, module_seed(*seed, id))?))
            }
            _ => Ok(None),
        }
    }

    /// The one plain LoRA term of module `id` in a training step whose sequences all share
    /// one mix, with the step's dropout and module `id`'s seed: what the fused training
    /// projection ([`super::train_linear`]) computes. `None` for anything else (mixes of
    /// several terms, DoRA, different mixes per sequence), which takes the composed path.
    pub fn single_training_term(
        &self,
        id: ModuleId,
    ) -> Option<(&super::weights::LoraWeights, f64, f32, u64)> {
        let StepLora::Training { mixes, dropout, seed } = self else { return None };
        let first = mixes.first()?;
        if !mixes.iter().all(|m| m.same_as(first)) {
            return None;
        }
        let mut terms = first.terms(id);
        let (w, c) = terms.next()?;
        if terms.next().is_some() || w.dora.is_some() || w.trainable_magnitude.is_some() {
            return None;
        }
        Some((w, c, *dropout, module_seed(*seed, id)))
    }

    /// A training step's output of module `id` with DoRA under dropout, as PEFT trains it:
    /// the running result is not rescaled, the base product of the dropped input `xd`
    /// (`base_d`, no bias) is: `r += (k − 1) · W xd + k · c · B(A xd)` per DoRA term.
    pub fn apply_dropped(
        &self,
        id: ModuleId,
        xd: &Tensor,
        y: Tensor,
        base_d: &Tensor,
        seq_lens: &[usize],
    ) -> Result<Tensor> {
        let StepLora::Training { mixes, .. } = self else {
            return self.apply(id, xd, y, seq_lens);
        };
        by_mix_runs(mixes, seq_lens, |mix, offset, len| {
            let xs = xd.narrow(0, offset, len)?;
            let bs = base_d.narrow(0, offset, len)?;
            let mut r = y.narrow(0, offset, len)?;
            for (w, c) in mix.terms(id) {
                let d = term_product(&xs, w, c)?;
                r = match w.dora_gains(c, xd.dtype())? {
                    Some(k) => ((r + bs.broadcast_mul(&(&k - 1.0)?)?)? + d.broadcast_mul(&k)?)?,
                    None => (r + d)?,
                };
            }
            Ok(r)
        })
    }

    /// Whether some sequence's mix has a DoRA term on `id`: its output is then not the base
    /// plus a delta, and must go through [`StepLora::apply`] before the bias is added.
    pub fn rescales(&self, id: ModuleId) -> bool {
        match self {
            StepLora::None => false,
            StepLora::Batched(b) => match b.modules.get(id.index()).and_then(Option::as_ref) {
                Some(ModuleLora::Host(h)) => h.rescales,
                Some(ModuleLora::Stacked(m)) => m.base_gain.is_some(),
                None => false,
            },
            StepLora::PerRow(mixes) | StepLora::Training { mixes, .. } => {
                mixes.iter().any(|m| m.rescales(id))
            }
        }
    }

    /// Module `id`'s output from its base output `y` (`(n, out)`, without the bias when
    /// [`StepLora::rescales`]): `y` plus the delta, with DoRA's rescaling where a mix has it.
    pub fn apply(&self, id: ModuleId, x: &Tensor, y: Tensor, seq_lens: &[usize]) -> Result<Tensor> {
        if !self.rescales(id) {
            return Ok(match self.delta(id, x, seq_lens)? {
                Some(d) => (y + d)?,
                None => y,
            });
        }
        match self {
            StepLora::Batched(b) => match b.modules.get(id.index()).and_then(Option::as_ref) {
                Some(ModuleLora::Stacked(m)) => m.apply(x, y, seq_lens),
                Some(ModuleLora::Host(m)) => {
                    let dtype = y.dtype();
                    let out = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    Ok(m.add_to_tensor(x, out, seq_lens)?.to_dtype(dtype)?)
                }
                None => Ok(y),
            },
            StepLora::PerRow(mixes) => per_row_apply(id, mixes, x, y, seq_lens),
            StepLora::Training { mixes, dropout, .. } => {
                if *dropout > 0.0 {
                    // PEFT's DoRA under dropout recomputes the base product on the dropped input.
                    return Err(super::super::ModelError::Unsupported(
                        "training a DoRA adapter with `lora_dropout` > 0".into(),
                    ));
                }
                per_row_apply(id, mixes, x, y, seq_lens)
            }
            StepLora::None => Ok(y),
        }
    }

    /// Adds module `id`'s delta into `y` (`(n, out)`, host f32) for host input rows `x`
    /// (`(n, in)`) when this step's operands are host ones; `false` when the caller must use
    /// [`StepLora::delta`] instead. `true` with `y` untouched when no sequence has a term.
    pub fn add_host(
        &self,
        id: ModuleId,
        x: &[f32],
        seq_lens: &[usize],
        y: &mut [f32],
        pool: &Pool,
    ) -> Result<bool> {
        match self {
            StepLora::None => Ok(true),
            StepLora::Batched(b) => match b.modules.get(id.index()).and_then(Option::as_ref) {
                None => Ok(true),
                Some(ModuleLora::Host(m)) => {
                    m.add_into(x, seq_lens, y, pool);
                    Ok(true)
                }
                Some(ModuleLora::Stacked(_)) => Ok(false),
            },
            _ => Ok(false),
        }
    }

    /// Whether module `id` has any term this step.
    pub fn touches(&self, id: ModuleId) -> bool {
        match self {
            StepLora::None => false,
            StepLora::Batched(b) => b.modules.get(id.index()).is_some_and(Option::is_some),
            StepLora::PerRow(mixes) | StepLora::Training { mixes, .. } => {
                mixes.iter().any(|m| m.terms(id).next().is_some())
            }
        }
    }
}

impl HostLora {
    /// `None` when no sequence has a term for `id`, or some term has no host copy (then the
    /// stacked path serves the step).
    fn build(id: ModuleId, mixes: &[&AdapterMix]) -> Option<Self> {
        let mut dims = None;
        let mut per_seq = Vec::with_capacity(mixes.len());
        for m in mixes {
            let mut terms = Vec::new();
            for (w, c) in m.terms(id) {
                dims = Some(w.dims().ok()?);
                let gain = w.dora.as_ref().map(|d| d.shared_gains(c));
                terms.push(HostTerm {
                    weights: w.host.clone()?,
                    rank: w.rank,
                    coef: c as f32,
                    gain,
                });
            }
            per_seq.push(terms);
        }
        let rescales = per_seq.iter().flatten().any(|t| t.gain.is_some());
        dims.map(|(fan_in, fan_out)| Self { per_seq, fan_in, fan_out, rescales })
    }

    /// [`HostLora::add_into`] for a tensor input `x` and host rows `y` (`n × out`), on this
    /// thread (the tensor paths have no pool; a 1-thread pool spawns none), as a tensor.
    fn add_to_tensor(&self, x: &Tensor, mut y: Vec<f32>, seq_lens: &[usize]) -> Result<Tensor> {
        let n = x.dim(0)?;
        let xs = x.to_dtype(DType::F32)?.contiguous()?;
        let Some(xh) = HostF32::of(&xs) else {
            return Err(super::super::ModelError::Generation(
                "host LoRA operands with a non-host input; this is a bug".into(),
            ));
        };
        self.add_into(xh.slice(), seq_lens, &mut y, &Pool::new(1));
        super::super::ops::host_tensor(y, (n, self.fan_out))
    }

    /// `y += Σ c · Bᵀ(A x)` per row, each sequence's rows with its own terms.
    fn add_into(&self, x: &[f32], seq_lens: &[usize], y: &mut [f32], pool: &Pool) {
        let mut runs = Vec::with_capacity(seq_lens.len());
        let mut row = 0;
        for (terms, &len) in self.per_seq.iter().zip(seq_lens) {
            if !terms.is_empty() {
                let terms = terms
                    .iter()
                    .map(|t| LoraTerm {
                        a: &t.weights.a,
                        b_t: &t.weights.b_t,
                        rank: t.rank,
                        coef: t.coef,
                        gain: t.gain.as_deref(),
                    })
                    .collect();
                runs.push(LoraRun { rows: row..row + len, terms });
            }
            row += len;
        }
        lora_batch(pool, x, self.fan_in, y, self.fan_out, &runs);
    }
}

impl StackedLora {
    fn build(id: ModuleId, mixes: &[&AdapterMix], device: &Device) -> Result<Option<Self>> {
        let terms: Vec<Vec<_>> = mixes.iter().map(|m| m.terms(id).collect()).collect();
        let rank_of = |ts: &Vec<(&super::weights::LoraWeights, f64)>| {
            ts.iter().map(|(w, _)| w.rank).sum::<usize>()
        };
        let max_rank = terms.iter().map(rank_of).max().unwrap_or(0);
        let Some((w0, _)) = terms.iter().flatten().next() else {
            return Ok(None);
        };
        let (fan_in, fan_out) = w0.dims()?;
        let rescales = terms.iter().flatten().any(|(w, _)| w.dora.is_some());
        let (mut a_rows, mut b_rows, mut coef) = (Vec::new(), Vec::new(), Vec::new());
        let mut base_gains = Vec::new();
        for ts in &terms {
            let pad = max_rank - rank_of(ts);
            // With DoRA, each term's delta is rescaled by the DoRA gains of the terms from it
            // on (its own included), the base by all of them.
            let mut suffix = vec![Vec::new(); ts.len()];
            if rescales {
                let mut after = vec![1f32; fan_out];
                for (i, (w, c)) in ts.iter().enumerate().rev() {
                    if let Some(d) = &w.dora {
                        after.iter_mut().zip(d.shared_gains(*c).iter()).for_each(|(g, k)| *g *= k);
                    }
                    suffix[i] = after.clone();
                }
                base_gains.extend_from_slice(&after);
            }
            let (mut a_parts, mut b_parts): (Vec<Tensor>, Vec<Tensor>) = ts
                .iter()
                .zip(&suffix)
                .map(|((w, _), g)| {
                    let (a_t, b_t) = w.transposes()?;
                    if !rescales {
                        return Ok((a_t, b_t));
                    }
                    let g = Tensor::from_slice(g, (1, fan_out), device)?;
                    Ok((a_t, b_t.broadcast_mul(&g)?))
                })
                .collect::<candle_core::Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            if pad > 0 {
                a_parts.push(Tensor::zeros((fan_in, pad), DType::F32, device)?);
                b_parts.push(Tensor::zeros((pad, fan_out), DType::F32, device)?);
            }
            a_rows.push(Tensor::cat(&a_parts, 1)?);
            b_rows.push(Tensor::cat(&b_parts, 0)?);
            for (w, c) in ts {
                coef.extend(std::iter::repeat_n(*c as f32, w.rank));
            }
            coef.extend(std::iter::repeat_n(0f32, pad));
        }
        let s = mixes.len();
        Ok(Some(Self {
            a_t: Tensor::stack(&a_rows, 0)?.to_dtype(DType::F32)?,
            b_t: Tensor::stack(&b_rows, 0)?.to_dtype(DType::F32)?,
            coef: Tensor::from_vec(coef, (s, 1, max_rank), device)?,
            base_gain: match rescales {
                true => Some(Tensor::from_vec(base_gains, (s, fan_out), device)?),
                false => None,
            },
        }))
    }

    /// `y ⊙ G + delta`, `G` each row's sequence's base gain (DoRA).
    fn apply(&self, x: &Tensor, y: Tensor, seq_lens: &[usize]) -> Result<Tensor> {
        let d = self.delta(x, seq_lens)?;
        let Some(g) = &self.base_gain else { return Ok((y + d)?) };
        let seq_of: Vec<u32> = seq_lens
            .iter()
            .enumerate()
            .flat_map(|(s, &len)| std::iter::repeat_n(s as u32, len))
            .collect();
        let rows = g.index_select(&Tensor::new(seq_of.as_slice(), g.device())?, 0)?;
        let dtype = y.dtype();
        let y = (y.to_dtype(DType::F32)? * rows)?;
        Ok((y + d.to_dtype(DType::F32)?)?.to_dtype(dtype)?)
    }

    /// Runs of consecutive sequences with equal token counts (all of a decode step; the
    /// decoding rows and each prompt length of a mixed step) share one batched matmul pair
    /// over a view of the stacked operands.
    fn delta(&self, x: &Tensor, seq_lens: &[usize]) -> Result<Tensor> {
        let (_, fan_in) = x.dims2()?;
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mut parts = Vec::new();
        let (mut seq, mut row) = (0, 0);
        while seq < seq_lens.len() {
            let t = seq_lens[seq];
            let run = seq_lens[seq..].iter().take_while(|&&l| l == t).count();
            let xs = x.narrow(0, row, run * t)?.reshape((run, t, fan_in))?;
            let u = xs
                .matmul(&self.a_t.narrow(0, seq, run)?)?
                .broadcast_mul(&self.coef.narrow(0, seq, run)?)?;
            let d = u.matmul(&self.b_t.narrow(0, seq, run)?)?;
            let fan_out = d.dim(D::Minus1)?;
            parts.push(d.reshape((run * t, fan_out))?);
            seq += run;
            row += run * t;
        }
        let d = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
        Ok(d.to_dtype(dtype)?)
    }
}

/// Inverted dropout with a mask from a seeded RNG (candle's own dropout is not seedable on CPU).
fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let mask = dropout_mask(x.elem_count(), p, seed);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

/// The inverted-dropout mask of `len` values (`0` or `1 / (1 − p)`) for `seed`: what both the
/// composed path and the fused training projection ([`super::train_linear`]) multiply by. A
/// small non-cryptographic generator: a training step draws ~10⁸ mask values, and the
/// cryptographic `StdRng` cost 4 % of the step.
pub(super) fn dropout_mask(len: usize, p: f32, seed: u64) -> Vec<f32> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    let threshold = (p as f64 * 4_294_967_296.0) as u64;
    (0..len).map(|_| if (rng.next_u32() as u64) < threshold { 0.0 } else { keep }).collect()
}

/// Module `id`'s dropout seed in a step seeded `seed`.
pub(super) fn module_seed(seed: u64, id: ModuleId) -> u64 {
    seed ^ (id.index() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn per_row_delta(
    id: ModuleId,
    mixes: &[AdapterMix],
    x: &Tensor,
    seq_lens: &[usize],
) -> Result<Option<Tensor>> {
    let Some(fan_out) =
        mixes.iter().flat_map(|m| m.terms(id)).next().map(|(w, _)| w.b.dim(0)).transpose()?
    else {
        return Ok(None);
    };
    let d = by_mix_runs(mixes, seq_lens, |mix, offset, len| {
        let xs = x.narrow(0, offset, len)?;
        let mut acc: Option<Tensor> = None;
        for (w, c) in mix.terms(id) {
            let d = term_product(&xs, w, c)?;
            acc = Some(match acc {
                Some(prev) => (prev + d)?,
                None => d,
            });
        }
        match acc {
            Some(d) => Ok(d),
            None => Ok(Tensor::zeros((len, fan_out), x.dtype(), x.device())?),
        }
    })?;
    Ok(Some(d))
}

/// `c · B (A x)` in `x`'s dtype.
fn term_product(x: &Tensor, w: &super::weights::LoraWeights, c: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    Ok((x.matmul(&w.a.to_dtype(dtype)?.t()?)?.matmul(&w.b.to_dtype(dtype)?.t()?)? * c)?)
}

/// `part(mix, first row, rows)` for each run of consecutive sequences with the same mix (all
/// of a training batch is one run, its rows one matmul pair), concatenated in row order.
fn by_mix_runs(
    mixes: &[AdapterMix],
    seq_lens: &[usize],
    mut part: impl FnMut(&AdapterMix, usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(mixes.len());
    let (mut offset, mut seq) = (0, 0);
    while seq < mixes.len() {
        let mix = &mixes[seq];
        let run = mixes[seq..].iter().take_while(|m| m.same_as(mix)).count();
        let len: usize = seq_lens[seq..seq + run].iter().sum();
        parts.push(part(mix, offset, len)?);
        seq += run;
        offset += len;
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The reference path with DoRA, term by term in the mix's order as PEFT's forward runs
/// them: a LoRA term adds `c · B(A x)`, a DoRA term replaces the running result `r` by
/// `k ⊙ (r + c · B(A x))`.
fn per_row_apply(
    id: ModuleId,
    mixes: &[AdapterMix],
    x: &Tensor,
    y: Tensor,
    seq_lens: &[usize],
) -> Result<Tensor> {
    by_mix_runs(mixes, seq_lens, |mix, offset, len| {
        let xs = x.narrow(0, offset, len)?;
        let mut r = y.narrow(0, offset, len)?;
        for (w, c) in mix.terms(id) {
            r = (r + term_product(&xs, w, c)?)?;
            if let Some(k) = w.dora_gains(c, x.dtype())? {
                r = r.broadcast_mul(&k)?;
            }
        }
        Ok(r)
    })
}
