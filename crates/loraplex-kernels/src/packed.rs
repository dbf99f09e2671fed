//! The packed weight layout of the integer matmul, and its plain scalar reference.
//!
//! A `(rows, cols)` weight is cut into groups of 16 rows and blocks of 32 columns. Each
//! (group, block) is one record, records of a group stored block after block:
//! - scales `d[16]` and minimums `m[16]` (one per row of the group; twice, for the two
//!   16-column halves, in the [`Kind::W8S16`] format), as f16 when every scale of the matrix
//!   is exactly an f16 (GGUF's Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 store them so), else as f32
//!   ([`Scales`]): at batch 1 the weights' bytes are the step's cost, and f32 scales made a
//!   Q4_1 matrix 20 % larger than the GGUF it came from;
//! - the codes, as 64-byte chunks in which row `r` of the group owns bytes `4r..4r + 4`:
//!   [`Kind::W8`]/[`Kind::W8S16`]: chunk `k` (0..8) holds columns `4k..4k + 4` as bytes;
//!   [`Kind::W4`]: chunk `k` (0..4) holds columns `4k..4k + 4` in the low nibbles and
//!   `16 + 4k..16 + 4k + 4` in the high nibbles.
//!
//! So one 32-bit lane of a vector is one row's four codes: `vpdpbusd` against four broadcast
//! activation bytes gives 16 rows' partial dot products at once, with no shuffles.
//!
//! Weights are `d · u + m` (see [`super::ggml`]); activations are 8-bit per 32 values
//! ([`super::acts`]). Every kernel computes, for each output, blocks in order,
//! `acc = d.mul_add(isum as f32 * dx, acc); acc = m.mul_add(dx · Σq, acc)`: integer dot
//! products are exact, and the float steps are the same operations in the same order in every
//! kernel, so all kernels agree bit for bit and a row's result never depends on its batch.

use super::acts::QuantActs;
use super::ggml::{quantize_row_8bit, RowCodes};

/// Rows per group: the 16 i32 lanes of a 512-bit register.
pub const GROUP: usize = 16;
/// Columns per block: the activation quantization block.
pub const BLOCK: usize = 32;

/// A packed format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 4-bit codes, scale and minimum per 32 columns (Q4_0, Q4_1, Q4_K exactly).
    W4,
    /// 8-bit codes, scale and minimum per 32 columns (Q8_0, Q5_0, Q5_1, Q5_K exactly; floats
    /// by quantization).
    W8,
    /// 8-bit codes, scale and minimum per 16 columns (Q6_K, Q3_K, Q2_K exactly).
    W8S16,
}

impl Kind {
    /// Rows of 16 scales a record holds: `d` and `m`, once or (W8S16) twice.
    pub const fn scale_rows(self) -> usize {
        match self {
            Kind::W4 | Kind::W8 => 2,
            Kind::W8S16 => 4,
        }
    }

    pub const fn code_bytes(self) -> usize {
        match self {
            Kind::W4 => 4 * 64,
            Kind::W8 | Kind::W8S16 => 8 * 64,
        }
    }

    /// The smallest format that holds these rows exactly.
    pub fn for_rows(rows: &[RowCodes]) -> Kind {
        let shared = rows.iter().all(RowCodes::pairs_share_scales);
        let max = rows.iter().map(RowCodes::max_code).max().unwrap_or(0);
        match (shared, max < 16) {
            (true, true) => Kind::W4,
            (true, false) => Kind::W8,
            (false, _) => Kind::W8S16,
        }
    }
}

/// How a matrix stores its scales and minimums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scales {
    F32,
    /// Every scale is exactly an f16, so this is lossless; the kernels widen them with
    /// `vcvtph2ps` (F16C), which is exact.
    F16,
}

impl Scales {
    /// Bytes of one scale.
    pub const fn width(self) -> usize {
        match self {
            Scales::F32 => 4,
            Scales::F16 => 2,
        }
    }

