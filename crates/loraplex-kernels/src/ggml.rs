//! Decoding of GGUF (ggml) weight blocks into the one form every packed format is built from:
//! per row, unsigned integer codes `u` with a scale `d` and a minimum `m` per 16 values, such
//! that each weight is exactly `d · u + m` (one rounding, as `f32::mul_add` computes it).
//!
//! Every block type real files use fits that form without loss: a code is the stored integer
//! (shifted to be non-negative), the scale is the block's f16 scale times its integer
//! sub-scale (at most 19 significant bits, so exact in f32), and the minimum is the stored
//! f16 minimum times its sub-minimum, or the shift times the scale. `tests` checks every type
//! against candle's own dequantization: equal values (bit for bit but for the sign of zero).

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// One row of a weight matrix in decoded form: `u.len() == cols`, `d.len() == m.len() ==
/// cols / 16`. Weight `c` is `d[c / 16].mul_add(u[c] as f32, m[c / 16])`.
#[derive(Debug, Clone, Default)]
pub struct RowCodes {
    pub u: Vec<u8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

impl RowCodes {
    pub fn with_cols(cols: usize) -> Self {
        Self { u: vec![0; cols], d: vec![0.0; cols / 16], m: vec![0.0; cols / 16] }
    }

    /// The largest code (decides whether 4 bits hold the row).
    pub fn max_code(&self) -> u8 {
        self.u.iter().copied().max().unwrap_or(0)
    }

    /// Whether each pair of 16-value halves shares its scale and minimum (a 32-block format).
    pub fn pairs_share_scales(&self) -> bool {
        self.d.chunks(2).zip(self.m.chunks(2)).all(|(d, m)| {
            d.len() < 2 || (d[0].to_bits() == d[1].to_bits() && m[0].to_bits() == m[1].to_bits())
        })
    }

    pub fn value(&self, c: usize) -> f32 {
        self.d[c / 16].mul_add(self.u[c] as f32, self.m[c / 16])
    }

    fn set_sub(&mut self, sub: usize, d: f32, m: f32) {
        self.d[sub] = d;
        self.m[sub] = m;
    }
}

/// How a GGUF type maps onto packed codes without loss, or `None` for float types (which are
/// quantized, with loss, instead).
pub fn code_bits(dtype: GgmlDType) -> Option<u8> {
    use GgmlDType::*;
    match dtype {
        Q4_0 | Q4_1 | Q4K => Some(4),
        Q8_0 | Q5_0 | Q5_1 | Q5K | Q6K | Q3K | Q2K => Some(8),
        _ => None,
    }
}

/// The packed format that holds `dtype` exactly (floats: 8-bit codes, with loss).
pub fn packed_kind(dtype: GgmlDType) -> super::Kind {
    match (code_bits(dtype), dtype) {
        (Some(4), _) => super::Kind::W4,
        (_, GgmlDType::Q6K | GgmlDType::Q3K | GgmlDType::Q2K) => super::Kind::W8S16,
        _ => super::Kind::W8,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("GGUF type `{0:?}` cannot be packed")]
    Unsupported(GgmlDType),
    #[error("row of {cols} values is not a whole number of `{dtype:?}` blocks")]
    Shape { dtype: GgmlDType, cols: usize },
    #[error("`{dtype:?}` data of {got} bytes, expected {want}")]
    Size { dtype: GgmlDType, got: usize, want: usize },
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes row `row` of a `(rows, cols)` matrix stored as `dtype` blocks in `data`.
pub fn decode_row(
    dtype: GgmlDType,
    data: &[u8],
    cols: usize,
    row: usize,
    out: &mut RowCodes,
) -> Result<(), DecodeError> {
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    if !cols.is_multiple_of(bs) || !cols.is_multiple_of(32) {
        return Err(DecodeError::Shape { dtype, cols });
    }
    let row_bytes = cols / bs * ts;
    let Some(bytes) = data.get(row * row_bytes..(row + 1) * row_bytes) else {
        return Err(DecodeError::Size { dtype, got: data.len(), want: (row + 1) * row_bytes });
    };
    match dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
            let vals: Vec<f32> = match dtype {
                GgmlDType::F32 => bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                GgmlDType::F16 => bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                _ => bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            };
            quantize_row_8bit(&vals, out);
        }
        _ => {
            for (blk, b) in bytes.chunks_exact(ts).enumerate() {
                decode_block(dtype, b, blk * bs, out)?;
            }
        }
    }
    Ok(())
}

