//! x86-64 integer matmul tiles over the packed layout: AVX-512 VNNI (16 rows of weights per
//! 512-bit `vpdpbusd`, up to 8 activation rows per pass over the weights), AVX-VNNI (the same
//! with 256-bit registers) and AVX2 (`vpmaddubsw` + `vpmaddwd`). Each computes exactly what
//! [`super::packed::tile_scalar`] computes: integer sums are exact in every variant (see the
//! bounds on each), and the float steps are the same fused multiply-adds in the same order.
//!
//! The caller checks the CPU features at run time ([`super::Isa::detect`]) before calling.

use super::matmul::Tile;
use super::packed::{Kind, Scales, BLOCK};
use std::arch::x86_64::*;

/// Runs a tile of `m` rows (1..=8) with AVX-512 VNNI.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `out` must be valid for writes of
/// `(m - 1) · ld + 16` floats; `row0 + m <= x.n`; `x.k == w.cols`.
pub unsafe fn tile_avx512(t: &Tile<'_>, m: usize) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match (t.w.kind, m) {
            (Kind::W4, 1) => avx512::<1, 0>(t),
            (Kind::W4, 2) => avx512::<2, 0>(t),
            (Kind::W4, 3) => avx512::<3, 0>(t),
            (Kind::W4, 4) => avx512::<4, 0>(t),
            (Kind::W4, 5) => avx512::<5, 0>(t),
            (Kind::W4, 6) => avx512::<6, 0>(t),
            (Kind::W4, 7) => avx512::<7, 0>(t),
            (Kind::W4, _) => avx512::<8, 0>(t),
            (Kind::W8, 1) => avx512::<1, 1>(t),
            (Kind::W8, 2) => avx512::<2, 1>(t),
            (Kind::W8, 3) => avx512::<3, 1>(t),
            (Kind::W8, 4) => avx512::<4, 1>(t),
            (Kind::W8, 5) => avx512::<5, 1>(t),
            (Kind::W8, 6) => avx512::<6, 1>(t),
            (Kind::W8, 7) => avx512::<7, 1>(t),
            (Kind::W8, _) => avx512::<8, 1>(t),
            (Kind::W8S16, 1) => avx512::<1, 2>(t),
            (Kind::W8S16, 2) => avx512::<2, 2>(t),
            (Kind::W8S16, 3) => avx512::<3, 2>(t),
            (Kind::W8S16, 4) => avx512::<4, 2>(t),
            (Kind::W8S16, 5) => avx512::<5, 2>(t),
            (Kind::W8S16, 6) => avx512::<6, 2>(t),
            (Kind::W8S16, 7) => avx512::<7, 2>(t),
            (Kind::W8S16, _) => avx512::<8, 2>(t),
        }
    }
}