    /// Bytes of the scales of one record of `kind` (a whole number of cache lines).
    pub const fn bytes(self, kind: Kind) -> usize {
        kind.scale_rows() * GROUP * self.width()
    }

    /// Bytes of one record of `kind`.
    pub const fn record_bytes(self, kind: Kind) -> usize {
        self.bytes(kind) + kind.code_bytes()
    }

    /// Byte offset of scale row `r` (0 = d, 1 = m, then W8S16's second pair) in a record.
    pub const fn row_offset(self, r: usize) -> usize {
        r * GROUP * self.width()
    }

    /// Byte offset of row `lane`'s scale in scale row `r` of a record.
    pub const fn offset(self, r: usize, lane: usize) -> usize {
        self.row_offset(r) + lane * self.width()
    }
}

/// One cache line; records are made of whole lines so each starts 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u8; 64]);

/// A frozen weight matrix in the packed layout.
#[derive(Clone)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub kind: Kind,
    pub scales: Scales,
    lines: Vec<Line>,
    /// `Wᵀ` in 8 bits, made by [`PackedMatrix::transposed_8bit`] on first use.
    transposed: std::sync::OnceLock<Option<std::sync::Arc<PackedMatrix>>>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix({}×{}, {:?}, {:?} scales)",
            self.rows, self.cols, self.kind, self.scales
        )
    }
}

impl PackedMatrix {
    /// Packs `rows` rows of `cols` columns; `row(r, &mut codes)` decodes row `r`. Scales are
    /// stored as f16 when all of them are exactly f16 values; the first that is not makes the
    /// packing start over with f32 scales (decoding the rows again).
    pub fn pack<E>(
        rows: usize,
        cols: usize,
        kind: Kind,
        mut row: impl FnMut(usize, &mut RowCodes) -> Result<(), E>,
    ) -> Result<Self, E> {
        assert!(
            cols.is_multiple_of(BLOCK),
            "packed matrices need whole 32-column blocks; this is a bug"
        );
        match Self::pack_with(rows, cols, kind, Scales::F16, &mut row)? {
            Some(p) => Ok(p),
            None => Ok(Self::pack_with(rows, cols, kind, Scales::F32, &mut row)?
                .unwrap_or_else(|| unreachable!("f32 holds every f32 scale"))),
        }
    }

    /// Packs with `scales`, or `None` when a scale does not fit them exactly.
    fn pack_with<E>(
        rows: usize,
        cols: usize,
        kind: Kind,
        scales: Scales,
        row: &mut impl FnMut(usize, &mut RowCodes) -> Result<(), E>,
    ) -> Result<Option<Self>, E> {
        let groups = rows.div_ceil(GROUP);
        let blocks = cols / BLOCK;
        let lines_per_record = scales.record_bytes(kind) / 64;
        let mut lines = vec![Line([0; 64]); groups * blocks * lines_per_record];
        let mut codes = RowCodes::with_cols(cols);
        for r in 0..rows {
            row(r, &mut codes)?;
            let (g, lane) = (r / GROUP, r % GROUP);
            for b in 0..blocks {
                let first = (g * blocks + b) * lines_per_record;
                let rec = bytes_mut(&mut lines[first..first + lines_per_record]);
                if !write_lane(rec, kind, scales, lane, &codes, b) {
                    return Ok(None);
                }
            }
        }
        Ok(Some(Self { rows, cols, kind, scales, lines, transposed: Default::default() }))
    }

    /// Packs rows already decoded, in the smallest exact format.
    pub fn from_codes(rows: &[RowCodes], cols: usize) -> Self {
        let kind = Kind::for_rows(rows);
        let packed: Result<Self, std::convert::Infallible> =
            Self::pack(rows.len(), cols, kind, |r, out| {
                out.clone_from(&rows[r]);
                Ok(())
            });
        match packed {
            Ok(p) => p,
            Err(never) => match never {},
        }
    }

    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    pub fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// Bytes of one of this matrix's records.
    pub fn record_bytes(&self) -> usize {
        self.scales.record_bytes(self.kind)
    }