/// Float weights → 8-bit codes per 32 values (absmax scale, codes offset by 128): the one
/// lossy case, with an error below half a step of `max|w| / 127` per weight.
pub fn quantize_row_8bit(vals: &[f32], out: &mut RowCodes) {
    for (blk, v) in vals.chunks_exact(32).enumerate() {
        let amax = v.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (i, &x) in v.iter().enumerate() {
            out.u[blk * 32 + i] = ((x * id).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
        }
        out.set_sub(2 * blk, d, -128.0 * d);
        out.set_sub(2 * blk + 1, d, -128.0 * d);
    }
}

/// Decodes one block whose first value is column `c0` of the row.
fn decode_block(
    dtype: GgmlDType,
    b: &[u8],
    c0: usize,
    out: &mut RowCodes,
) -> Result<(), DecodeError> {
    let s0 = c0 / 16;
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
            let d = h(b, 0);
            let (m, qs) =
                if dtype == GgmlDType::Q4_0 { (-8.0 * d, &b[2..18]) } else { (h(b, 2), &b[4..20]) };
            for (j, &q) in qs.iter().enumerate() {
                out.u[c0 + j] = q & 0x0F;
                out.u[c0 + j + 16] = q >> 4;
            }
            out.set_sub(s0, d, m);
            out.set_sub(s0 + 1, d, m);
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let d = h(b, 0);
            let (m, qh, qs) = if dtype == GgmlDType::Q5_0 {
                (-16.0 * d, &b[2..6], &b[6..22])
            } else {
                (h(b, 2), &b[4..8], &b[8..24])
            };
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            for (j, &q) in qs.iter().enumerate() {
                out.u[c0 + j] = (q & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                out.u[c0 + j + 16] = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            out.set_sub(s0, d, m);
            out.set_sub(s0 + 1, d, m);
        }
        GgmlDType::Q8_0 => {
            let d = h(b, 0);
            for j in 0..32 {
                out.u[c0 + j] = (b[2 + j] as i8 as i32 + 128) as u8;
            }
            out.set_sub(s0, d, -128.0 * d);
            out.set_sub(s0 + 1, d, -128.0 * d);
        }
        GgmlDType::Q2K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (h(b, 80), h(b, 82));
            // 256 values: two halves of 128, each four 32-value runs at shifts 0, 2, 4, 6, each
            // run two 16-value sub-blocks with their own 4-bit scale and 4-bit minimum.
            for half in 0..2 {
                let q = &qs[32 * half..32 * half + 32];
                for (shift_i, shift) in [0u32, 2, 4, 6].into_iter().enumerate() {
                    for sb in 0..2 {
                        let is = half * 8 + shift_i * 2 + sb;
                        let sc = scales[is];
                        let col = c0 + half * 128 + shift_i * 32 + sb * 16;
                        for i in 0..16 {
                            out.u[col + i] = (q[sb * 16 + i] >> shift) & 3;
                        }
                        out.set_sub(col / 16, d * (sc & 0xF) as f32, -(dmin * (sc >> 4) as f32));
                    }
                }
            }
        }
        GgmlDType::Q3K => {
            let (hmask, qs, sraw) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = h(b, 108);
            let scales = q3k_scales(sraw);
            let mut is = 0;
            let mut m = 1u8;
            for half in 0..2 {
                let q = &qs[32 * half..32 * half + 32];
                for shift in [0u32, 2, 4, 6] {
                    for sb in 0..2 {
                        let col = c0 + half * 128 + (shift as usize / 2) * 32 + sb * 16;
                        let dl = d * (scales[is] as f32 - 32.0);
                        for i in 0..16 {
                            let lo = (q[sb * 16 + i] >> shift) & 3;
                            let high = if hmask[sb * 16 + i] & m != 0 { 4 } else { 0 };
                            out.u[col + i] = lo + high; // stored value + 4, in 0..8
                        }
                        out.set_sub(col / 16, dl, -4.0 * dl);
                        is += 1;
                    }
                    m <<= 1;
                }
            }
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let sc = &b[4..16];
            let (qh, ql) = if dtype == GgmlDType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for j in 0..4 {
                let q = &ql[32 * j..32 * j + 32];
                for (part, shift) in [(0usize, 0u32), (1, 4)] {
                    let (s, mn) = scale_min_k4(2 * j + part, sc);
                    let col = c0 + 64 * j + 32 * part;
                    for i in 0..32 {
                        let mut u = (q[i] >> shift) & 0x0F;
                        if let Some(qh) = qh {
                            let bit = 2 * j + part;
                            u |= ((qh[i] >> bit) & 1) << 4;
                        }
                        out.u[col + i] = u;
                    }
                    let (dd, mm) = (d * s as f32, -(dmin * mn as f32));
                    out.set_sub(col / 16, dd, mm);
                    out.set_sub(col / 16 + 1, dd, mm);
                }
            }
        }
        GgmlDType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = h(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                for l in 0..32 {
                    let base = c0 + 128 * n + l;
                    out.u[base] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    out.u[base + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    out.u[base + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    out.u[base + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
                for (k, &s) in sc[..8].iter().enumerate() {
                    // Sub-block k of this half covers columns 16k..16k+16.
                    let dl = d * (s as i8) as f32;
                    out.set_sub((c0 + 128 * n) / 16 + k, dl, -32.0 * dl);
                }
            }
        }
        other => return Err(DecodeError::Unsupported(other)),
    }
    Ok(())
}

/// The 6-bit scale and minimum `j` of a Q4_K / Q5_K block's 12 packed scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The sixteen 6-bit scales of a Q3_K block (stored with an offset of 32).
fn q3k_scales(raw: &[u8]) -> [u8; 16] {
    let mut s = [0u8; 16];
    for i in 0..16 {
        let low = if i < 8 { raw[i] & 0x0F } else { raw[i - 8] >> 4 };
        let high = (raw[8 + i % 4] >> (2 * (i / 4))) & 3;
        s[i] = low | (high << 4);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn check_type(dtype: GgmlDType) {
        let (rows, cols) = (3, 512);
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let want = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let data = q.data().unwrap();
        let mut codes = RowCodes::with_cols(cols);
        for (r, want_row) in want.iter().enumerate() {
            decode_row(dtype, &data, cols, r, &mut codes).unwrap();
            for (c, &v) in want_row.iter().enumerate() {
                // Equal as numbers (a zero's sign may differ: `0 · d` vs `d · 8 − 8d`).
                assert_eq!(codes.value(c), v, "{dtype:?} row {r} col {c}");
            }
            if code_bits(dtype) == Some(4) {
                assert!(codes.max_code() < 16, "{dtype:?}");
                assert!(codes.pairs_share_scales(), "{dtype:?}");
            }
        }
    }

    #[test]
    fn every_block_type_decodes_exactly_as_candle_dequantizes() {
        use GgmlDType::*;
        for dtype in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K] {
            check_type(dtype);
        }
    }

    #[test]
    fn float_rows_quantize_within_half_a_step() {
        let vals: Vec<f32> = (0..64).map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.37).collect();
        let mut codes = RowCodes::with_cols(64);
        quantize_row_8bit(&vals, &mut codes);
        for (blk, v) in vals.chunks(32).enumerate() {
            let step = v.iter().fold(0f32, |a, &x| a.max(x.abs())) / 127.0;
            for (i, &x) in v.iter().enumerate() {
                assert!((codes.value(blk * 32 + i) - x).abs() <= step * 0.5 + 1e-6);
            }
        }
    }
}
