//! `y = x · Wᵀ` for a packed `W`: the activations quantized once, then tiles of activation rows
//! × 16 weight rows claimed by the pool's threads in chunks.
//!
//! A chunk is a run of weight groups × a run of activation rows: the group's records stay in
//! L1 while every row tile of the chunk passes over them, which is what makes batch 8 and 32
//! cost far less than 8 and 32 single rows.

use super::acts::QuantActs;
use super::packed::{tile_scalar, PackedMatrix, GROUP};
use super::pool::Pool;
use super::Isa;

/// A raw output pointer shared by the chunks, which write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every user's chunks write disjoint (row, column) ranges and the pool joins them
// before the borrow of the output ends.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// How a product is cut into chunks.
#[derive(Debug, Clone, Copy)]
struct Plan {
    groups_per_chunk: usize,
    rows_per_chunk: usize,
    group_chunks: usize,
    row_chunks: usize,
}

impl Plan {
    fn new(groups: usize, rows: usize, threads: usize) -> Plan {
        // Rows: whole tiles, at most 64 per chunk so a chunk's activations stay near L1.
        let rows_per_chunk = rows.clamp(1, 64);
        let row_chunks = rows.div_ceil(rows_per_chunk);
        // Groups: aim for ≥ 8 chunks per thread so a slow thread costs little, but keep each
        // chunk ≥ 2 groups (~14 KB of a 576-wide W4 matrix) so claiming stays cheap.
        let want = (threads * 8).div_ceil(row_chunks).max(1);
        let groups_per_chunk = groups.div_ceil(want).max(2).min(groups.max(1));
        Plan {
            groups_per_chunk,
            rows_per_chunk,
            group_chunks: groups.div_ceil(groups_per_chunk),
            row_chunks,
        }
    }
}

/// `out[i · w.rows + j] = Σ_c x[i, c] · w[j, c]` with `x` already quantized; `out` must hold
/// `x.n · w.rows` floats.
pub fn matmul(pool: &Pool, isa: Isa, w: &PackedMatrix, x: &QuantActs, out: &mut [f32]) {
    matmul_many(pool, isa, &mut [(w, out)], x);
}

/// [`matmul`] of one activation for several weights of the same width (a layer's q, k and v;
/// its gate and up) in one pool job: the activations are quantized once by the caller, the
/// threads stream the weights' groups one after another with no join between them, and each
/// output is exactly what [`matmul`] alone gives (the same tiles in the same order).
pub fn matmul_many(pool: &Pool, isa: Isa, jobs: &mut [(&PackedMatrix, &mut [f32])], x: &QuantActs) {
    for (w, out) in jobs.iter() {
        assert_eq!(x.k, w.cols, "activation width must match the weight; this is a bug");
        assert!(out.len() >= x.n * w.rows, "output too small; this is a bug");
    }
    // Groups of all weights in one index space: `starts[j]` is weight `j`'s first group.
    let mut starts = Vec::with_capacity(jobs.len() + 1);
    let mut total = 0;
    for (w, _) in jobs.iter() {
        starts.push(total);
        total += w.groups();
    }
    starts.push(total);
    let targets: Vec<(&PackedMatrix, SharedOut)> =
        jobs.iter_mut().map(|(w, out)| (*w, SharedOut(out.as_mut_ptr()))).collect();
    let plan = Plan::new(total, x.n, pool.threads());
    let n_chunks = plan.group_chunks * plan.row_chunks;
    pool.run(n_chunks, |c| {
        let (gc, rc) = (c % plan.group_chunks, c / plan.group_chunks);
        let groups = gc * plan.groups_per_chunk..((gc + 1) * plan.groups_per_chunk).min(total);
        let rows = rc * plan.rows_per_chunk..((rc + 1) * plan.rows_per_chunk).min(x.n);
        let mut j = starts.partition_point(|&s| s <= groups.start) - 1;
        for g in groups {
            while g >= starts[j + 1] {
                j += 1;
            }
            let (w, d) = targets[j];
            chunk_group(isa, w, g - starts[j], x, rows.clone(), d.0);
        }
    });
}

