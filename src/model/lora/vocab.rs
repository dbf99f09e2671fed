//! What an adapter changes on the vocabulary layers — the token embedding and the output head —
//! and how a step applies it, as PEFT computes it:
//! - **LoRA** (`lora_embedding_A/B` on the embedding, `lora_A/B` on the head): per token, the
//!   embedding adds `c · B A[:, t]`; per hidden row `h`, the head adds `c · B (A h)` to the
//!   logits, with `c = s · alpha / r` as on every projection. An embedding multiplied by √hidden
//!   (Gemma) scales the delta too, so the delta is added before that scale.
//! - **Replaced rows** (`modules_to_save`: every row, a trained copy of the layer; trainable
//!   tokens: some rows): the row of the layer's weight is the adapter's. PEFT's per-adapter
//!   scaling never touches them: they apply at any scale of the request.
//!
//! A request may not put two replacements on one row, nor LoRA over a row another adapter
//! replaces (PEFT refuses both): [`AdapterMix::vocab_conflict`] names the pair.

use super::super::Result;
use super::mix::AdapterMix;
use candle_core::{DType, Tensor};

/// LoRA's two factors on a vocabulary layer, transposed for the products the step runs.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// Embedding: `(vocab, r)`, row `t` = column `t` of PEFT's `lora_embedding_A`. Head:
    /// `(hidden, r)` = `lora_A`ᵀ.
    pub a_t: Tensor,
    /// `(r, hidden)` for the embedding (`lora_embedding_B`ᵀ), `(r, vocab)` for the head.
    pub b_t: Tensor,
    pub rank: usize,
    pub scaling: f64,
}

/// Rows of a vocabulary layer's weight that an adapter replaces.
#[derive(Debug, Clone)]
pub struct Rows {
    /// Sorted token ids; every id of the vocabulary for a `modules_to_save` copy.
    pub ids: Vec<u32>,
    /// `(ids.len(), hidden)`, f32, in the order of `ids`.
    pub rows: Tensor,
    /// The whole layer (`modules_to_save`), not some tokens.
    pub all: bool,
}

impl Rows {
    fn position(&self, token: u32) -> Option<usize> {
        if self.all {
            return Some(token as usize);
        }
        self.ids.binary_search(&token).ok()
    }

    fn overlaps(&self, other: &Rows) -> bool {
        self.all || other.all || self.ids.iter().any(|t| other.ids.binary_search(t).is_ok())
    }
}

/// One vocabulary layer's part of an adapter.
#[derive(Debug, Clone, Default)]
pub struct VocabLayer {
    pub lora: Option<LowRank>,
    pub rows: Option<Rows>,
}

impl VocabLayer {
    pub fn is_empty(&self) -> bool {
        self.lora.is_none() && self.rows.is_none()
    }

    pub fn resident_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.lora.as_ref().map_or(0, |l| t(&l.a_t) + t(&l.b_t))
            + self.rows.as_ref().map_or(0, |r| t(&r.rows) + r.ids.len() * 4)
    }
}

/// An adapter's changes to the embedding and the head (both empty for most adapters).
#[derive(Debug, Clone, Default)]
pub struct VocabAdapter {
    pub embed: VocabLayer,
    pub head: VocabLayer,
}

impl VocabAdapter {
    pub fn is_empty(&self) -> bool {
        self.embed.is_empty() && self.head.is_empty()
    }

    pub fn resident_bytes(&self) -> usize {
        self.embed.resident_bytes() + self.head.resident_bytes()
    }

    /// The largest LoRA scaling on either layer (what a request's scale multiplies).
    pub fn max_scaling(&self) -> Option<f64> {
        [&self.embed, &self.head]
            .into_iter()
            .filter_map(|l| l.lora.as_ref().map(|l| l.scaling.abs()))
            .reduce(f64::max)
    }
}

#[derive(Clone, Copy)]
enum Layer {
    Embed,
    Head,
}

impl Layer {
    fn of(self, v: &VocabAdapter) -> &VocabLayer {
        match self {
            Layer::Embed => &v.embed,
            Layer::Head => &v.head,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Layer::Embed => "embedding",
            Layer::Head => "output head",
        }
    }
}

impl AdapterMix {
    /// Whether some adapter of the mix changes the embedding or the head.
    pub fn touches_vocab(&self) -> bool {
        self.entries.iter().any(|e| !e.adapter.vocab.is_empty())
    }

    /// Why PEFT could not apply this mix's vocabulary parts together, naming the adapters:
    /// two replacements of one row, or LoRA over rows another adapter replaces.
    pub fn vocab_conflict(&self) -> Option<String> {
        for layer in [Layer::Embed, Layer::Head] {
            let parts: Vec<(&str, &VocabLayer)> = self
                .entries
                .iter()
                .map(|e| (e.adapter.name.as_str(), layer.of(&e.adapter.vocab)))
                .collect();
            for (i, (a, pa)) in parts.iter().enumerate() {
                let Some(ra) = &pa.rows else { continue };
                for (j, (b, pb)) in parts.iter().enumerate() {
                    if i == j {
                        continue;
                    }
                    if pb.rows.as_ref().is_some_and(|rb| j > i && ra.overlaps(rb)) {
                        return Some(format!(
                            "adapters `{a}` and `{b}` both replace rows of the {} \
                             (`modules_to_save` or trainable tokens); a row has one owner",
                            layer.name()
                        ));
                    }
                    if pb.lora.is_some() {
                        return Some(format!(
                            "adapter `{b}` puts LoRA on the {} whose rows adapter `{a}` replaces \
                             (`modules_to_save` or trainable tokens); PEFT cannot apply both",
                            layer.name()
                        ));
                    }
                }
            }
        }
        None
    }