/// `K`: 0 = W4, 1 = W8, 2 = W8S16.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512<const M: usize, const K: u8>(t: &Tile<'_>) {
    let (kind, nb, k) = (t.w.kind, t.w.blocks(), t.x.k);
    let scales = t.w.scales;
    let (rb, sb) = (t.w.record_bytes(), scales.bytes(kind));
    let recs = t.w.group_bytes(t.g).as_ptr();
    let (q, d, s) = t.x.raw();
    let nibble = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); M];
    for b in 0..nb {
        // SAFETY: `b < nb`, so the record lies inside the group's bytes; records are 64-byte
        // aligned (whole `Line`s) for the aligned loads.
        let rec = unsafe { recs.add(b * rb) };
        let mut w = [_mm512_setzero_si512(); 8];
        // SAFETY: each load reads 64 bytes inside this record.
        unsafe {
            if K == 0 {
                for c in 0..4 {
                    let raw = _mm512_load_si512(rec.add(sb + 64 * c).cast());
                    w[c] = _mm512_and_si512(raw, nibble);
                    w[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nibble);
                }
            } else {
                for (c, wc) in w.iter_mut().enumerate() {
                    *wc = _mm512_load_si512(rec.add(sb + 64 * c).cast());
                }
            }
        }
        // Scale row `r` of this record: 16 f32 (64-byte aligned) or 16 f16 (32-byte aligned,
        // widened exactly).
        let scale_row = |r: usize| -> __m512 {
            // SAFETY: row `r` of the record's scales, inside the record, aligned as said.
            unsafe {
                let at = rec.add(scales.row_offset(r));
                match scales {
                    Scales::F16 => _mm512_cvtph_ps(_mm256_load_si256(at.cast())),
                    Scales::F32 => _mm512_load_ps(at.cast()),
                }
            }
        };
        let (d0, m0) = (scale_row(0), scale_row(1));
        let (d1, m1) = if K == 2 { (scale_row(2), scale_row(3)) } else { (d0, m0) };
        // One row's block, inlined per row index so `acc` stays in registers.
        let row_step = |i: usize, acc_i: __m512| -> __m512 {
            let row = t.row0 + i;
            // SAFETY: `row < x.n` and `b < nb` (the caller's contract), so the block's 32 codes
            // and its scale and sums are inside the activation buffers.
            let (xb, dx, sums) = unsafe {
                (
                    q.as_ptr().add(row * k + b * BLOCK).cast::<i32>(),
                    *d.get_unchecked(row * nb + b),
                    *s.get_unchecked(row * nb + b),
                )
            };
            // SAFETY: `g < 8`: four bytes inside the block.
            let xg = |g: usize| _mm512_set1_epi32(unsafe { xb.add(g).read_unaligned() });
            // Two chains of four for latency; |Σ| ≤ 32 · 255 · 127 fits i32 with room.
            let mut lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], xg(0));
            let mut hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], xg(4));
            lo = _mm512_dpbusd_epi32(lo, w[1], xg(1));
            hi = _mm512_dpbusd_epi32(hi, w[5], xg(5));
            lo = _mm512_dpbusd_epi32(lo, w[2], xg(2));
            hi = _mm512_dpbusd_epi32(hi, w[6], xg(6));
            lo = _mm512_dpbusd_epi32(lo, w[3], xg(3));
            hi = _mm512_dpbusd_epi32(hi, w[7], xg(7));
            let dx = _mm512_set1_ps(dx);
            let mut acc_i = acc_i;
            if K == 2 {
                let f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), dx);
                acc_i = _mm512_fmadd_ps(d0, f0, acc_i);
                acc_i = _mm512_fmadd_ps(m0, _mm512_set1_ps(sums[1]), acc_i);
                let f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), dx);
                acc_i = _mm512_fmadd_ps(d1, f1, acc_i);
                _mm512_fmadd_ps(m1, _mm512_set1_ps(sums[2]), acc_i)
            } else {
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), dx);
                acc_i = _mm512_fmadd_ps(d0, f, acc_i);
                _mm512_fmadd_ps(m0, _mm512_set1_ps(sums[0]), acc_i)
            }
        };
        macro_rules! unrolled {
            ($($i:literal)*) => { $( if $i < M { acc[$i] = row_step($i, acc[$i]); } )* };
        }
        unrolled!(0 1 2 3 4 5 6 7);
    }
    for (i, a) in acc.iter().enumerate() {
        // SAFETY: the caller guarantees `out` holds row `i`'s 16 floats at `i · ld`.
        unsafe { _mm512_storeu_ps(t.out.add(i * t.ld), *a) };
    }
}

