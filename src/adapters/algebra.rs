//! PEFT's adapter algebra as a server operation: `add_weighted_adapter` (every
//! `combination_type`, as peft 0.22 computes it) and rank compression of one adapter by
//! truncated SVD. Inputs are PEFT folders the registry has validated; the result ([`Merged`]) is
//! a PEFT folder's content, which [`super::writer`] writes and the registry serves like any
//! other adapter.
//!
//! Per module that a source adapts (`c_i` its scaling `alpha/r` or `alpha/√r`, `w_i` its weight):
//! - `cat`: `A = [w_i c_i A_i]` stacked, `B = [B_i]` side by side: exactly `Σ w_i c_i B_i A_i`, at
//!   rank `Σ r_i` (a module fewer sources adapt is zero-padded, as PEFT writes it).
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: `A` and `B` combined
//!   separately, `A`'s with `sign(w c)·√|w c|`, `B`'s with `√|w c|` — an approximation (`B'A'` has
//!   cross terms) that needs one rank and one set of targets across the sources.
//! - `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the deltas
//!   `ΔW_i = c_i B_i A_i` combined with `w_i` (task arithmetic, TIES, DARE, magnitude pruning),
//!   then truncated to `svd_rank` by SVD: `B = U S`, `A = Vᵀ`. Without pruning the sum has rank
//!   `≤ Σ r_i`, and its SVD is taken from QR factors of the stacked `B`s and `A`s, never dense.
//!
//! TIES keeps, per element, the values whose sign is the majority's (`total`: the sign of the
//! sum; `frequency`: of the count) and averages them; DARE keeps each element with probability
//! `density` and rescales by `1/density`, drawn from `seed` (PEFT draws from torch's generator,
//! which cannot be reproduced here: the tests compare those cases in distribution). The new
//! adapter has `r = lora_alpha =` its rank (scaling 1), no rslora, and its exact module paths as
//! `target_modules`.

use super::config::{ModuleSelector, Pattern};
use super::loader::{tensor_values, CONFIG_FILE, WEIGHTS_FILE};
use super::{AdapterError, PeftConfig};
use crate::model::DecoderConfig;
use candle_core::{Device, Tensor};
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

type Mat = DMatrix<f64>;

/// Most adapters one merge combines.
pub const MAX_SOURCES: usize = 16;
/// Highest rank a merge or compression may write (`cat` sums the sources' ranks).
pub const MAX_RANK: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AlgebraError {
    /// A knob out of its range or missing for the combination asked for.
    #[error("{0}")]
    Invalid(String),
    /// Sources that cannot be combined this way (DoRA, other bases, other targets or ranks).
    #[error("{0}")]
    Incompatible(String),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

fn invalid(msg: impl Into<String>) -> AlgebraError {
    AlgebraError::Invalid(msg.into())
}

fn incompatible(msg: impl Into<String>) -> AlgebraError {
    AlgebraError::Incompatible(msg.into())
}

/// PEFT's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Combination {
    Linear,
    Cat,
    Svd,
    Ties,
    TiesSvd,
    DareLinear,
    DareTies,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

/// How elements are dropped before combining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prune {
    Keep,
    Magnitude,
    Random,
}

/// PEFT's `majority_sign_method` for TIES.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignMethod {
    #[default]
    Total,
    Frequency,
}

impl Combination {
    /// `(pruning, TIES's sign election, truncated by SVD)`.
    fn parts(self) -> (Prune, bool, bool) {
        use Combination::*;
        match self {
            Linear | Cat => (Prune::Keep, false, false),
            Svd => (Prune::Keep, false, true),
            Ties => (Prune::Magnitude, true, false),
            TiesSvd => (Prune::Magnitude, true, true),
            DareLinear => (Prune::Random, false, false),
            DareTies => (Prune::Random, true, false),
            DareLinearSvd => (Prune::Random, false, true),
            DareTiesSvd => (Prune::Random, true, true),
            MagnitudePrune => (Prune::Magnitude, false, false),
            MagnitudePruneSvd => (Prune::Magnitude, false, true),
        }
    }