/// One weight group against activation rows `rows`, tile by tile.
fn chunk_group(
    isa: Isa,
    w: &PackedMatrix,
    g: usize,
    x: &QuantActs,
    rows: std::ops::Range<usize>,
    out: *mut f32,
) {
    let ld = w.rows;
    let full = (g + 1) * GROUP <= w.rows;
    let step = isa.tile_rows();
    let mut scratch = [0f32; 8 * GROUP];
    let mut i = rows.start;
    while i < rows.end {
        let m = step.min(rows.end - i);
        // A partial last group goes through scratch, so kernels always write 16 lanes.
        let (dst, dst_ld) = if full {
            // SAFETY: row `i`, column `g·16` is inside `out` (`x.n · w.rows` floats).
            (unsafe { out.add(i * ld + g * GROUP) }, ld)
        } else {
            (scratch.as_mut_ptr(), GROUP)
        };
        run_tile(isa, &Tile { w, g, x, row0: i, out: dst, ld: dst_ld }, m);
        if !full {
            let cols = w.rows - g * GROUP;
            for r in 0..m {
                // SAFETY: `cols` floats of row `i + r` from column `g·16` are inside `out`.
                let row = unsafe {
                    std::slice::from_raw_parts_mut(out.add((i + r) * ld + g * GROUP), cols)
                };
                row.copy_from_slice(&scratch[r * GROUP..r * GROUP + cols]);
            }
        }
        i += m;
    }
}

/// A tile: activation rows `row0 .. row0 + m` against weight group `g`, results to
/// `out[(i - row0) · ld + lane]` for the 16 lanes.
pub struct Tile<'a> {
    pub w: &'a PackedMatrix,
    pub g: usize,
    pub x: &'a QuantActs,
    pub row0: usize,
    pub out: *mut f32,
    pub ld: usize,
}

/// Runs tile `t` for `m` activation rows on `isa`.
fn run_tile(isa: Isa, t: &Tile<'_>, m: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni | Isa::AvxVnni | Isa::Avx2 => {
            // SAFETY: `isa` was detected on this CPU (`Isa::detect` / `Isa::available`);
            // `out` holds `m` rows of 16 floats at stride `ld` (checked by the caller);
            // `row0 + m <= x.n` and `x.k == w.cols` (asserted in `matmul`).
            unsafe {
                match isa {
                    Isa::Avx512Vnni => super::x86::tile_avx512(t, m),
                    Isa::AvxVnni => super::x86::tile_avx2(t, m, true),
                    _ => super::x86::tile_avx2(t, m, false),
                }
            }
        }
        _ => {
            // SAFETY: as above: `m` rows of 16 floats at stride `ld`.
            let out = unsafe { std::slice::from_raw_parts_mut(t.out, (m - 1) * t.ld + GROUP) };
            tile_scalar(t.w, t.g, t.x, t.row0..t.row0 + m, out, t.ld);
        }
    }
}

