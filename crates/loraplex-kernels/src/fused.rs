//! Fused f32 kernels for what a step does between matmuls: RMS-norm (with the residual add
//! before it), rotary embedding, SiLU·mul, the LoRA delta `Σ c · B(A x)` per row (with DoRA's
//! per-row rescaling between terms), and attention
//! of each sequence's new queries over its token-major KV cache.
//!
//! Each kernel is plain Rust compiled three times ([`multiversion!`]): for AVX-512, for
//! AVX2 + FMA, and for the baseline, picked at run time; the model's composed candle ops are
//! their references (`tests/fused_ops.rs`). Every row is computed by the same code whatever
//! the batch, so results are batch invariant.

use super::pool::Pool;

/// Lanes of the accumulators the reductions keep (one 512-bit register).
const L: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let (ac, ar) = a.as_chunks::<L>();
    let (bc, br) = b.as_chunks::<L>();
    for (x, y) in ac.iter().zip(bc) {
        for j in 0..L {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut s = hsum(&acc);
    for (x, y) in ar.iter().zip(br) {
        s = x.mul_add(*y, s);
    }
    s
}

#[inline(always)]
fn hsum(acc: &[f32; L]) -> f32 {
    let mut v = *acc;
    let mut w = L / 2;
    while w > 0 {
        for j in 0..w {
            v[j] += v[j + w];
        }
        w /= 2;
    }
    v[0]
}

/// `y += a · x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

const MAGIC: f32 = 12_582_912.0;

/// `eˣ` to about 2 ulp (Cephes' polynomial after a range reduction by ln 2), branch-free and
/// with integer steps on the float's bits only, so it vectorises; inputs are clamped to where
/// the result is a normal float.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5e-1);
    let e = (p * r).mul_add(r, r) + 1.0;
    // `t`'s low mantissa bits hold n (two's complement): 2ⁿ from the bits, no float→int cast.
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    e * two_n
}

multiversion! {
    /// `out = x / rms(x) · w` per row of `x` (rows of `w.len()`), as candle's `rms_norm`:
    /// `rms = sqrt(mean(x²) + eps)`.
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let h = w.len();
        for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            norm_row(xr, w, eps, or);
        }
    }
}

#[inline(always)]
fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = dot(x, x) / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * inv * wi;
    }
}

multiversion! {
    /// The residual add and the next norm in one pass: `x += y`, then `out = rms_norm(x)`.
    pub fn add_rms_norm(x: &mut [f32], y: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let h = w.len();
        for ((xr, yr), or) in x.chunks_exact_mut(h).zip(y.chunks_exact(h)).zip(out.chunks_exact_mut(h)) {
            for (a, b) in xr.iter_mut().zip(yr) {
                *a += *b;
            }
            norm_row(xr, w, eps, or);
        }
    }
}

multiversion! {
    /// Rotary embedding in place on `x` (`n` rows of `heads · hd`, split-half "rotate_half"
    /// layout), row `i` at position `pos[i]`, with `(max_pos, hd / 2)` tables.
    pub fn rope(x: &mut [f32], heads: usize, pos: &[u32], cos: &[f32], sin: &[f32]) {
        let hd = x.len() / pos.len() / heads;
        let half = hd / 2;
        for (row, &p) in x.chunks_exact_mut(heads * hd).zip(pos) {
            let c = &cos[p as usize * half..(p as usize + 1) * half];
            let s = &sin[p as usize * half..(p as usize + 1) * half];
            for head in row.chunks_exact_mut(hd) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = a * s[i] + b * c[i];
                }
            }
        }
    }
}

multiversion! {
    /// `out = silu(gate) · up`, with `silu(g) = g / (1 + e⁻ᵍ)`.
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// One LoRA term of a row's mix: `c · Bᵀ (A x)` with `A` `(rank, in)` and `Bᵀ` `(rank, out)`,
/// both row-major. A DoRA term has a `gain` (`out`): the row, with the term added, is then
/// multiplied by it element-wise, so it rescales the terms before it.
#[derive(Debug, Clone, Copy)]
pub struct LoraTerm<'a> {
    pub a: &'a [f32],
    pub b_t: &'a [f32],
    pub rank: usize,
    pub coef: f32,
    pub gain: Option<&'a [f32]>,
}