    /// The `(part, c)` of each entry on `layer`: LoRA terms at a nonzero coefficient, and
    /// replaced rows whatever the scale.
    fn vocab_terms(&self, layer: Layer) -> impl Iterator<Item = (&VocabLayer, f64)> {
        self.entries.iter().map(move |e| (layer.of(&e.adapter.vocab), e.scale))
    }
}

/// The mixes' embedding parts applied to the looked-up rows `x` (`(n, hidden)`, before any
/// embedding scale) of `tokens`, grouped by sequence as `seq_lens` says.
pub fn embed(
    x: &Tensor,
    tokens: &[u32],
    seq_lens: &[usize],
    mixes: &[AdapterMix],
) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let dev = x.device();
    let hidden = x.dim(1)?;
    let mut pieces = Vec::with_capacity(seq_lens.len());
    let (mut rep_pos, mut rep_rows) = (Vec::new(), Vec::new());
    let mut offset = 0;
    for (mix, &len) in mixes.iter().zip(seq_lens) {
        let toks = &tokens[offset..offset + len];
        let mut delta: Option<Tensor> = None;
        for (part, scale) in mix.vocab_terms(Layer::Embed) {
            if let Some(l) = part.lora.as_ref().filter(|_| scale != 0.0) {
                let ids = Tensor::from_slice(toks, len, dev)?;
                let d = (l.a_t.index_select(&ids, 0)?.matmul(&l.b_t)? * (scale * l.scaling))?;
                delta = Some(match delta {
                    Some(acc) => (acc + d)?,
                    None => d,
                });
            }
            if let Some(r) = &part.rows {
                for (j, &t) in toks.iter().enumerate() {
                    if let Some(p) = r.position(t) {
                        rep_pos.push((offset + j) as u32);
                        rep_rows.push(r.rows.narrow(0, p, 1)?);
                    }
                }
            }
        }
        pieces.push((delta, len));
        offset += len;
    }
    // Only the head or replaced rows (no embedding LoRA term): nothing to add.
    let mut out = match pieces.iter().any(|(d, _)| d.is_some()) {
        true => {
            let full = pieces
                .into_iter()
                .map(|(d, len)| match d {
                    Some(d) => Ok(d),
                    None => Tensor::zeros((len, hidden), DType::F32, dev),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            (x32 + Tensor::cat(&full, 0)?)?
        }
        false => x32,
    };
    if !rep_pos.is_empty() {
        out = replace_along(&out, 0, &rep_pos, &Tensor::cat(&rep_rows, 0)?)?;
    }
    Ok(out.to_dtype(dtype)?)
}

/// `x` with the slices `idx` along `dim` (rows: 0, columns: 1) set to `vals`, exactly: no
/// `x + (v − x)` rounding.
fn replace_along(x: &Tensor, dim: usize, idx: &[u32], vals: &Tensor) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let dev = x.device();
    let ids = Tensor::from_slice(idx, idx.len(), dev)?;
    let full = Tensor::zeros(x.shape(), DType::F32, dev)?.index_add(&ids, vals, dim)?;
    let mut mask = vec![0u8; len];
    for &i in idx {
        mask[i as usize] = 1;
    }
    let shape = if dim == 0 { (len, 1) } else { (1, len) };
    let mask = Tensor::from_vec(mask, shape, dev)?.broadcast_as(x.shape())?;
    Ok(mask.where_cond(&full, x)?)
}

/// The mixes' head parts applied to `logits` (`(m, vocab)`, f32) of hidden rows `hidden`
/// (`(m, hidden)`), row `i` belonging to sequence `seq_of_row[i]`.
pub fn head(
    logits: Tensor,
    hidden: &Tensor,
    seq_of_row: &[usize],
    mixes: &[AdapterMix],
) -> Result<Tensor> {
    let mut pieces = Vec::new();
    let mut changed = false;
    let mut start = 0;
    while start < seq_of_row.len() {
        let seq = seq_of_row[start];
        let len = seq_of_row[start..].iter().take_while(|&&s| s == seq).count();
        let mut rows = logits.narrow(0, start, len)?;
        if let Some(mix) = mixes.get(seq).filter(|m| m.touches_vocab()) {
            let h = hidden.narrow(0, start, len)?.to_dtype(DType::F32)?;
            for (part, scale) in mix.vocab_terms(Layer::Head) {
                if let Some(l) = part.lora.as_ref().filter(|_| scale != 0.0) {
                    let d = (h.matmul(&l.a_t)?.matmul(&l.b_t)? * (scale * l.scaling))?;
                    rows = (rows + d)?;
                    changed = true;
                }
                if let Some(r) = &part.rows {
                    let vals = h.matmul(&r.rows.t()?)?;
                    rows = if r.all { vals } else { replace_along(&rows, 1, &r.ids, &vals)? };
                    changed = true;
                }
            }
        }
        pieces.push(rows);
        start += len;
    }
    if !changed {
        return Ok(logits);
    }
    Ok(Tensor::cat(&pieces, 0)?)
}