/// Runs a tile of `m` rows (1..=4) with 256-bit registers: `vnni` selects AVX-VNNI's
/// `vpdpbusd`, else AVX2's `vpmaddubsw`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C (and AVX-VNNI when `vnni`); the rest as
/// [`tile_avx512`].
pub unsafe fn tile_avx2(t: &Tile<'_>, m: usize, vnni: bool) {
    // The format is a constant of each kernel (as in `avx512`), so the nibble split and the
    // scale handling are resolved at compile time, outside the row loop.
    macro_rules! by_rows {
        ($f:ident, $k:literal, $half:expr) => {
            match m {
                1 => $f::<1, $k>(t, $half),
                2 => $f::<2, $k>(t, $half),
                3 => $f::<3, $k>(t, $half),
                _ => $f::<4, $k>(t, $half),
            }
        };
    }
    // SAFETY: forwarded from this function's contract.
    unsafe {
        for half in 0..2 {
            match (vnni, t.w.kind) {
                (true, Kind::W4) => by_rows!(avx_vnni, 0, half),
                (true, Kind::W8) => by_rows!(avx_vnni, 1, half),
                (true, Kind::W8S16) => by_rows!(avx_vnni, 2, half),
                (false, Kind::W4) => by_rows!(avx2_plain, 0, half),
                (false, Kind::W8) => by_rows!(avx2_plain, 1, half),
                (false, Kind::W8S16) => by_rows!(avx2_plain, 2, half),
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_plain<const M: usize, const K: u8>(t: &Tile<'_>, half: usize) {
    // SAFETY: the features `avx2` needs are enabled on this function.
    unsafe { avx2::<M, K, false>(t, half) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn avx_vnni<const M: usize, const K: u8>(t: &Tile<'_>, half: usize) {
    // SAFETY: the features `avx2::<_, _, true>` needs are enabled on this function.
    unsafe { avx2::<M, K, true>(t, half) }
}

/// `Σ_g u_g · x_g` over eight 4-code groups for 8 rows, with codes below 16.
#[inline(always)]
unsafe fn dot8_u4(w: &[__m256i; 8], xg: impl Fn(usize) -> __m256i) -> __m256i {
    // SAFETY: only ever inlined into a `#[target_feature]` function that enables every
    // feature these intrinsics need (AVX2 + FMA, and AVX-VNNI for the `vnni` helpers);
    // loads stay inside the records and activation blocks the caller passes.
    unsafe {
        // Each `vpmaddubsw` lane is ≤ 2 · 15 · 127 = 3810; eight of them sum to ≤ 30480 < 2¹⁵.
        let mut acc = _mm256_maddubs_epi16(w[0], xg(0));
        for (g, wg) in w.iter().enumerate().skip(1) {
            acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(*wg, xg(g)));
        }
        _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
    }
}

#[inline(always)]
unsafe fn dot8_vnni(w: &[__m256i; 8], xg: impl Fn(usize) -> __m256i) -> __m256i {
    // SAFETY: only ever inlined into a `#[target_feature]` function that enables every
    // feature these intrinsics need (AVX2 + FMA, and AVX-VNNI for the `vnni` helpers);
    // loads stay inside the records and activation blocks the caller passes.
    unsafe {
        let mut lo = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[0], xg(0));
        let mut hi = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[4], xg(4));
        for g in 1..4 {
            lo = _mm256_dpbusd_avx_epi32(lo, w[g], xg(g));
            hi = _mm256_dpbusd_avx_epi32(hi, w[g + 4], xg(g + 4));
        }
        _mm256_add_epi32(lo, hi)
    }
}

/// Half `half` (rows 8·half .. 8·half + 8 of the group) of a tile; `K` as in `avx512`
/// (0 = W4, 1 = W8, 2 = W8S16). Inlined into a wrapper whose target features match `VNNI`, so
/// the intrinsics inline with them.
#[inline(always)]
unsafe fn avx2<const M: usize, const K: u8, const VNNI: bool>(t: &Tile<'_>, half: usize) {
    // SAFETY: only ever inlined into a `#[target_feature]` function that enables every
    // feature these intrinsics need (AVX2 + FMA + F16C, and AVX-VNNI for the `vnni` helpers);
    // loads stay inside the records and activation blocks the caller passes.
    unsafe {
        let (kind, nb, k) = (t.w.kind, t.w.blocks(), t.x.k);
        let scales = t.w.scales;
        let (rb, sb) = (t.w.record_bytes(), scales.bytes(kind));
        let recs = t.w.group_bytes(t.g).as_ptr();
        let (q, d, s) = t.x.raw();
        let nibble = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); M];
        let lane0 = 32 * half; // byte offset of this half inside each 64-byte row of the record
        for b in 0..nb {
            // Bound: `b < nb`: the record is inside the group's bytes.
            let rec = recs.add(b * rb);
            // Bound: 32 bytes inside chunk `c` of this record, 32-byte aligned.
            let chunk = |c: usize| _mm256_load_si256(rec.add(sb + 64 * c + lane0).cast());
            // The codes, split once per block for every row of the tile.
            let mut w = [_mm256_setzero_si256(); 8];
            if K == 0 {
                for c in 0..4 {
                    let raw = chunk(c);
                    w[c] = _mm256_and_si256(raw, nibble);
                    w[c + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
                }
            } else {
                for (c, wc) in w.iter_mut().enumerate() {
                    *wc = chunk(c);
                }
            }
            // Bound: this half's 8 scales of row `r`, inside the record: f32 (32-byte
            // aligned) or f16 (16-byte aligned, widened exactly by F16C).
            let scale_row = |r: usize| {
                let at = rec.add(scales.offset(r, 8 * half));
                match scales {
                    Scales::F16 => _mm256_cvtph_ps(_mm_load_si128(at.cast())),
                    Scales::F32 => _mm256_load_ps(at.cast()),
                }
            };
            let (d0, m0) = (scale_row(0), scale_row(1));
            let (d1, m1) = if K == 2 { (scale_row(2), scale_row(3)) } else { (d0, m0) };
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let row = t.row0 + i;
                // Bound: `row < x.n` and `b < nb`: the block's 32 codes, its scale and sums.
                let xb = q.as_ptr().add(row * k + b * BLOCK).cast::<i32>();
                let xg = |g: usize| _mm256_set1_epi32(xb.add(g).read_unaligned());
                let (lo, hi) = if K == 0 {
                    // AVX-VNNI is present when `VNNI` (the caller's contract).
                    let all = if VNNI { dot8_vnni(&w, xg) } else { dot8_u4(&w, xg) };
                    (all, _mm256_setzero_si256())
                } else if VNNI {
                    // Split at column 16 for the W8S16 halves.
                    (dot4_vnni(&w[..4], &xg, 0), dot4_vnni(&w[4..], &xg, 4))
                } else {
                    // 8-bit codes overflow `vpmaddubsw`'s i16 pairs, so split each code into
                    // nibbles: u = 16·h + l, each a 4-bit dot product (bounds as in dot8_u4).
                    (split_dot4(&w[..4], nibble, &xg, 0), split_dot4(&w[4..], nibble, &xg, 4))
                };
                let dx = _mm256_set1_ps(*d.get_unchecked(row * nb + b));
                let sums = *s.get_unchecked(row * nb + b);
                if K == 2 {
                    let f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(lo), dx);
                    *acc_i = _mm256_fmadd_ps(d0, f0, *acc_i);
                    *acc_i = _mm256_fmadd_ps(m0, _mm256_set1_ps(sums[1]), *acc_i);
                    let f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(hi), dx);
                    *acc_i = _mm256_fmadd_ps(d1, f1, *acc_i);
                    *acc_i = _mm256_fmadd_ps(m1, _mm256_set1_ps(sums[2]), *acc_i);
                } else {
                    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), dx);
                    *acc_i = _mm256_fmadd_ps(d0, f, *acc_i);
                    *acc_i = _mm256_fmadd_ps(m0, _mm256_set1_ps(sums[0]), *acc_i);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            // Bound: the caller guarantees 16 writable floats per row; this half is 8 of them.
            _mm256_storeu_ps(t.out.add(i * t.ld + 8 * half), *a);
        }
    }
}