multiversion! {
    /// `y[i] += Σ_terms c · Bᵀ (A x[i])` for rows `x` (`in` wide) and `y` (`out` wide) that all
    /// share `terms`, in order, a term with a gain multiplying the row by it after its own
    /// product (a zero coefficient adds nothing). Ranks go 8 at a time: `A`'s 8 rows against one pass over `x` (8 chains,
    /// one horizontal sum each), then `y` read and written once for 8 rows of `Bᵀ`.
    pub fn lora_rows(x: &[f32], terms: &[LoraTerm<'_>], y: &mut [f32]) {
        let Some(t0) = terms.first() else { return };
        let (fan_in, fan_out) = (t0.a.len() / t0.rank, t0.b_t.len() / t0.rank);
        for (xr, yr) in x.chunks_exact(fan_in).zip(y.chunks_exact_mut(fan_out)) {
            for t in terms {
                let rank = if t.coef == 0.0 { 0 } else { t.rank };
                for r0 in (0..rank).step_by(8) {
                    let rs = (t.rank - r0).min(8);
                    let a = &t.a[r0 * fan_in..(r0 + rs) * fan_in];
                    let b = &t.b_t[r0 * fan_out..(r0 + rs) * fan_out];
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd_level() == 2 {
                        // SAFETY: AVX-512 F detected; `a` and `b` hold `rs` rows of `in` / `out`.
                        unsafe {
                            match rs {
                                1 => crate::x86::lora_group_avx512::<1>(xr, a, b, t.coef, yr),
                                2 => crate::x86::lora_group_avx512::<2>(xr, a, b, t.coef, yr),
                                3 => crate::x86::lora_group_avx512::<3>(xr, a, b, t.coef, yr),
                                4 => crate::x86::lora_group_avx512::<4>(xr, a, b, t.coef, yr),
                                5 => crate::x86::lora_group_avx512::<5>(xr, a, b, t.coef, yr),
                                6 => crate::x86::lora_group_avx512::<6>(xr, a, b, t.coef, yr),
                                7 => crate::x86::lora_group_avx512::<7>(xr, a, b, t.coef, yr),
                                _ => crate::x86::lora_group_avx512::<8>(xr, a, b, t.coef, yr),
                            }
                        }
                        continue;
                    }
                    match rs {
                        1 => lora_rank_group::<1>(xr, a, b, t.coef, yr),
                        2 => lora_rank_group::<2>(xr, a, b, t.coef, yr),
                        3 => lora_rank_group::<3>(xr, a, b, t.coef, yr),
                        4 => lora_rank_group::<4>(xr, a, b, t.coef, yr),
                        5 => lora_rank_group::<5>(xr, a, b, t.coef, yr),
                        6 => lora_rank_group::<6>(xr, a, b, t.coef, yr),
                        7 => lora_rank_group::<7>(xr, a, b, t.coef, yr),
                        _ => lora_rank_group::<8>(xr, a, b, t.coef, yr),
                    }
                }
                if let Some(g) = t.gain {
                    yr.iter_mut().zip(g).for_each(|(y, g)| *y *= g);
                }
            }
        }
    }
}

/// `y += c · Σ_r (a_r · x) b_r` for `R` rows `a_r` of `A` and `b_r` of `Bᵀ`. Rows are taken
/// as whole-vector chunks checked once up front, so the inner loops carry no bounds checks
/// (a possible panic between updates would force every accumulator back to memory).
#[inline(always)]
fn lora_rank_group<const R: usize>(x: &[f32], a: &[f32], b: &[f32], coef: f32, y: &mut [f32]) {
    let (fan_in, fan_out) = (x.len(), y.len());
    let (xc, xt) = x.as_chunks::<L>();
    let a_rows: [(&[[f32; L]], &[f32]); R] =
        std::array::from_fn(|r| a[r * fan_in..(r + 1) * fan_in].as_chunks::<L>());
    let b_rows: [(&[[f32; L]], &[f32]); R] =
        std::array::from_fn(|r| b[r * fan_out..(r + 1) * fan_out].as_chunks::<L>());
    let n = xc.len();
    if a_rows.iter().any(|(c, _)| c.len() != n) {
        return;
    }
    let mut acc = [[0f32; L]; R];
    for (c, xv) in xc.iter().enumerate() {
        for r in 0..R {
            let av = &a_rows[r].0[c];
            for l in 0..L {
                acc[r][l] = av[l].mul_add(xv[l], acc[r][l]);
            }
        }
    }
    let mut u = [0f32; R];
    for r in 0..R {
        let mut s = hsum(&acc[r]);
        for (av, xv) in a_rows[r].1.iter().zip(xt) {
            s = av.mul_add(*xv, s);
        }
        u[r] = s * coef;
    }
    let (yc, yt) = y.as_chunks_mut::<L>();
    let m = yc.len();
    if b_rows.iter().any(|(c, t)| c.len() != m || t.len() != yt.len()) {
        return;
    }
    for (c, yv) in yc.iter_mut().enumerate() {
        let mut v = *yv;
        for r in 0..R {
            let bv = &b_rows[r].0[c];
            for l in 0..L {
                v[l] = u[r].mul_add(bv[l], v[l]);
            }
        }
        *yv = v;
    }
    for (i, yv) in yt.iter_mut().enumerate() {
        for r in 0..R {
            *yv = u[r].mul_add(b_rows[r].1[i], *yv);
        }
    }
}

/// A run of consecutive rows that share one list of LoRA terms (one sequence's rows).
#[derive(Debug, Clone)]
pub struct LoraRun<'a> {
    pub rows: std::ops::Range<usize>,
    pub terms: Vec<LoraTerm<'a>>,
}