/// Quantizes `x` (`n × k`) into `acts`, splitting the rows over the pool when there are many.
pub fn quantize(pool: &Pool, x: &[f32], n: usize, k: usize, acts: &mut QuantActs) {
    acts.resize(n, k);
    if n < 32 {
        acts.quantize_rows(x, 0..n);
        return;
    }
    let per = n.div_ceil(pool.threads() * 4);
    let parts: Vec<std::sync::Mutex<super::acts::RowsMut<'_>>> =
        acts.parts_mut(per).into_iter().map(std::sync::Mutex::new).collect();
    pool.run(parts.len(), |c| {
        let rows = c * per..((c + 1) * per).min(n);
        // Each chunk locks only its own part: never contended.
        if let Ok(mut part) = parts[c].lock() {
            part.quantize(&x[rows.start * k..rows.end * k], k);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::RowCodes;
    use rand::{Rng, SeedableRng};

    fn random_codes(
        rows: usize,
        cols: usize,
        max_code: u8,
        shared: bool,
        seed: u64,
    ) -> Vec<RowCodes> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows)
            .map(|_| {
                let mut c = RowCodes::with_cols(cols);
                c.u.iter_mut().for_each(|u| *u = rng.random_range(0..=max_code));
                for s in 0..cols / 16 {
                    let (d, m) = if shared && s % 2 == 1 {
                        (c.d[s - 1], c.m[s - 1])
                    } else {
                        (rng.random_range(0.001..0.1f32), rng.random_range(-1.0..1.0f32))
                    };
                    c.d[s] = d;
                    c.m[s] = m;
                }
                c
            })
            .collect()
    }

    fn random_x(n: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * k).map(|i| if i % 97 == 0 { 0.0 } else { rng.random_range(-3.0..3.0f32) }).collect()
    }

    /// Rounds every scale and minimum to an f16 value, as GGUF's Q4_1 or Q8_0 store them.
    fn f16_scales(mut rows: Vec<RowCodes>) -> Vec<RowCodes> {
        for r in &mut rows {
            for v in r.d.iter_mut().chain(r.m.iter_mut()) {
                *v = half::f16::from_f32(*v).to_f32();
            }
        }
        rows
    }

    /// Every kernel this CPU runs equals the scalar reference bit for bit, for each format and
    /// scale width, SmolLM2's widths (576, 1536), odd row counts and a partial last group.
    #[test]
    fn every_kernel_equals_the_scalar_reference_exactly() {
        use crate::packed::Scales;
        let pool = Pool::new(2);
        let formats = [(15u8, true), (255, true), (255, false)];
        for (f, &(max_code, shared)) in formats.iter().enumerate() {
            for (&(out_rows, k), scales) in [(48usize, 576usize), (40, 1536), (16, 64)]
                .iter()
                .flat_map(|shape| [(shape, Scales::F32), (shape, Scales::F16)])
            {
                let codes = random_codes(out_rows, k, max_code, shared, f as u64 * 7 + k as u64);
                let codes = if scales == Scales::F16 { f16_scales(codes) } else { codes };
                let w = PackedMatrix::from_codes(&codes, k);
                assert_eq!(w.scales, scales);
                for &n in &[1usize, 3, 8, 17, 32] {
                    let x = QuantActs::quantize(&random_x(n, k, n as u64), n, k);
                    let mut want = vec![0f32; n * out_rows];
                    matmul(&pool, Isa::Scalar, &w, &x, &mut want);
                    for isa in Isa::available() {
                        let mut got = vec![f32::NAN; n * out_rows];
                        matmul(&pool, isa, &w, &x, &mut got);
                        let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{isa:?} {w:?} rows {out_rows} k {k} n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_reference_approximates_the_float_product() {
        let (rows, k, n) = (32, 576, 3);
        let w = PackedMatrix::from_codes(&random_codes(rows, k, 15, true, 1), k);
        let xf = random_x(n, k, 2);
        let x = QuantActs::quantize(&xf, n, k);
        let mut got = vec![0f32; n * rows];
        matmul(&Pool::new(1), Isa::Scalar, &w, &x, &mut got);
        let wf = w.unpack();
        for i in 0..n {
            for j in 0..rows {
                let exact: f32 = (0..k).map(|c| xf[i * k + c] * wf[j * k + c]).sum();
                let scale: f32 = (0..k).map(|c| (xf[i * k + c] * wf[j * k + c]).abs()).sum();
                assert!(
                    (got[i * rows + j] - exact).abs() <= 0.01 * scale,
                    "{i},{j}: {} vs {exact}",
                    got[i * rows + j]
                );
            }
        }
    }

    /// f16 scales are used only when exact: one scale off the f16 grid packs the whole
    /// matrix with f32 scales; both unpack to exactly the rows they were given, and the f16
    /// records are smaller.
    #[test]
    fn f16_scales_only_when_every_scale_is_exact() {
        use crate::packed::Scales;
        let k = 576;
        let exact = f16_scales(random_codes(33, k, 15, true, 5));
        let mut off = exact.clone();
        // Both halves of a 32-column block (W4 shares them); 0.1 is no f16 value.
        off[17].m[2] = 0.1;
        off[17].m[3] = 0.1;
        let (a, b) = (PackedMatrix::from_codes(&exact, k), PackedMatrix::from_codes(&off, k));
        assert_eq!((a.scales, b.scales), (Scales::F16, Scales::F32));
        assert!(
            a.size_in_bytes() * 6 == b.size_in_bytes() * 5,
            "{} vs {}",
            a.size_in_bytes(),
            b.size_in_bytes()
        );
        for (w, rows) in [(&a, &exact), (&b, &off)] {
            let got = w.unpack();
            for (r, codes) in rows.iter().enumerate() {
                for c in 0..k {
                    let want = codes.d[c / 16].mul_add(codes.u[c] as f32, codes.m[c / 16]);
                    assert_eq!(
                        got[r * k + c].to_bits(),
                        want.to_bits(),
                        "{:?} row {r} col {c}",
                        w.scales
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let (rows, k) = (64, 576);
        let w = PackedMatrix::from_codes(&random_codes(rows, k, 15, true, 3), k);
        let xf = random_x(32, k, 4);
        let pool = Pool::new(2);
        let isa = Isa::detect();
        let x = QuantActs::quantize(&xf, 32, k);
        let mut all = vec![0f32; 32 * rows];
        matmul(&pool, isa, &w, &x, &mut all);
        for i in [0usize, 5, 31] {
            let xi = QuantActs::quantize(&xf[i * k..(i + 1) * k], 1, k);
            let mut one = vec![0f32; rows];
            matmul(&pool, isa, &w, &xi, &mut one);
            assert!(
                one.iter()
                    .zip(&all[i * rows..(i + 1) * rows])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {i}"
            );
        }
    }

    /// One job over several weights gives each weight exactly what its own call gives.
    #[test]
    fn many_weights_in_one_job_equal_one_call_each() {
        let k = 576;
        let ws: Vec<PackedMatrix> = [(576usize, 15u8), (192, 15), (40, 255)]
            .iter()
            .enumerate()
            .map(|(i, &(rows, max))| {
                PackedMatrix::from_codes(&random_codes(rows, k, max, true, 20 + i as u64), k)
            })
            .collect();
        let pool = Pool::new(2);
        for &n in &[1usize, 5, 33] {
            let x = QuantActs::quantize(&random_x(n, k, 30 + n as u64), n, k);
            for isa in Isa::available().into_iter().chain([Isa::Scalar]) {
                let want: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| {
                        let mut y = vec![0f32; n * w.rows];
                        matmul(&pool, isa, w, &x, &mut y);
                        y
                    })
                    .collect();
                let mut got: Vec<Vec<f32>> =
                    ws.iter().map(|w| vec![f32::NAN; n * w.rows]).collect();
                let mut jobs: Vec<(&PackedMatrix, &mut [f32])> =
                    ws.iter().zip(got.iter_mut()).map(|(w, y)| (w, y.as_mut_slice())).collect();
                matmul_many(&pool, isa, &mut jobs, &x);
                for (a, b) in want.iter().zip(&got) {
                    assert!(
                        a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn parallel_quantization_equals_serial() {
        let (n, k) = (70, 576);
        let xf = random_x(n, k, 9);
        let serial = QuantActs::quantize(&xf, n, k);
        let mut par = QuantActs::default();
        quantize(&Pool::new(2), &xf, n, k, &mut par);
        for i in 0..n {
            for b in 0..k / 32 {
                assert_eq!(serial.block(i, b), par.block(i, b));
                assert_eq!(serial.scale(i, b).to_bits(), par.scale(i, b).to_bits());
            }
        }
    }
}
