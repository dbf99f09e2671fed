//! SentencePiece-style vocabularies stored in GGUF (`tokenizer.ggml.model = "llama"`: pieces,
//! scores and token types, no merges; Gemma, Llama 2) rebuilt as a byte-fallback BPE that
//! tokenizes as llama.cpp's SentencePiece tokenizer does: spaces become `▁`, the adjacent pair
//! whose merged piece scores highest merges first, and a character with no piece falls back to
//! its UTF-8 bytes (`<0xNN>`).

use super::{ModelError, Result};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer};

/// llama.cpp's token types.
pub const NORMAL: i32 = 1;

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Merges implied by the scores: every split of a normal piece into two pieces of the vocabulary
/// is a merge, ranked by the merged piece's score (highest first; ties by id), which makes BPE's
/// lowest-rank-first rule the same as SentencePiece's highest-score-first one.
pub fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut ranked: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(NORMAL) != NORMAL {
            continue;
        }
        for (cut, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&t[..cut]), ids.get(&t[cut..])) {
                ranked.push((scores.get(id).copied().unwrap_or(0.0), id, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked.into_iter().map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone())).collect()
}

/// The tokenizer for a SentencePiece vocabulary (special tokens are added by the caller).
pub fn tokenizer(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    if scores.len() != tokens.len() {
        return Err(ModelError::Tokenizer(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let merges = merges_from_scores(tokens, scores, types);
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(t) = unk.and_then(|u| tokens.get(u as usize)) {
        bpe = bpe.unk_token(t.clone());
    }
    let mut inner = Tokenizer::new(bpe.build().map_err(tok_err)?);
    let replace = NormalizerWrapper::Replace(Replace::new(" ", "\u{2581}").map_err(tok_err)?);
    let normalizer = if add_space_prefix {
        NormalizerWrapper::Sequence(tokenizers::normalizers::Sequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new("\u{2581}".into())),
            replace,
        ]))
    } else {
        replace
    };
    inner.with_normalizer(Some(normalizer)).map_err(tok_err)?;
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(tok_err)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    inner.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decoders))));
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
        let pieces = ["<unk>", "<0x41>", "a", "b", "c", "\u{2581}", "ab", "bc", "\u{2581}a"];
        let scores = [0.0, 0.0, -10.0, -10.0, -10.0, -10.0, -2.0, -1.0, -3.0];
        let types = [2, 6, 1, 1, 1, 1, 1, 1, 1];
        (pieces.iter().map(|s| s.to_string()).collect(), scores.to_vec(), types.to_vec())
    }

    #[test]
    fn the_highest_scoring_pair_merges_first() {
        let (t, s, ty) = vocab();
        let tok = tokenizer(&t, &s, &ty, Some(0), false).unwrap();
        // "abc": `bc` (−1) beats `ab` (−2), then `a`+`bc` is no piece, so "a", "bc".
        let ids = tok.encode("abc", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![2, 7]);
        // A space becomes ▁ and merges with the next piece; "A" falls back to its byte.
        let ids = tok.encode("a a A", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![2, 8, 5, 1]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "a a A");
    }
}