/// Rows per work item of [`lora_batch`]: a prompt's rows split, decode rows stay whole.
const LORA_ROWS_PER_ITEM: usize = 16;

/// `y[i] += Σ c · Bᵀ (A x[i])` for every row of every run (`x` `(n, in)`, `y` `(n, out)`),
/// split over the pool when there is enough work.
pub fn lora_batch(
    pool: &Pool,
    x: &[f32],
    fan_in: usize,
    y: &mut [f32],
    fan_out: usize,
    runs: &[LoraRun<'_>],
) {
    let mut items: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    let mut work = 0usize;
    for (k, run) in runs.iter().enumerate() {
        if run.terms.is_empty() {
            continue;
        }
        work +=
            run.rows.len() * run.terms.iter().map(|t| t.rank).sum::<usize>() * (fan_in + fan_out);
        let mut r = run.rows.start;
        while r < run.rows.end {
            let end = (r + LORA_ROWS_PER_ITEM).min(run.rows.end);
            items.push((k, r..end));
            r = end;
        }
    }
    assert!(
        items.last().is_none_or(|(_, r)| r.end * fan_out <= y.len() && r.end * fan_in <= x.len()),
        "LoRA rows outside the batch; this is a bug"
    );
    let dst = Shared(y.as_mut_ptr());
    let run_item = |i: usize| {
        let (k, rows) = &items[i];
        let d = dst;
        // SAFETY: items cover disjoint row ranges (runs do not overlap and are split without
        // overlap), inside `y` (asserted above); the pool joins every item before `y`'s borrow
        // ends.
        let yr = unsafe {
            std::slice::from_raw_parts_mut(d.0.add(rows.start * fan_out), rows.len() * fan_out)
        };
        lora_rows(&x[rows.start * fan_in..rows.end * fan_in], &runs[*k].terms, yr);
    };
    // Below ~64k multiply-adds a parallel call costs more than it saves.
    if work > 1 << 16 && items.len() > 1 {
        pool.run(items.len(), run_item);
    } else {
        (0..items.len()).for_each(run_item);
    }
}

/// A raw pointer shared by chunks that write disjoint parts of one output.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every user writes only its own disjoint range, and the pool joins all chunks
// before the borrow the pointer came from ends.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// Attention shape: `heads` query heads in groups over `kv_heads` (GQA), `head_dim` each.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Keys a query sees, itself included (a sliding window: the query at `i` sees keys
    /// `j` with `i − window < j ≤ i`); `usize::MAX` for full causal attention.
    pub window: usize,
    /// ALiBi: `slope_h · j` added to the scaled score of key position `j` (slopes as
    /// [`alibi_slopes`]).
    pub alibi: bool,
}

/// ALiBi slopes per head: `2^(-8(h+1)/n)` for a power-of-two `n`, otherwise those of the nearest
/// lower power of two followed by every other slope of the next one.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let pow2 = 1usize << (usize::BITS - 1 - heads.max(1).leading_zeros());
    let base = |n: usize, i: usize| 2f64.powf(-8.0 * (i + 1) as f64 / n as f64);
    let mut s: Vec<f32> = (0..pow2).map(|i| base(pow2, i) as f32).collect();
    s.extend((0..heads - pow2).map(|i| base(2 * pow2, 2 * i) as f32));
    s
}

