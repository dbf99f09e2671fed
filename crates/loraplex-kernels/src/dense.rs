//! `y = x · Wᵀ` for dense f32 weights on the kernels' pool: output columns split into chunks,
//! each one single-threaded call of the `gemm` crate (candle's own matmul backend, with its
//! AVX-512 kernels turned on by the `x86-v4` feature). Running it on the pool instead of
//! rayon keeps every thread of a step in one place: a rayon matmul next to spinning pool
//! workers would fight them for the cores.

use super::pool::Pool;

/// Output columns per chunk: whole multiples of the micro-kernel width.
const COLS: usize = 64;

/// `y[i, j] = Σ_c x[i, c] · w[j, c]` for `x` `(n, k)`, `w` `(out, k)`, `y` `(n, out)`, all
/// row-major.
pub fn matmul_f32(pool: &Pool, x: &[f32], n: usize, k: usize, w: &[f32], out: usize, y: &mut [f32]) {
    assert!(x.len() >= n * k && w.len() >= out * k && y.len() >= n * out, "operand sizes; this is a bug");
    if n == 0 || out == 0 {
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
        // SAFETY: `x` holds `n × k`, `w` rows `col0 .. col0 + cols` hold `cols × k`, and `y`'s
        // columns `col0 .. col0 + cols` of its `n` rows are this chunk's alone (disjoint from
        // every other chunk's); strides describe exactly those row-major layouts.
        unsafe {
            gemm::gemm(
                n,
                cols,
                k,
                d.0.add(col0),
                1,
                out as isize,
                false,
                x.as_ptr(),
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
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    assert!((y[i * out + j] as f64 - want).abs() < 1e-3, "{n}x{k}x{out} at {i},{j}");
                }
            }
        }
    }
}