    /// The records of group `g`, block after block.
    pub fn group_bytes(&self, g: usize) -> &[u8] {
        let per = self.blocks() * self.record_bytes() / 64;
        bytes(&self.lines[g * per..(g + 1) * per])
    }

    pub fn size_in_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// `Wᵀ` (`cols × rows`) as [`Kind::W8`] codes (8 bits per 32 values of a column of `W`,
    /// [`quantize_row_8bit`]): what a training backward multiplies the output gradient by,
    /// `g · W = g · (Wᵀ)ᵀ`, through the same integer kernels as the forward instead of an f32
    /// copy of `W` unpacked per step. Made on first use and kept with the matrix (1.25 bytes
    /// per weight; only processes that train make it); `None` when `rows` is not whole
    /// 32-blocks. Each value is within half a step of `max|column block| / 127` of `W`'s.
    pub fn transposed_8bit(&self) -> Option<&PackedMatrix> {
        self.transposed
            .get_or_init(|| {
                if !self.rows.is_multiple_of(BLOCK) || self.rows == 0 {
                    return None;
                }
                let w = self.unpack();
                let (rows, cols) = (self.rows, self.cols);
                let mut column = vec![0f32; rows];
                let t: Result<Self, std::convert::Infallible> =
                    Self::pack(cols, rows, Kind::W8, |c, out| {
                        column.iter_mut().enumerate().for_each(|(r, v)| *v = w[r * cols + c]);
                        quantize_row_8bit(&column, out);
                        Ok(())
                    });
                match t {
                    Ok(t) => Some(std::sync::Arc::new(t)),
                    Err(never) => match never {},
                }
            })
            .as_deref()
    }

    /// The weight as f32, row-major (`d · u + m`, exact for GGUF-decoded weights).
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.unpack_rows(0, &mut out);
        out
    }

    /// Rows `first..first + out.len() / cols` as f32 into `out` (so callers can unpack row
    /// ranges in parallel).
    pub fn unpack_rows(&self, first: usize, out: &mut [f32]) {
        for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
            let r = first + i;
            let group = self.group_bytes(r / GROUP);
            let rb = self.record_bytes();
            for b in 0..self.blocks() {
                let rec = &group[b * rb..(b + 1) * rb];
                for c in 0..BLOCK {
                    let (d, m) = lane_scales(rec, self.kind, self.scales, r % GROUP, c / 16);
                    let u = code(rec, self.kind, self.scales, r % GROUP, c);
                    row[b * BLOCK + c] = d.mul_add(u as f32, m);
                }
            }
        }
    }
}

fn bytes(lines: &[Line]) -> &[u8] {
    // SAFETY: `Line` is `repr(C)` around `[u8; 64]` with no padding (size 64 = align 64), so
    // `lines.len()` lines are exactly `64 · len` initialised bytes at the same address.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), lines.len() * 64) }
}

fn bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: as in `bytes`; the exclusive borrow of the lines covers every byte.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), lines.len() * 64) }
}

