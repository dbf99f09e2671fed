//! DoRA (weight-decomposed LoRA) as PEFT's unmerged forward computes it, per targeted module:
//! for an adapter term with coefficient `c = s · alpha / r`, `k = m / ||W + c·B A||` per output
//! row (the norm detached, over the row's inputs), and the running result `r` of the module
//! (the base product and the mix's earlier terms, bias left out) becomes `k ⊙ (r + c·B A x)`.
//! So a DoRA term rescales what came before it: a mix's order matters, and at `s = 0` the
//! term still applies `m / ||W||`.
//!
//! The norms are never materialised per request: `||w_j + c u_j||² = ||w_j||² + 2c w_j·u_j +
//! c² ||u_j||²` with `u_j` row `j` of `B A`, so three per-row products computed once at load
//! (`w_j·u_j = b_j · (W Aᵀ)_j`, `||u_j||² = b_j (A Aᵀ) b_jᵀ`) give the gains for any scale in
//! one pass over the rows.

use candle_core::{DType, Tensor};
use std::sync::{Arc, Mutex};

/// Coefficients whose gains a module keeps (the scales its requests use most recently).
const GAIN_MEMO: usize = 4;

/// A coefficient's bits and its gains.
type MemoEntry = (u64, Arc<[f32]>);

/// One DoRA module's magnitude and the row products its norms are assembled from, each of the
/// module's `out` rows. Immutable once built, like the adapter holding it.
#[derive(Debug, Clone)]
pub struct DoraRows {
    /// PEFT's `lora_magnitude_vector` (`m`).
    pub magnitude: Arc<[f32]>,
    /// `||w_j||²`, `w_j · u_j`, `||u_j||²` per row (f64: the sum cancels for negative `c`).
    w_sq: Arc<[f64]>,
    w_dot_u: Arc<[f64]>,
    u_sq: Arc<[f64]>,
    /// The gains of the last few coefficients (a memo of [`DoraRows::gains`], newest last):
    /// a batch composition then costs reference counts, not a pass over the rows.
    memo: Arc<Mutex<Vec<MemoEntry>>>,
}

impl DoraRows {
    /// The rows of a module with base weight `w` `(out, in)`, `A` `(r, in)`, `B` `(out, r)`
    /// (any float dtype and device) and magnitude `m` (`out` values).
    pub fn new(
        magnitude: Vec<f32>,
        w: &Tensor,
        a: &Tensor,
        b: &Tensor,
    ) -> candle_core::Result<Self> {
        let cpu = candle_core::Device::Cpu;
        let f32s = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F32);
        let (w, a, b) = (f32s(w)?, f32s(a)?, f32s(b)?);
        let (out, fan_in) = w.dims2()?;
        let rank = a.dim(0)?;
        if magnitude.len() != out || b.dims2()? != (out, rank) || a.dim(1)? != fan_in {
            candle_core::bail!("DoRA rows: shapes of W, A, B and the magnitude disagree");
        }
        let wa = w.matmul(&a.t()?)?.to_vec2::<f32>()?;
        let (w, a, b) = (w.to_vec2::<f32>()?, a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        let gram: Vec<Vec<f64>> =
            (0..rank).map(|i| (0..rank).map(|k| dot64(&a[i], &a[k])).collect()).collect();
        let w_sq = w.iter().map(|row| dot64(row, row)).collect();
        let w_dot_u = b.iter().zip(&wa).map(|(bj, waj)| dot64(bj, waj)).collect();
        let u_sq = b
            .iter()
            .map(|bj| {
                (0..rank)
                    .map(|i| {
                        bj[i] as f64 * (0..rank).map(|k| gram[i][k] * bj[k] as f64).sum::<f64>()
                    })
                    .sum()
            })
            .collect();
        Ok(Self { magnitude: magnitude.into(), w_sq, w_dot_u, u_sq, memo: Default::default() })
    }

    /// Rows of the module.
    pub fn len(&self) -> usize {
        self.magnitude.len()
    }

    pub fn is_empty(&self) -> bool {
        self.magnitude.is_empty()
    }

    /// `||W + c·B A||` per row.
    pub fn norms(&self, c: f64) -> Vec<f64> {
        (0..self.len())
            .map(|j| {
                (self.w_sq[j] + c * (2.0 * self.w_dot_u[j] + c * self.u_sq[j])).max(0.0).sqrt()
            })
            .collect()
    }

    /// `k = m / ||W + c·B A||` per row: the factor a DoRA term at coefficient `c` rescales
    /// its module's running result (with the term added) by.
    pub fn gains(&self, c: f64) -> Vec<f32> {
        self.norms(c)
            .iter()
            .zip(self.magnitude.iter())
            .map(|(n, &m)| (m as f64 / n) as f32)
            .collect()
    }

    /// [`DoraRows::gains`] through the memo of the last [`GAIN_MEMO`] coefficients.
    pub fn shared_gains(&self, c: f64) -> Arc<[f32]> {
        let key = c.to_bits();
        // A poisoned memo only loses its entries: the gains are recomputed.
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = memo.iter().position(|(k, _)| *k == key) {
            let hit = memo.remove(i);
            memo.push(hit.clone());
            return hit.1;
        }
        let gains: Arc<[f32]> = self.gains(c).into();
        if memo.len() == GAIN_MEMO {
            memo.remove(0);
        }
        memo.push((key, gains.clone()));
        gains
    }

    /// Bytes kept resident: the magnitude (f32), the three row products (f64) and the memo's
    /// gains at its fullest (f32).
    pub fn resident_bytes(&self) -> usize {
        self.len() * (4 + 3 * 8 + GAIN_MEMO * 4)
    }
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The assembled norms equal the norms of the materialised `W + c·B A`, for scales of
    /// either sign and zero.
    #[test]
    fn assembled_norms_equal_materialised_ones() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (12, 20), &dev).unwrap();
        let a = Tensor::randn(0f32, 0.5, (3, 20), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, (12, 3), &dev).unwrap();
        let rows = DoraRows::new(vec![1.0; 12], &w, &a, &b).unwrap();
        for c in [0.0, 0.5, 2.0, -1.3] {
            let full = (&w + (b.matmul(&a).unwrap() * c).unwrap()).unwrap();
            let want: Vec<f32> =
                full.sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1().unwrap();
            for (got, want) in rows.norms(c).iter().zip(&want) {
                assert!((*got as f32 - want).abs() <= 1e-5 * want, "c {c}: {got} vs {want}");
            }
        }
    }
}