/// Tokens per key tile of a host KV cache.
pub const KV_TILE: usize = 16;

/// Writes `rows` (token-major `(n, kv_heads · head_dim)`) into one block of [`KV_TILE`] tokens
/// at slots `at..at + n`: keys as one tile `(kv_heads, head_dim, 16)` (the 16 keys of one
/// dimension are adjacent, so a score tile is one vector per dimension with no transpose),
/// values token-major `(16, kv_heads · head_dim)`. Unwritten slots stay as they were (zero in
/// a new block) and are never read.
pub fn write_block(
    k_tile: &mut [f32],
    v_rows: &mut [f32],
    at: usize,
    k: &[f32],
    v: &[f32],
    width: usize,
) {
    debug_assert!(at + k.len() / width.max(1) <= KV_TILE);
    for (i, row) in k.chunks_exact(width).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            // Column c = head · hd + d sits at (head · hd + d) · 16 within the tile.
            k_tile[c * KV_TILE + at + i] = x;
        }
    }
    v_rows[at * width..at * width + v.len()].copy_from_slice(v);
}

/// One sequence's part of an attention call: its KV cache as blocks of [`KV_TILE`] tokens
/// ([`write_block`]; block `b` holds positions `16b .. 16b + 16`), this step's tokens
/// included, last; and where its `t` query rows start in the batch. Blocks may be shared
/// with other sequences (a cached prefix): the kernel only reads them.
#[derive(Debug, Clone, Copy)]
pub struct SeqKv<'a> {
    /// Key tiles, `kv_heads · head_dim · 16` floats each.
    pub k: &'a [&'a [f32]],
    /// Value rows, `16 · kv_heads · head_dim` floats each.
    pub v: &'a [&'a [f32]],
    pub len: usize,
    pub t: usize,
    pub row0: usize,
}

/// Query positions per attention chunk of a prefill.
const QUERY_BLOCK: usize = 16;
/// Keys per score tile: the 16 lanes of one 512-bit register.
const KT: usize = 16;
/// Query rows per score micro-tile: eight independent accumulator chains.
const QT: usize = 8;
/// Query rows per value micro-tile.
const VT: usize = 4;
/// Head-dimension floats per value micro-tile.
const VD: usize = 64;

/// Causal attention for every sequence: query row `row0 + j` (position `len - t + j`) attends
/// to keys `0 ..= len - t + j` of its own sequence. `q` and `out` are `(n, heads · hd)`.
pub fn attention(pool: &Pool, dims: AttnDims, q: &[f32], seqs: &[SeqKv<'_>], out: &mut [f32]) {
    // Chunks: (sequence, kv head, block of queries), the longest (latest) blocks first so the
    // pool's threads finish together.
    let mut chunks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for kvh in 0..dims.kv_heads {
            for j0 in (0..seq.t).step_by(QUERY_BLOCK) {
                chunks.push((s, kvh, j0));
            }
        }
    }
    chunks.sort_by_key(|&(s, _, j0)| std::cmp::Reverse(seqs[s].len - seqs[s].t + j0));
    let dst = Shared(out.as_mut_ptr());
    let width = dims.heads * dims.head_dim;
    let n_rows = out.len() / width.max(1);
    pool.run(chunks.len(), |c| {
        let (s, kvh, j0) = chunks[c];
        let seq = &seqs[s];
        let js = j0..(j0 + QUERY_BLOCK).min(seq.t);
        let groups = dims.heads / dims.kv_heads;
        let mut block = AttnBlock::new(dims, seq, kvh, js.clone());
        block.load_queries(q);
        block.run();
        let d = dst;
        for j in js.clone() {
            for g in 0..groups {
                let (row, head) = (seq.row0 + j, kvh * groups + g);
                debug_assert!(row < n_rows);
                // SAFETY: (row, head) pairs are unique to this chunk (its sequence's rows, its
                // kv group's heads), inside the `(n, heads · hd)` output.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        d.0.add(row * width + head * dims.head_dim),
                        dims.head_dim,
                    )
                };
                o.copy_from_slice(block.output((j - js.start) * groups + g));
            }
        }
    });
}

