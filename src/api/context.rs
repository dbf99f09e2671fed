//! What every validator of the edge reads about the served model and the server's limits: the
//! [`ModelView`] (identity, context, vocabulary, tokenizer, grammars, registry, limits), and
//! how numbers are written in refusals. It sits below `api::validate`, `api::chat`,
//! `api::rules` and `api::structured`, which all read it and none of which it imports.

use crate::config::Limits;

/// What validation needs to know about the served model.
pub struct ModelView<'a> {
    pub id: &'a str,
    pub context_len: usize,
    /// The model's logits width.
    pub vocab: usize,
    /// Structured outputs (or why they are unavailable).
    pub grammars: Result<&'a crate::structured::Grammars, &'a str>,
    pub tokenizer: &'a crate::model::tokenizer::TextTokenizer,
    pub limits: &'a Limits,
    /// The registry whose named mixes a `model` may name (none in tools that have no
    /// registry).
    pub registry: Option<&'a crate::adapters::registry::Registry>,
}

/// `x` as people write it: plain decimals for ordinary magnitudes, exponent notation for tiny
/// or huge ones (Rust's `Display` writes `1e-300` as 300 digits).
pub fn fmt_num(x: f64) -> String {
    if x == 0.0 || !x.is_finite() || (1e-4..1e15).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}