    /// Whether `A` and `B` are combined separately (one rank and one set of targets needed).
    fn factor_wise(self) -> bool {
        self != Combination::Cat && !self.parts().2
    }

    pub fn name(self) -> &'static str {
        use Combination::*;
        match self {
            Linear => "linear",
            Cat => "cat",
            Svd => "svd",
            Ties => "ties",
            TiesSvd => "ties_svd",
            DareLinear => "dare_linear",
            DareTies => "dare_ties",
            DareLinearSvd => "dare_linear_svd",
            DareTiesSvd => "dare_ties_svd",
            MagnitudePrune => "magnitude_prune",
            MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }
}

/// One merge, as `add_weighted_adapter`'s arguments after the adapter names.
#[derive(Debug, Clone)]
pub struct MergeSpec {
    pub combination: Combination,
    pub weights: Vec<f64>,
    pub svd_rank: Option<usize>,
    pub svd_clamp: Option<f64>,
    pub density: Option<f64>,
    pub majority_sign_method: SignMethod,
    /// DARE's draws.
    pub seed: u64,
}

/// One module's factors: `A` (r × in), `B` (out × r) and the scaling PEFT applies.
#[derive(Debug, Clone)]
struct Factors {
    a: Mat,
    b: Mat,
    scaling: f64,
}

impl Factors {
    fn rank(&self) -> usize {
        self.a.nrows()
    }
}

/// A PEFT adapter read for the algebra: its config and its modules' factors in f64, keyed by
/// the module's position in the base model and its stored path.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub config: PeftConfig,
    modules: BTreeMap<usize, (String, Factors)>,
}

impl Source {
    /// Reads the PEFT folder `dir` for a base model of shape `cfg`. DoRA adapters are refused
    /// (a magnitude vector has no weighted combination; PEFT refuses them too).
    pub fn read(dir: &Path, name: &str, cfg: &DecoderConfig) -> Result<Self, AlgebraError> {
        let io = |source| AdapterError::Io { path: dir.display().to_string(), source };
        let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).map_err(io)?;
        let config = PeftConfig::from_json(&text)?;
        if config.use_dora {
            return Err(incompatible(format!(
                "adapter `{name}` is a DoRA adapter (`use_dora: true`): its magnitudes have no \
                 weighted combination, so it cannot be merged or compressed"
            )));
        }
        if config.touches_vocab(&super::vocab::embed_path(cfg)) {
            return Err(incompatible(format!(
                "adapter `{name}` changes the embedding or the output head (LoRA there, \
                 `modules_to_save` or trainable tokens): merging those is not supported"
            )));
        }
        let mut wanted = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (ord, id) in cfg.projections().enumerate() {
            let m = cfg.stored_module(id);
            if config.targets_module(&m.path, id.layer) && seen.insert(m.path.clone()) {
                let (r, alpha) = config.rank_alpha_module(&m.path);
                wanted.push((ord, m.path, r, alpha, cfg.proj_dims(id.target).0, m.out));
            }
        }
        let max_data: u64 = wanted
            .iter()
            .map(|(_, _, r, _, fan_in, out)| ((r * fan_in + out * r) * 8) as u64)
            .sum();
        super::header::check_file(&dir.join(WEIGHTS_FILE), max_data)?;
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).map_err(io)?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| AdapterError::Weights(format!("unreadable safetensors: {e}")))?;
        let mut modules = BTreeMap::new();
        for (ord, path, r, alpha, fan_in, out) in wanted {
            let read = |which: &str, rows: usize, cols: usize| -> Result<Mat, AdapterError> {
                let key = format!("base_model.model.{path}.lora_{which}.weight");
                let v = tensor_values(&st, &key, (rows, cols))?;
                Ok(Mat::from_row_iterator(rows, cols, v.into_iter().map(f64::from)))
            };
            let scaling = crate::model::lora::weights::scaling(alpha, r, config.use_rslora);
            let factors = Factors { a: read("A", r, fan_in)?, b: read("B", out, r)?, scaling };
            modules.insert(ord, (path, factors));
        }
        if modules.is_empty() {
            return Err(incompatible(format!(
                "adapter `{name}` adapts no module of the base model"
            )));
        }
        Ok(Self { name: name.to_string(), config, modules })
    }

    /// The rank PEFT allocates for this adapter: `r`, or the largest of its `rank_pattern`.
    fn max_rank(&self) -> usize {
        self.config.rank_pattern.iter().map(|(_, r)| *r).fold(self.config.r, usize::max)
    }
}