/// One chunk's work: the block's query rows (all heads of one kv group, scaled), their scores
/// against every key the block sees, then the weighted values.
struct AttnBlock<'a> {
    dims: AttnDims,
    seq: &'a SeqKv<'a>,
    kvh: usize,
    js: std::ops::Range<usize>,
    /// `(nq, hd)`: query row `qi = (j - j0) · groups + g`.
    q: Vec<f32>,
    /// `(nq, keys_padded)` scores, then probabilities.
    p: Vec<f32>,
    /// `(nq, hd)` outputs.
    o: Vec<f32>,
    keys: usize,
    keys_padded: usize,
}

impl<'a> AttnBlock<'a> {
    fn new(dims: AttnDims, seq: &'a SeqKv<'a>, kvh: usize, js: std::ops::Range<usize>) -> Self {
        let groups = dims.heads / dims.kv_heads;
        let nq = js.len() * groups;
        let keys = seq.len - seq.t + js.end;
        let keys_padded = keys.div_ceil(KT) * KT;
        Self {
            dims,
            seq,
            kvh,
            js,
            q: vec![0.0; nq * dims.head_dim],
            p: vec![0.0; nq * keys_padded],
            o: vec![0.0; nq * dims.head_dim],
            keys,
            keys_padded,
        }
    }

    fn nq(&self) -> usize {
        self.q.len() / self.dims.head_dim
    }

    /// Position of query row `qi` (the last key it may see).
    fn pos(&self, qi: usize) -> usize {
        let groups = self.dims.heads / self.dims.kv_heads;
        self.seq.len - self.seq.t + self.js.start + qi / groups
    }

    fn load_queries(&mut self, q: &[f32]) {
        let (hd, groups) = (self.dims.head_dim, self.dims.heads / self.dims.kv_heads);
        let width = self.dims.heads * hd;
        for (jj, j) in self.js.clone().enumerate() {
            let row = self.seq.row0 + j;
            for g in 0..groups {
                let h = self.kvh * groups + g;
                let src = &q[row * width + h * hd..row * width + (h + 1) * hd];
                let qi = jj * groups + g;
                for (d, s) in self.q[qi * hd..(qi + 1) * hd].iter_mut().zip(src) {
                    *d = *s * self.dims.scale;
                }
            }
        }
    }

    fn run(&mut self) {
        let (nq, hd, kvh, kvw) =
            (self.nq(), self.dims.head_dim, self.kvh, self.dims.kv_heads * self.dims.head_dim);
        let pos: Vec<usize> = (0..nq).map(|qi| self.pos(qi)).collect();
        let groups = self.dims.heads / self.dims.kv_heads;
        let slopes: Vec<f32> = if self.dims.alibi {
            let all = alibi_slopes(self.dims.heads);
            (0..nq).map(|qi| all[kvh * groups + qi % groups]).collect()
        } else {
            Vec::new()
        };
        let scores = Scores { hd, keys_padded: self.keys_padded, pos: &pos, slopes: &slopes };
        block_scores(&self.q, self.seq.k, kvh * hd * KV_TILE, self.keys, &scores, &mut self.p);
        let first: Vec<usize> =
            pos.iter().map(|&p| (p + 1).saturating_sub(self.dims.window)).collect();
        block_softmax(&mut self.p, self.keys_padded, &first, &pos);
        let values = Values { keys_padded: self.keys_padded, v: self.seq.v, kvw, hd };
        block_values(&self.p, &values, kvh * hd, &pos, &mut self.o);
    }

    fn output(&self, qi: usize) -> &[f32] {
        &self.o[qi * self.dims.head_dim..(qi + 1) * self.dims.head_dim]
    }
}

/// What the score kernel needs of one head besides its queries, keys and output: the head
/// size, the scores' row stride, each query's position and ALiBi slope (none without ALiBi).
struct Scores<'a> {
    hd: usize,
    keys_padded: usize,
    pos: &'a [usize],
    slopes: &'a [f32],
}

/// `p[qi, u] = q[qi] · k[u]` for keys `u ≤ pos[qi]` (others −∞), one key tile at a time.
fn block_scores(q: &[f32], k: &[&[f32]], koff: usize, keys: usize, s: &Scores<'_>, p: &mut [f32]) {
    for (t, tile) in k.iter().enumerate().take(keys.div_ceil(KT)) {
        // The tile goes in as a parameter: a slice loaded from the block table carries no
        // aliasing facts, and without them the compiler keeps the accumulators in memory.
        tile_scores(q, &tile[koff..koff + s.hd * KT], t, s, p);
    }
}

