//! Activations quantized once per matmul input: 8-bit codes per 32 values with an f32 scale,
//! plus the scaled code sums the weights' minimums multiply (whole block and each half).
//!
//! Rounding is to nearest, ties to even, by the `1.5 · 2²³` trick: plain float additions,
//! identical on every machine and vectorisable without SSE4.1, so all callers see exactly the
//! same codes.

use super::packed::BLOCK;

/// `n` rows of `k` activations in 8-bit blocks.
#[derive(Debug, Clone, Default)]
pub struct QuantActs {
    pub n: usize,
    pub k: usize,
    q: Vec<i8>,
    /// Per (row, block): the scale `dx`.
    d: Vec<f32>,
    /// Per (row, block): `dx · Σq` over the block, its first half and its second half.
    s: Vec<[f32; 3]>,
}

const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds |v| < 2^22 to an integer, ties to even

impl QuantActs {
    /// Quantizes `x` (`n` rows of `k`, row-major; `k` a multiple of 32).
    pub fn quantize(x: &[f32], n: usize, k: usize) -> Self {
        let mut out = Self::default();
        out.resize(n, k);
        out.quantize_rows(x, 0..n);
        out
    }

    /// Sizes the buffers for `n × k` (keeps their allocations).
    pub fn resize(&mut self, n: usize, k: usize) {
        assert!(k.is_multiple_of(BLOCK), "activation width must be whole 32-blocks; this is a bug");
        let nb = k / BLOCK;
        self.n = n;
        self.k = k;
        self.q.resize(n * k, 0);
        self.d.resize(n * nb, 0.0);
        self.s.resize(n * nb, [0.0; 3]);
    }

    /// Quantizes rows `rows` of `x` into this buffer (sized by [`Self::resize`]).
    pub fn quantize_rows(&mut self, x: &[f32], rows: std::ops::Range<usize>) {
        let (k, nb) = (self.k, self.k / BLOCK);
        let mut part = RowsMut {
            q: &mut self.q[rows.start * k..rows.end * k],
            d: &mut self.d[rows.start * nb..rows.end * nb],
            s: &mut self.s[rows.start * nb..rows.end * nb],
        };
        part.quantize(&x[rows.start * k..rows.end * k], k);
    }

    /// Disjoint views of `per` rows each, for quantizing on several threads.
    pub fn parts_mut(&mut self, per: usize) -> Vec<RowsMut<'_>> {
        let (k, nb) = (self.k, self.k / BLOCK);
        self.q
            .chunks_mut(per * k)
            .zip(self.d.chunks_mut(per * nb))
            .zip(self.s.chunks_mut(per * nb))
            .map(|((q, d), s)| RowsMut { q, d, s })
            .collect()
    }

    pub fn nb(&self) -> usize {
        self.k / BLOCK
    }

    /// The 32 codes of row `i`, block `b`.
    pub fn block(&self, i: usize, b: usize) -> &[i8] {
        let at = i * self.k + b * BLOCK;
        &self.q[at..at + BLOCK]
    }

    pub fn scale(&self, i: usize, b: usize) -> f32 {
        self.d[i * self.nb() + b]
    }

    pub fn sums(&self, i: usize, b: usize) -> [f32; 3] {
        self.s[i * self.nb() + b]
    }

    /// Raw views for the SIMD kernels: codes, scales and sums, row-major.
    pub fn raw(&self) -> (&[i8], &[f32], &[[f32; 3]]) {
        (&self.q, &self.d, &self.s)
    }
}

/// A run of rows of a [`QuantActs`] being written.
pub struct RowsMut<'a> {
    q: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [[f32; 3]],
}

impl RowsMut<'_> {
    /// Quantizes `x` (this part's rows, `k` wide) into the part.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd_level() == 2 {
            // SAFETY: AVX-512 F/BW detected; the part's buffers are sized for `x`'s blocks.
            unsafe { crate::x86::quantize_blocks_avx512(x, self.q, self.d, self.s) };
            return;
        }
        quantize_blocks(x, self.q, self.d, self.s);
        debug_assert_eq!(x.len() / k * (k / BLOCK), self.d.len());
    }
}