/// Writes scale `v` at `at` in `scales`; false when it is not exactly representable there.
fn put_scale(rec: &mut [u8], at: usize, scales: Scales, v: f32) -> bool {
    match scales {
        Scales::F32 => rec[at..at + 4].copy_from_slice(&v.to_le_bytes()),
        Scales::F16 => {
            let h = half::f16::from_f32(v);
            if h.to_f32().to_bits() != v.to_bits() {
                return false;
            }
            rec[at..at + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    true
}

fn get_scale(rec: &[u8], at: usize, scales: Scales) -> f32 {
    match scales {
        Scales::F32 => f32::from_le_bytes([rec[at], rec[at + 1], rec[at + 2], rec[at + 3]]),
        Scales::F16 => half::f16::from_le_bytes([rec[at], rec[at + 1]]).to_f32(),
    }
}

/// Writes row `lane` of block `b` of `codes` into a record; false when a scale does not fit
/// `scales` exactly.
fn write_lane(
    rec: &mut [u8],
    kind: Kind,
    scales: Scales,
    lane: usize,
    codes: &RowCodes,
    b: usize,
) -> bool {
    let (sub_lo, sub_hi) = (2 * b, 2 * b + 1);
    let at = |row: usize| scales.offset(row, lane);
    let mut exact = put_scale(rec, at(0), scales, codes.d[sub_lo])
        && put_scale(rec, at(1), scales, codes.m[sub_lo]);
    if kind == Kind::W8S16 {
        exact = exact
            && put_scale(rec, at(2), scales, codes.d[sub_hi])
            && put_scale(rec, at(3), scales, codes.m[sub_hi]);
    }
    let q = &mut rec[scales.bytes(kind)..];
    let u = &codes.u[b * BLOCK..(b + 1) * BLOCK];
    match kind {
        Kind::W4 => {
            for k in 0..4 {
                for t in 0..4 {
                    q[64 * k + 4 * lane + t] = (u[4 * k + t] & 0x0F) | (u[16 + 4 * k + t] << 4);
                }
            }
        }
        Kind::W8 | Kind::W8S16 => {
            for k in 0..8 {
                q[64 * k + 4 * lane..64 * k + 4 * lane + 4].copy_from_slice(&u[4 * k..4 * k + 4]);
            }
        }
    }
    exact
}

/// The scale and minimum of row `lane` for half `half` (0 or 1) of a record.
pub(super) fn lane_scales(
    rec: &[u8],
    kind: Kind,
    scales: Scales,
    lane: usize,
    half: usize,
) -> (f32, f32) {
    let first = if kind == Kind::W8S16 && half == 1 { 2 } else { 0 };
    let at = |row: usize| scales.offset(row, lane);
    (get_scale(rec, at(first), scales), get_scale(rec, at(first + 1), scales))
}

/// The code of row `lane`, column `c` (0..32) of a record.
pub(super) fn code(rec: &[u8], kind: Kind, scales: Scales, lane: usize, c: usize) -> u8 {
    let q = &rec[scales.bytes(kind)..];
    match kind {
        Kind::W4 => {
            let (k, hi) = ((c % 16) / 4, c >= 16);
            let byte = q[64 * k + 4 * lane + c % 4];
            if hi {
                byte >> 4
            } else {
                byte & 0x0F
            }
        }
        Kind::W8 | Kind::W8S16 => q[64 * (c / 4) + 4 * lane + c % 4],
    }
}

/// The scalar reference: `y[i, j] = Σ_b …` for activation rows `rows` of `x` and output rows
/// `[g·16, g·16 + 16)` of `w`, written to `out[(i - rows.start) · ld + j - g·16]`.
pub fn tile_scalar(
    w: &PackedMatrix,
    g: usize,
    x: &QuantActs,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let recs = w.group_bytes(g);
    let rb = w.record_bytes();
    for (oi, i) in rows.enumerate() {
        for lane in 0..GROUP {
            let mut acc = 0f32;
            for b in 0..w.blocks() {
                let rec = &recs[b * rb..(b + 1) * rb];
                let xq = x.block(i, b);
                let (dx, sums) = (x.scale(i, b), x.sums(i, b));
                let dot = |cols: std::ops::Range<usize>| {
                    cols.map(|c| code(rec, w.kind, w.scales, lane, c) as i32 * xq[c] as i32)
                        .sum::<i32>()
                };
                if w.kind == Kind::W8S16 {
                    for (half, s) in [(0usize, sums[1]), (1, sums[2])] {
                        let (d, m) = lane_scales(rec, w.kind, w.scales, lane, half);
                        acc = d.mul_add(dot(16 * half..16 * half + 16) as f32 * dx, acc);
                        acc = m.mul_add(s, acc);
                    }
                } else {
                    let (d, m) = lane_scales(rec, w.kind, w.scales, lane, 0);
                    acc = d.mul_add(dot(0..BLOCK) as f32 * dx, acc);
                    acc = m.mul_add(sums[0], acc);
                }
            }
            out[oi * ld + lane] = acc;
        }
    }
}