multiversion! {
    /// One key tile's scores: each query row's 16 scores accumulate in one register, up to 8
    /// rows at once (independent chains), each over even and odd dimensions separately to
    /// halve the dependency chain.
    fn tile_scores(q: &[f32], kt: &[f32], t: usize, s: &Scores<'_>, p: &mut [f32]) {
        let (hd, keys_padded, pos, slopes) = (s.hd, s.keys_padded, s.pos, s.slopes);
        let nq = q.len() / hd;
        let mut qi0 = 0;
        while qi0 < nq {
            let m = (nq - qi0).min(QT);
            let rows = &q[qi0 * hd..(qi0 + m) * hd];
            let out = &mut p[qi0 * keys_padded..(qi0 + m) * keys_padded];
            match m {
                1 => score_tile::<1>(rows, hd, kt, t, keys_padded, &pos[qi0..], out),
                2 => score_tile::<2>(rows, hd, kt, t, keys_padded, &pos[qi0..], out),
                3 => score_tile::<3>(rows, hd, kt, t, keys_padded, &pos[qi0..], out),
                4 => score_tile::<4>(rows, hd, kt, t, keys_padded, &pos[qi0..], out),
                5 => score_tile::<5>(rows, hd, kt, t, keys_padded, &pos[qi0..], out),
                6 => score_tile::<6>(rows, hd, kt, t, keys_padded, &pos[qi0..], out),
                7 => score_tile::<7>(rows, hd, kt, t, keys_padded, &pos[qi0..], out),
                _ => score_tile::<8>(rows, hd, kt, t, keys_padded, &pos[qi0..], out),
            }
            if !slopes.is_empty() {
                for r in 0..m {
                    let row = &mut out[r * keys_padded + t * KT..r * keys_padded + (t + 1) * KT];
                    for (l, x) in row.iter_mut().enumerate() {
                        *x += slopes[qi0 + r] * (t * KT + l) as f32;
                    }
                }
            }
            qi0 += m;
        }
    }
}

#[inline(always)]
fn score_tile<const M: usize>(
    q: &[f32],
    hd: usize,
    kt: &[f32],
    t: usize,
    keys_padded: usize,
    pos: &[usize],
    p: &mut [f32],
) {
    let mut even = [[0f32; KT]; M];
    let mut odd = [[0f32; KT]; M];
    let (kc, _) = kt.as_chunks::<KT>();
    let mut d = 0;
    while d + 1 < hd {
        let (k0, k1) = (&kc[d], &kc[d + 1]);
        for r in 0..M {
            let (q0, q1) = (q[r * hd + d], q[r * hd + d + 1]);
            for l in 0..KT {
                even[r][l] = q0.mul_add(k0[l], even[r][l]);
                odd[r][l] = q1.mul_add(k1[l], odd[r][l]);
            }
        }
        d += 2;
    }
    if d < hd {
        for r in 0..M {
            let q0 = q[r * hd + d];
            for l in 0..KT {
                even[r][l] = q0.mul_add(kc[d][l], even[r][l]);
            }
        }
    }
    let u0 = t * KT;
    for r in 0..M {
        let row = &mut p[r * keys_padded + u0..r * keys_padded + u0 + KT];
        for l in 0..KT {
            row[l] = if u0 + l <= pos[r] { even[r][l] + odd[r][l] } else { f32::NEG_INFINITY };
        }
    }
}