#[inline(always)]
unsafe fn dot4_vnni(w: &[__m256i], xg: &impl Fn(usize) -> __m256i, g0: usize) -> __m256i {
    // SAFETY: only ever inlined into a `#[target_feature]` function that enables every
    // feature these intrinsics need (AVX2 + FMA, and AVX-VNNI for the `vnni` helpers);
    // loads stay inside the records and activation blocks the caller passes.
    unsafe {
        let mut acc = _mm256_setzero_si256();
        for (j, wj) in w.iter().enumerate() {
            acc = _mm256_dpbusd_avx_epi32(acc, *wj, xg(g0 + j));
        }
        acc
    }
}

/// Four 8-bit code groups as two nibble dot products: `16 · Σ h·x + Σ l·x`. The split is
/// redone per row: holding both halves of eight chunks for the tile spills registers and
/// measured 1.5× slower.
#[inline(always)]
unsafe fn split_dot4(
    w: &[__m256i],
    nibble: __m256i,
    xg: &impl Fn(usize) -> __m256i,
    g0: usize,
) -> __m256i {
    // SAFETY: only ever inlined into a `#[target_feature]` function that enables every
    // feature these intrinsics need (AVX2 + FMA, and AVX-VNNI for the `vnni` helpers);
    // loads stay inside the records and activation blocks the caller passes.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for (j, wj) in w.iter().enumerate() {
            let x = xg(g0 + j);
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(*wj, nibble), x));
            hi = _mm256_add_epi16(
                hi,
                _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16::<4>(*wj), nibble), x),
            );
        }
        let lo = _mm256_madd_epi16(lo, ones);
        let hi = _mm256_madd_epi16(hi, ones);
        _mm256_add_epi32(lo, _mm256_slli_epi32::<4>(hi))
    }
}