multiversion! {
    /// Every 32-block of `x`: codes `q = rne(x / dx)` with `dx = max|x| / 127`, the scale and
    /// the scaled sums. Only exact operations on each value (abs, compare, one multiply, the
    /// rounding additions), written as selects so each compiled version vectorises them and
    /// all give the same codes for finite inputs.
    fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [[f32; 3]]) {
        for (((v, qb), db), sb) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d.iter_mut()).zip(s.iter_mut()) {
            let mut m = [0f32; 16];
            for j in 0..16 {
                let (a, b) = (v[j].abs(), v[j + 16].abs());
                m[j] = if a > b { a } else { b };
            }
            let mut w = 8;
            while w > 0 {
                for j in 0..w {
                    m[j] = if m[j] > m[j + w] { m[j] } else { m[j + w] };
                }
                w /= 2;
            }
            let dx = m[0] / 127.0;
            let id = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            let mut codes = [0i32; BLOCK];
            for j in 0..BLOCK {
                let r = (v[j] * id + MAGIC) - MAGIC;
                let r = r.clamp(-127.0, 127.0);
                codes[j] = r as i32;
            }
            let (mut lo, mut hi) = (0i32, 0i32);
            for j in 0..16 {
                lo += codes[j];
                hi += codes[j + 16];
            }
            for j in 0..BLOCK {
                qb[j] = codes[j] as i8;
            }
            *db = dx;
            *sb = [dx * (lo + hi) as f32, dx * lo as f32, dx * hi as f32];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simd_quantization_equals_the_portable_one() {
        let x: Vec<f32> = (0..576 * 3)
            .map(|i| {
                ((i * 7919 % 1009) as f32 - 504.5) * 0.0137 * if i % 64 < 32 { 1.0 } else { 40.0 }
            })
            .collect();
        let nb = x.len() / 32;
        let (mut q1, mut d1, mut s1) = (vec![0i8; x.len()], vec![0f32; nb], vec![[0f32; 3]; nb]);
        quantize_blocks(&x, &mut q1, &mut d1, &mut s1);
        let mut acts = QuantActs::default();
        acts.resize(3, 576);
        acts.quantize_rows(&x, 0..3);
        let (q2, d2, s2) = acts.raw();
        assert_eq!(q1, q2);
        assert_eq!(d1, d2);
        assert_eq!(s1, s2);
    }

    #[test]
    fn codes_round_to_nearest_and_reconstruct_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 53 % 61) as f32 - 30.0) * 0.173).collect();
        let a = QuantActs::quantize(&x, 2, 32);
        for i in 0..2 {
            let v = &x[i * 32..(i + 1) * 32];
            let (d, q) = (a.scale(i, 0), a.block(i, 0));
            assert!(q.iter().any(|&c| c.abs() == 127));
            for (j, &xv) in v.iter().enumerate() {
                assert!((q[j] as f32 * d - xv).abs() <= d * 0.5 + 1e-6);
            }
            let s: i32 = q.iter().map(|&c| c as i32).sum();
            assert_eq!(a.sums(i, 0)[0], d * s as f32);
        }
    }

    #[test]
    fn a_zero_block_has_zero_scale_and_codes() {
        let a = QuantActs::quantize(&[0.0; 32], 1, 32);
        assert_eq!(a.scale(0, 0), 0.0);
        assert!(a.block(0, 0).iter().all(|&c| c == 0));
    }

    #[test]
    fn ties_round_to_even() {
        // dx = 127 / 127 = 1, so codes are the values rounded: 2.5 → 2, 3.5 → 4, -2.5 → -2.
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = 3.5;
        x[3] = -2.5;
        let a = QuantActs::quantize(&x, 1, 32);
        assert_eq!(&a.block(0, 0)[..4], &[127, 2, 4, -2]);
    }
}