/// A merged or compressed adapter: the PEFT config and `(stored module path, A, B)` in f32.
pub struct Merged {
    pub config: PeftConfig,
    pub modules: Vec<(String, Tensor, Tensor)>,
    pub rank: usize,
    /// For a compression: the smallest share of `||ΔW||²` a module kept.
    pub min_energy_kept: Option<f64>,
}

/// `add_weighted_adapter(adapters, weights, combination_type, ...)` over `sources`.
pub fn merge(sources: &[Source], spec: &MergeSpec) -> Result<Merged, AlgebraError> {
    if sources.is_empty() || sources.len() > MAX_SOURCES {
        return Err(invalid(format!(
            "`adapters` must name 1 to {MAX_SOURCES} adapters, got {}",
            sources.len()
        )));
    }
    if spec.weights.len() != sources.len() {
        return Err(invalid(format!(
            "`weights` has {} entries for {} adapters",
            spec.weights.len(),
            sources.len()
        )));
    }
    if let Some(w) = spec.weights.iter().find(|w| !(**w as f32).is_finite()) {
        return Err(invalid(format!("weight `{w}` is not a finite 32-bit float")));
    }
    // PEFT: one adapter can only be combined linearly.
    let combination = if sources.len() == 1 { Combination::Linear } else { spec.combination };
    let (prune, ties, svd) = combination.parts();
    let density = match (prune, spec.density) {
        (Prune::Keep, _) => 1.0,
        (_, None) => {
            return Err(invalid(format!(
                "`combination_type: {}` needs `density` (the fraction of values kept)",
                combination.name()
            )))
        }
        (_, Some(d)) if !(0.0..=1.0).contains(&d) => {
            return Err(invalid(format!("`density` must be in [0, 1], got `{d}`")))
        }
        (Prune::Random, Some(0.0)) => {
            return Err(invalid("`density: 0` drops every value, and DARE divides by it"))
        }
        (_, Some(d)) => d,
    };
    if let Some(q) = spec.svd_clamp.filter(|q| !(0.0..=1.0).contains(q)) {
        return Err(invalid(format!("`svd_clamp` must be a quantile in [0, 1], got `{q}`")));
    }
    same_base(sources)?;
    let ranks: Vec<usize> = sources.iter().map(Source::max_rank).collect();
    let new_rank = match combination {
        Combination::Cat => ranks.iter().sum(),
        _ if svd => spec.svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
        _ => {
            if let Some(i) = ranks.iter().position(|r| *r != ranks[0]) {
                return Err(incompatible(format!(
                    "`combination_type: {}` needs adapters of one rank: `{}` has r={}, `{}` r={} \
                     (use `cat` or an `*svd` type)",
                    combination.name(),
                    sources[0].name,
                    ranks[0],
                    sources[i].name,
                    ranks[i]
                )));
            }
            ranks[0]
        }
    };
    if new_rank == 0 || new_rank > MAX_RANK {
        return Err(invalid(format!("the merged rank {new_rank} is outside 1..={MAX_RANK}")));
    }
    if combination.factor_wise() {
        same_targets(sources, combination)?;
    }
    let mut order: BTreeMap<usize, &str> = BTreeMap::new();
    for s in sources {
        for (ord, (path, _)) in &s.modules {
            order.insert(*ord, path);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut out = Vec::with_capacity(order.len());
    for (ord, path) in order {
        let present: Vec<(&Factors, f64)> = sources
            .iter()
            .zip(&spec.weights)
            .filter_map(|(s, w)| s.modules.get(&ord).map(|(_, f)| (f, *w)))
            .collect();
        let (a, b) = match combination {
            Combination::Cat => cat(&present, new_rank),
            _ if svd => {
                let (rows, cols) = (present[0].0.b.nrows(), present[0].0.a.ncols());
                if new_rank > rows.min(cols) {
                    return Err(invalid(format!(
                        "`svd_rank` {new_rank} exceeds the rank `{path}` can have ({})",
                        rows.min(cols)
                    )));
                }
                let (b, a) = if prune == Prune::Keep {
                    let stacked: Vec<(&Factors, f64)> =
                        present.iter().map(|(f, w)| (*f, w * f.scaling)).collect();
                    low_rank_svd(&stacked, new_rank).0
                } else {
                    let deltas: Vec<Mat> =
                        present.iter().map(|(f, _)| &f.b * &f.a * f.scaling).collect();
                    let weights: Vec<f64> = present.iter().map(|(_, w)| *w).collect();
                    let delta = combine(
                        &deltas,
                        &weights,
                        prune,
                        ties.then_some(spec.majority_sign_method),
                        density,
                        &mut rng,
                    );
                    dense_svd(&delta, new_rank).0
                };
                let (b, a) = match spec.svd_clamp {
                    Some(q) => clamp(b, a, q),
                    None => (b, a),
                };
                (a, b)
            }
            _ => {
                let sign = ties.then_some(spec.majority_sign_method);
                let wc: Vec<f64> = present.iter().map(|(f, w)| w * f.scaling).collect();
                // The sign goes on A only, so that B'A' keeps it.
                let wa: Vec<f64> =
                    wc.iter().map(|x| if *x >= 0.0 { x.sqrt() } else { -(-x).sqrt() }).collect();
                let wb: Vec<f64> = wc.iter().map(|x| x.abs().sqrt()).collect();
                let a_in: Vec<Mat> = present.iter().map(|(f, _)| f.a.clone()).collect();
                let b_in: Vec<Mat> = present.iter().map(|(f, _)| f.b.clone()).collect();
                let a = combine(&a_in, &wa, prune, sign, density, &mut rng);
                let b = combine(&b_in, &wb, prune, sign, density, &mut rng);
                (a, b)
            }
        };
        out.push((path.to_string(), a, b));
    }
    finish(&sources[0].config, out, new_rank, None)
}

/// Rank compression: each module's `ΔW = c B A` truncated by SVD to `rank`.
pub fn compress(source: &Source, rank: usize) -> Result<Merged, AlgebraError> {
    let have = source.max_rank();
    if rank == 0 || rank >= have {
        return Err(invalid(format!(
            "`rank` must be in 1..{have} to compress `{}` (rank {have})",
            source.name
        )));
    }
    let mut min_kept = 1.0f64;
    let mut out = Vec::new();
    for (path, f) in source.modules.values() {
        let limit = f.b.nrows().min(f.a.ncols());
        let k = rank.min(limit);
        let ((b, a), kept) = low_rank_svd(&[(f, f.scaling)], k);
        min_kept = min_kept.min(kept);
        out.push((path.clone(), a, b));
    }
    finish(&source.config, out, rank, Some(min_kept))
}

/// Sources whose configs name different base models cannot be merged. Names are compared by
/// their last path component (a hub id `org/Model` and a local `/models/Model` agree).
fn same_base(sources: &[Source]) -> Result<(), AlgebraError> {
    let stem =
        |b: &str| b.trim_end_matches('/').rsplit('/').next().unwrap_or(b).to_ascii_lowercase();
    let named: Vec<(&str, &str)> = sources
        .iter()
        .filter_map(|s| {
            s.config
                .base_model_name_or_path
                .as_deref()
                .filter(|b| !b.is_empty())
                .map(|b| (s.name.as_str(), b))
        })
        .collect();
    if let Some((other, base)) = named.iter().find(|(_, b)| stem(b) != stem(named[0].1)) {
        return Err(incompatible(format!(
            "adapters of different base models: `{}` was trained on `{}`, `{other}` on `{base}`",
            named[0].0, named[0].1
        )));
    }
    Ok(())
}

/// The factor-wise combinations add `A`s and `B`s module by module: every source must adapt
/// the same modules at the same ranks.
fn same_targets(sources: &[Source], combination: Combination) -> Result<(), AlgebraError> {
    let first = &sources[0];
    for s in &sources[1..] {
        let differ = first
            .modules
            .iter()
            .find(|(ord, _)| !s.modules.contains_key(ord))
            .map(|(_, (p, _))| (p, &first.name, &s.name))
            .or_else(|| {
                s.modules
                    .iter()
                    .find(|(ord, _)| !first.modules.contains_key(ord))
                    .map(|(_, (p, _))| (p, &s.name, &first.name))
            });
        if let Some((path, has, lacks)) = differ {
            return Err(incompatible(format!(
                "adapters with different targets: `{has}` adapts `{path}` and `{lacks}` does not; \
                 `combination_type: {}` combines A and B module by module (use `cat` or an \
                 `*svd` type)",
                combination.name()
            )));
        }
        for (ord, (path, f)) in &first.modules {
            if let Some((_, g)) = s.modules.get(ord).filter(|(_, g)| g.rank() != f.rank()) {
                return Err(incompatible(format!(
                    "`{path}` has rank {} in `{}` and {} in `{}`",
                    f.rank(),
                    first.name,
                    g.rank(),
                    s.name
                )));
            }
        }
    }
    Ok(())
}

/// torch's `sign`: 0 at 0.
fn sign_of(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// PEFT's `cat`: `w c A` stacked over `B` side by side, zero-padded to `rank`.
fn cat(present: &[(&Factors, f64)], rank: usize) -> (Mat, Mat) {
    let (rows, cols) = (present[0].0.b.nrows(), present[0].0.a.ncols());
    let mut a = Mat::zeros(rank, cols);
    let mut b = Mat::zeros(rows, rank);
    let mut at = 0;
    for (f, w) in present {
        let r = f.rank();
        a.rows_mut(at, r).copy_from(&(&f.a * (w * f.scaling)));
        b.columns_mut(at, r).copy_from(&f.b);
        at += r;
    }
    (a, b)
}

/// PEFT's `prune` + `task_arithmetic` / `disjoint_merge` over same-shaped tensors.
fn combine(
    tensors: &[Mat],
    weights: &[f64],
    prune: Prune,
    ties: Option<SignMethod>,
    density: f64,
    rng: &mut impl Rng,
) -> Mat {
    let pruned: Vec<Mat> = tensors
        .iter()
        .map(|t| match prune {
            _ if density >= 1.0 => t.clone(),
            Prune::Keep => t.clone(),
            Prune::Magnitude => magnitude_prune(t, density),
            Prune::Random => {
                t.map(|v| if rng.random::<f64>() < density { v / density } else { 0.0 })
            }
        })
        .collect();
    let (rows, cols) = tensors[0].shape();
    let Some(method) = ties else {
        let mut sum = Mat::zeros(rows, cols);
        for (p, w) in pruned.iter().zip(weights) {
            sum += p * *w;
        }
        return sum;
    };
    Mat::from_fn(rows, cols, |i, j| {
        let elected: f64 = match method {
            SignMethod::Total => pruned.iter().map(|p| p[(i, j)]).sum(),
            SignMethod::Frequency => pruned.iter().map(|p| sign_of(p[(i, j)])).sum(),
        };
        let majority = if elected >= 0.0 { 1.0 } else { -1.0 };
        let (mut sum, mut kept) = (0.0, 0.0);
        for (p, w) in pruned.iter().zip(weights) {
            if sign_of(p[(i, j)]) == majority {
                sum += w * p[(i, j)];
                kept += 1.0;
            }
        }
        sum / f64::max(kept, 1.0)
    })
}

/// Keeps the `⌊density · n⌋` values of largest magnitude.
fn magnitude_prune(t: &Mat, density: f64) -> Mat {
    let k = (density * t.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..t.len()).collect();
    idx.sort_by(|&x, &y| t[y].abs().total_cmp(&t[x].abs()));
    let mut out = Mat::zeros(t.nrows(), t.ncols());
    for &i in &idx[..k.min(idx.len())] {
        out[i] = t[i];
    }
    out
}

/// The top-`k` singular triplets of a dense matrix as `(B = U S, A = Vᵀ)`, and the share of
/// `||M||²` they hold.
fn dense_svd(m: &Mat, k: usize) -> ((Mat, Mat), f64) {
    let svd = m.clone().svd(true, true);
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        // nalgebra returns both factors when asked for them.
        return ((Mat::zeros(m.nrows(), k), Mat::zeros(k, m.ncols())), 0.0);
    };
    let s = svd.singular_values;
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
    let total: f64 = s.iter().map(|x| x * x).sum();
    let mut b = Mat::zeros(m.nrows(), k);
    let mut a = Mat::zeros(k, m.ncols());
    let mut kept = 0.0;
    for (col, &i) in order.iter().take(k).enumerate() {
        // A singular pair's sign is the library's choice; fix it (the largest |u| positive)
        // so that the result, and `svd_clamp`'s quantile, do not depend on it.
        let u_i = u.column(i);
        let top = u_i.iter().copied().fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        let flip = if top < 0.0 { -1.0 } else { 1.0 };
        b.set_column(col, &(u_i * (s[i] * flip)));
        a.set_row(col, &(v_t.row(i) * flip));
        kept += s[i] * s[i];
    }
    ((b, a), if total > 0.0 { kept / total } else { 1.0 })
}

/// The truncated SVD of `Σ c_i B_i A_i` without forming it: with `[c_i B_i] = Q_b R_b` and
/// `[A_i]ᵀ = Q_a R_a`, the sum is `Q_b (R_b R_aᵀ) Q_aᵀ`, whose SVD is the small core's.
fn low_rank_svd(terms: &[(&Factors, f64)], k: usize) -> ((Mat, Mat), f64) {
    let rows = terms[0].0.b.nrows();
    let cols = terms[0].0.a.ncols();
    let total_rank: usize = terms.iter().map(|(f, _)| f.rank()).sum();
    let mut bs = Mat::zeros(rows, total_rank);
    let mut as_t = Mat::zeros(cols, total_rank);
    let mut at = 0;
    for (f, c) in terms {
        let r = f.rank();
        bs.columns_mut(at, r).copy_from(&(&f.b * *c));
        as_t.columns_mut(at, r).copy_from(&f.a.transpose());
        at += r;
    }
    if total_rank > rows.min(cols) {
        return dense_svd(&(&bs * as_t.transpose()), k);
    }
    let (qb, rb) = bs.qr().unpack();
    let (qa, ra) = as_t.qr().unpack();
    let ((core_b, core_a), kept) = dense_svd(&(rb * ra.transpose()), k.min(total_rank));
    let mut b = Mat::zeros(rows, k);
    let mut a = Mat::zeros(k, cols);
    let got = core_b.ncols();
    b.columns_mut(0, got).copy_from(&(qb * core_b));
    a.rows_mut(0, got).copy_from(&(core_a * qa.transpose()));
    ((b, a), kept)
}

/// PEFT's `svd_clamp`: both factors clamped to `±` the `q`-quantile of all their values
/// (torch's linear interpolation). The quantile depends on the signs of the singular pairs
/// (an SVD library's choice), so a clamped merge equals PEFT's only given the same signs.
pub fn clamp(b: DMatrix<f64>, a: DMatrix<f64>, q: f64) -> (DMatrix<f64>, DMatrix<f64>) {
    let mut all: Vec<f64> = b.iter().chain(a.iter()).copied().collect();
    all.sort_by(f64::total_cmp);
    let pos = q * (all.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let top = all[lo] + (all[hi] - all[lo]) * (pos - lo as f64);
    // torch.clamp(x, min, max) = min(max(x, min), max), also when min > max.
    let f = |x: f64| x.max(-top).min(top);
    (b.map(f), a.map(f))
}

/// The merged adapter's config (the first source's, as PEFT's `replace` keeps it, with the
/// new rank at scaling 1 and the exact modules) and its f32 tensors.
fn finish(
    first: &PeftConfig,
    modules: Vec<(String, Mat, Mat)>,
    rank: usize,
    min_energy_kept: Option<f64>,
) -> Result<Merged, AlgebraError> {
    let mut rank_pattern = Vec::new();
    let mut alpha_pattern = Vec::new();
    let mut tensors = Vec::with_capacity(modules.len());
    for (path, a, b) in &modules {
        let r = a.nrows();
        if r != rank {
            rank_pattern.push((Pattern::module(path)?, r));
            alpha_pattern.push((Pattern::module(path)?, r as f64));
        }
        tensors.push((path.clone(), to_tensor(a)?, to_tensor(b)?));
    }
    let config = PeftConfig {
        r: rank,
        lora_alpha: rank as f64,
        use_rslora: false,
        use_dora: false,
        target_modules: ModuleSelector::List(modules.iter().map(|m| m.0.clone()).collect()),
        exclude_modules: None,
        rank_pattern,
        alpha_pattern,
        layers_to_transform: None,
        fan_in_fan_out: false,
        lora_dropout: first.lora_dropout,
        base_model_name_or_path: first.base_model_name_or_path.clone(),
        task_type: first.task_type.clone(),
        modules_to_save: Vec::new(),
        trainable_tokens: Vec::new(),
        ensure_weight_tying: false,
    };
    Ok(Merged { config, modules: tensors, rank, min_energy_kept })
}

fn to_tensor(m: &Mat) -> Result<Tensor, AlgebraError> {
    let data: Vec<f32> = m.transpose().iter().map(|v| *v as f32).collect();
    Tensor::from_vec(data, m.shape(), &Device::Cpu).map_err(|e| AlgebraError::Adapter(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_rank_svd_equals_the_dense_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut rnd = |r, c| Mat::from_fn(r, c, |_, _| rng.random::<f64>() - 0.5);
        let f1 = Factors { a: rnd(3, 20), b: rnd(30, 3), scaling: 2.0 };
        let f2 = Factors { a: rnd(2, 20), b: rnd(30, 2), scaling: 0.5 };
        let terms = [(&f1, 0.7), (&f2, -1.3)];
        let dense = &f1.b * &f1.a * 0.7 + &f2.b * &f2.a * -1.3;
        for k in [2, 4, 5] {
            let ((b, a), kept) = low_rank_svd(&terms, k);
            let ((db, da), dkept) = dense_svd(&dense, k);
            assert!((&b * &a - &db * &da).abs().max() < 1e-10, "rank {k}");
            assert!((kept - dkept).abs() < 1e-10);
        }
        let ((b, a), kept) = low_rank_svd(&terms, 5);
        assert!((&b * &a - &dense).abs().max() < 1e-10 && (kept - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ties_elects_the_sign_and_averages_the_agreeing_values() {
        let t1 = Mat::from_row_slice(1, 3, &[1.0, -2.0, 0.0]);
        let t2 = Mat::from_row_slice(1, 3, &[-3.0, -1.0, 2.0]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let total = combine(
            &[t1.clone(), t2.clone()],
            &[1.0, 1.0],
            Prune::Keep,
            Some(SignMethod::Total),
            1.0,
            &mut rng,
        );
        // Sums -2, -3, 2: negative, negative, positive majorities.
        assert_eq!(total.as_slice(), &[-3.0, -1.5, 2.0]);
        let freq = combine(
            &[t1, t2],
            &[1.0, 1.0],
            Prune::Keep,
            Some(SignMethod::Frequency),
            1.0,
            &mut rng,
        );
        // Counts 0 (→ positive), -2, 1.
        assert_eq!(freq.as_slice(), &[1.0, -1.5, 2.0]);
    }
}