multiversion! {
    /// Rows of `p` become probabilities over keys `first[qi] ..= pos[qi]`, exact zeros
    /// elsewhere (before the window and after the query).
    fn block_softmax(p: &mut [f32], keys_padded: usize, first: &[usize], pos: &[usize]) {
        for (qi, row) in p.chunks_exact_mut(keys_padded).enumerate() {
            let visible = pos[qi] + 1;
            let (row, dead) = row.split_at_mut(visible);
            let (early, live) = row.split_at_mut(first[qi].min(visible - 1));
            early.iter_mut().for_each(|x| *x = 0.0);
            let m = live.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = [0f32; L];
            let (chunks, tail) = live.as_chunks_mut::<L>();
            for c in chunks.iter_mut() {
                for l in 0..L {
                    c[l] = exp(c[l] - m);
                    sum[l] += c[l];
                }
            }
            let mut total = hsum(&sum);
            for x in tail.iter_mut() {
                *x = exp(*x - m);
                total += *x;
            }
            let inv = 1.0 / total;
            live.iter_mut().for_each(|x| *x *= inv);
            dead.iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

multiversion! {
    /// `o[qi] = Σ_u p[qi, u] · v[u]`: up to 4 query rows × 64 floats of the head in registers
    /// while the keys stream past.
    fn block_values(p: &[f32], vals: &Values<'_>, voff: usize, pos: &[usize], o: &mut [f32]) {
        let (keys_padded, hd) = (vals.keys_padded, vals.hd);
        let nq = o.len() / hd;
        let mut qi0 = 0;
        while qi0 < nq {
            let m = (nq - qi0).min(VT);
            let keys = (qi0..qi0 + m).map(|qi| pos[qi] + 1).max().unwrap_or(0);
            let prow = &p[qi0 * keys_padded..(qi0 + m) * keys_padded];
            let orow = &mut o[qi0 * hd..(qi0 + m) * hd];
            for d0 in (0..hd).step_by(VD) {
                let w = (hd - d0).min(VD);
                let span = Span { voff: voff + d0, d0, keys };
                match (m, w == VD) {
                    (1, true) => value_tile::<1, VD>(prow, vals, &span, orow),
                    (2, true) => value_tile::<2, VD>(prow, vals, &span, orow),
                    (3, true) => value_tile::<3, VD>(prow, vals, &span, orow),
                    (_, true) => value_tile::<4, VD>(prow, vals, &span, orow),
                    _ => value_tile_any(prow, m, w, vals, &span, orow),
                }
            }
            qi0 += m;
        }
    }
}

/// What the value kernel needs of one head besides its probabilities and output: the
/// probabilities' row stride, the value block table, its row width and the head size.
struct Values<'a> {
    keys_padded: usize,
    v: &'a [&'a [f32]],
    kvw: usize,
    hd: usize,
}

/// The columns a value tile computes: from `voff` in the value rows, to `d0` in the output's
/// head, over keys `0..keys`.
struct Span {
    voff: usize,
    d0: usize,
    keys: usize,
}

#[inline(always)]
fn value_tile<const M: usize, const W: usize>(
    p: &[f32],
    vals: &Values<'_>,
    span: &Span,
    o: &mut [f32],
) {
    let (keys_padded, v, kvw, hd) = (vals.keys_padded, vals.v, vals.kvw, vals.hd);
    let (voff, d0, keys) = (span.voff, span.d0, span.keys);
    let mut acc = [[0f32; W]; M];
    for u in 0..keys {
        let at = (u % KV_TILE) * kvw + voff;
        let vrow: &[f32; W] = match v[u / KV_TILE][at..at + W].try_into() {
            Ok(r) => r,
            Err(_) => return,
        };
        for r in 0..M {
            let pu = p[r * keys_padded + u];
            for l in 0..W {
                acc[r][l] = pu.mul_add(vrow[l], acc[r][l]);
            }
        }
    }
    for r in 0..M {
        o[r * hd + d0..r * hd + d0 + W].copy_from_slice(&acc[r]);
    }
}

#[inline(always)]
fn value_tile_any(p: &[f32], m: usize, w: usize, vals: &Values<'_>, span: &Span, o: &mut [f32]) {
    let (keys_padded, v, kvw, hd) = (vals.keys_padded, vals.v, vals.kvw, vals.hd);
    let (voff, d0, keys) = (span.voff, span.d0, span.keys);
    for r in 0..m {
        let acc = &mut o[r * hd + d0..r * hd + d0 + w];
        acc.iter_mut().for_each(|a| *a = 0.0);
        for u in 0..keys {
            let at = (u % KV_TILE) * kvw + voff;
            axpy(p[r * keys_padded + u], &v[u / KV_TILE][at..at + w], acc);
        }
    }
}

/// Splits `n` rows into the pool's chunks for a per-row kernel: about four chunks per thread,
/// none smaller than `min_rows`.
pub fn row_chunks(pool: &Pool, n: usize, min_rows: usize) -> usize {
    (pool.threads() * 4).min(n.div_ceil(min_rows.max(1))).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 4e-7, "{x}: {got} vs {want}");
        }
    }

    #[test]
    fn dot_and_hsum_match_a_plain_sum() {
        let a: Vec<f32> = (0..67).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..67).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
    }
}
