//! The host's memory read bandwidth, measured the way a decode step reads its weights: every
//! pool thread streams its own contiguous share of a buffer far larger than the last-level
//! cache, once per pass. Batch-1 decode reads each weight byte once per token, so this rate
//! bounds its tokens/s (`bytes per token / bandwidth`); `examples/step_times` reports the
//! fraction of it that decode reaches.
//!
//! Safe code only: the sum is written so the compiler vectorises it, and its result is kept through `black_box` so no pass is optimised away.

use crate::Pool;
use std::hint::black_box;
use std::time::Instant;

/// One measurement: bytes read per second, best pass and median pass.
#[derive(Debug, Clone, Copy)]
pub struct Bandwidth {
    /// Threads that read (the pool's size).
    pub threads: usize,
    /// Bytes of the buffer each pass reads.
    pub bytes: usize,
    /// Fastest pass, bytes per second.
    pub best: f64,
    /// Median pass, bytes per second.
    pub median: f64,
}

/// Streams a `bytes`-byte buffer `passes` times on every thread of `pool` (each thread its
/// own 64 KiB-aligned slices, claimed as the packed matmul claims its chunks) and returns the
/// rates. The buffer is written once first, so its pages are mapped and not shared zero pages.
pub fn read_bandwidth(pool: &Pool, bytes: usize, passes: usize) -> Bandwidth {
    const CHUNK: usize = 64 * 1024 / 8;
    let words = (bytes / 8).max(CHUNK);
    let buf: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let n_chunks = words.div_ceil(CHUNK);
    let mut rates: Vec<f64> = (0..passes.max(1))
        .map(|_| {
            let t = Instant::now();
            pool.run(n_chunks, |c| {
                let lo = c * CHUNK;
                let slice = &buf[lo..(lo + CHUNK).min(words)];
                black_box(sum_lanes(slice));
            });
            (words * 8) as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    Bandwidth {
        threads: pool.threads(),
        bytes: words * 8,
        best: rates[rates.len() - 1],
        median: rates[rates.len() / 2],
    }
}

multiversion! {
    /// A wrapping sum: one reduction the loop vectoriser widens and interleaves by itself
    /// (hand-split accumulators defeated it and ran at a tenth of the speed).
    fn sum_lanes(s: &[u64]) -> u64 {
        s.iter().fold(0u64, |a, &b| a.wrapping_add(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_matches_plain_fold() {
        let v: Vec<u64> = (0..1003u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let mut want = 0u64;
        for x in &v {
            want = want.wrapping_add(*x);
        }
        assert_eq!(sum_lanes(&v), want);
    }

    #[test]
    fn reports_a_positive_rate_for_the_whole_buffer() {
        let pool = Pool::new(2);
        let b = read_bandwidth(&pool, 4 << 20, 3);
        assert_eq!(b.bytes, 4 << 20);
        assert_eq!(b.threads, 2);
        assert!(b.best >= b.median && b.median > 0.0);
    }
}