/// [`super::acts`]'s block quantization with AVX-512: the same exact operations on each value
/// (abs, max, one multiply by `1 / dx`, the `1.5 · 2²³` rounding, clamping), so the codes,
/// scales and sums equal the portable version's for finite inputs.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `x.len()` must be a multiple of 32, with `q`, `d`, `s`
/// sized for its blocks.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_blocks_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [[f32; 3]]) {
    let magic = _mm512_set1_ps(12_582_912.0);
    let (lo_lim, hi_lim) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    for (blk, ((db, sb), qb)) in
        d.iter_mut().zip(s.iter_mut()).zip(q.chunks_exact_mut(32)).enumerate()
    {
        let v = &x[blk * 32..blk * 32 + 32];
        // SAFETY: `v` has 32 floats: two unaligned 16-float loads.
        let (a, b) = unsafe { (_mm512_loadu_ps(v.as_ptr()), _mm512_loadu_ps(v.as_ptr().add(16))) };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let dx = amax / 127.0;
        let id = _mm512_set1_ps(if dx > 0.0 { 1.0 / dx } else { 0.0 });
        let round = |t: __m512| {
            let r = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(t, id), magic), magic);
            _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo_lim), hi_lim))
        };
        let (qa, qb32) = (round(a), round(b));
        let (lo, hi) = (_mm512_reduce_add_epi32(qa), _mm512_reduce_add_epi32(qb32));
        // SAFETY: `qb` is this block's 32 codes: two 16-byte stores.
        unsafe {
            _mm_storeu_si128(qb.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128(qb.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(qb32));
        }
        *db = dx;
        *sb = [dx * (lo + hi) as f32, dx * lo as f32, dx * hi as f32];
    }
}

/// [`super::fused`]'s LoRA rank group with AVX-512: `y += c · Σ_r (a_r · x) b_r` for `r < R`,
/// `a` `(R, in)` and `b` `(R, out)` row-major. `A`'s rows stream against one pass over `x`
/// (R independent chains), then `y` is read and written once per 16 columns for all `R` rows
/// of `Bᵀ`. Tails use masked loads and stores.
///
/// # Safety
/// The CPU must have AVX-512 F; `a.len() >= R · x.len()` and `b.len() >= R · y.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn lora_group_avx512<const R: usize>(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    coef: f32,
    y: &mut [f32],
) {
    let (fan_in, fan_out) = (x.len(), y.len());
    let (xp, ap, bp, yp) = (x.as_ptr(), a.as_ptr(), b.as_ptr(), y.as_mut_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    let mut c = 0;
    while c < fan_in {
        let mask: __mmask16 = if fan_in - c >= 16 { 0xFFFF } else { (1u16 << (fan_in - c)) - 1 };
        // SAFETY: lanes under `mask` are inside `x` (and row `r` of `a`, which holds `R` rows
        // of `fan_in`); masked-off lanes are not read.
        unsafe {
            let xv = _mm512_maskz_loadu_ps(mask, xp.add(c));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                *acc_r = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(mask, ap.add(r * fan_in + c)),
                    xv,
                    *acc_r,
                );
            }
        }
        c += 16;
    }
    let mut u = [_mm512_setzero_ps(); R];
    for r in 0..R {
        u[r] = _mm512_set1_ps(_mm512_reduce_add_ps(acc[r]) * coef);
    }
    let mut c = 0;
    while c < fan_out {
        let mask: __mmask16 = if fan_out - c >= 16 { 0xFFFF } else { (1u16 << (fan_out - c)) - 1 };
        // SAFETY: lanes under `mask` are inside `y` and row `r` of `b` (`R` rows of `fan_out`).
        unsafe {
            let mut yv = _mm512_maskz_loadu_ps(mask, yp.add(c));
            for (r, ur) in u.iter().enumerate() {
                yv = _mm512_fmadd_ps(*ur, _mm512_maskz_loadu_ps(mask, bp.add(r * fan_out + c)), yv);
            }
            _mm512_mask_storeu_ps(yp.add(c), mask, yv);
        }
        c += 16;
    }
}
