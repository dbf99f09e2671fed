//! `y = x · Wᵀ` for dense f32 weights on the kernels' pool: output columns split into chunks,
//! each one single-threaded call of the `gemm` crate (candle's own matmul backend, with its
//! AVX-512 kernels turned on by the `x86-v4` feature). Running it on the pool instead of
//! rayon keeps every thread of a step in one place: a rayon matmul next to spinning pool
//! workers would fight them for the cores.

use super::pool::Pool;

/// Output columns per chunk: whole multiples of the micro-kernel width.
const COLS: usize = 64;

/// Rows per `gemm` call, at most and at least. `gemm` picks its k-blocking (and so the
/// rounding of every sum) from the call's shape: up to 64 rows it takes one rule, beyond
/// another; one row goes to a separate gemv, and a few rows to other kernels (measured: below
/// 5 rows on 64-column blocks). Calling it on 8 to 64 rows makes every output row a function
/// of its own input row alone, whatever the batch: a prefix computed in one step equals, bit
/// for bit, the same prefix computed inside a longer prompt or one token at a time (what the
/// prefix cache and preemption rely on).
const ROWS: usize = 64;
const MIN_ROWS: usize = 8;

/// `y[i, j] = Σ_c x[i, c] · w[j, c]` for `x` `(n, k)`, `w` `(out, k)`, `y` `(n, out)`, all
/// row-major. Each row's result does not depend on the other rows.
pub fn matmul_f32(
    pool: &Pool,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    out: usize,
    y: &mut [f32],
) {
    assert!(
        x.len() >= n * k && w.len() >= out * k && y.len() >= n * out,
        "operand sizes; this is a bug"
    );
    if n == 0 || out == 0 {
        return;
    }
    if n < MIN_ROWS {
        // Padded with zero rows: the same kernel as any other batch (see `ROWS`).
        let mut xp = vec![0f32; MIN_ROWS * k];
        xp[..n * k].copy_from_slice(&x[..n * k]);
        let mut yp = vec![0f32; MIN_ROWS * out];
        matmul_f32(pool, &xp, MIN_ROWS, k, w, out, &mut yp);
        y[..n * out].copy_from_slice(&yp[..n * out]);
        return;
    }
    // About four chunks per thread, whole 64-column steps.
    let per = out.div_ceil(pool.threads() * 4).div_ceil(COLS).max(1) * COLS;
    let chunks = out.div_ceil(per);
    let dst = super::matmul::SharedOut(y.as_mut_ptr());
    pool.run(chunks, |c| {
        let col0 = c * per;
        let cols = per.min(out - col0);
        let d = dst;
        let mut r0 = 0;
        while r0 < n {
            // Row blocks of at most 64, the last one at least 8 (borrowing rows before it).
            let mut rows = (n - r0).min(ROWS);
            if rows < MIN_ROWS {
                r0 = n - MIN_ROWS;
                rows = MIN_ROWS;
            }
            // SAFETY: `x` holds `n × k`, `w` rows `col0 .. col0 + cols` hold `cols × k`, and
            // `y`'s columns `col0 .. col0 + cols` of its rows `r0 .. r0 + rows` (< n) are this
            // chunk's alone (disjoint from every other chunk's; a borrowed row is rewritten by
            // this same chunk with the same value); strides describe those row-major layouts.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    k,
                    d.0.add(r0 * out + col0),
                    1,
                    out as isize,
                    false,
                    x.as_ptr().add(r0 * k),
                    1,
                    k as isize,
                    w.as_ptr().add(col0 * k),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            r0 += rows;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_does_not_depend_on_the_batch() {
        let pool = Pool::new(2);
        for &(k, out) in &[(576usize, 192usize), (576, 576), (576, 1536), (1536, 576)] {
            let n = 200;
            let x: Vec<f32> =
                (0..n * k).map(|i| (((i * 7919) % 1013) as f32 / 1013.0 - 0.5) * 0.37).collect();
            let w: Vec<f32> =
                (0..out * k).map(|i| (((i * 104729) % 997) as f32 / 997.0 - 0.5) * 0.11).collect();
            let mut all = vec![0f32; n * out];
            matmul_f32(&pool, &x, n, k, &w, out, &mut all);
            for &(r0, rows) in &[
                (0usize, 1usize),
                (5, 1),
                (3, 2),
                (10, 63),
                (20, 64),
                (30, 65),
                (0, 129),
                (150, 50),
            ] {
                let mut part = vec![0f32; rows * out];
                matmul_f32(&pool, &x[r0 * k..(r0 + rows) * k], rows, k, &w, out, &mut part);
                assert!(
                    part == all[r0 * out..(r0 + rows) * out],
                    "k {k}, out {out}: rows {r0}..{} differ from the same rows in a batch of {n}",
                    r0 + rows
                );
            }
        }
    }

    #[test]
    fn equals_a_plain_product() {
        let pool = Pool::new(2);
        for &(n, k, out) in &[(1usize, 576usize, 576usize), (3, 64, 200), (17, 96, 1536)] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1).collect();
            let w: Vec<f32> = (0..out * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05).collect();
            let mut y = vec![f32::NAN; n * out];
            matmul_f32(&pool, &x, n, k, &w, out, &mut y);
            for i in 0..n {
                for j in 0..out {
                    let want: f64 = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum();
                    assert!(
                        (y[i * out + j] as f64 - want).abs() < 1e-3,
                        "{n}x{k}x{out} at {i},{j}"
                    );
                }
            }
        }
    }
}
