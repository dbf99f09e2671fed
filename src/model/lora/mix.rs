//! A request's adapter mix and the terms each projection adds: `Σ_i c_i · B_i A_i x` with
//! `c_i = s_i · alpha_i / r_i` (the request's scale times the module's scaling), zero-scale
//! entries skipped so a zero scale is bit-for-bit the base (DoRA terms, which rescale, kept).

use super::super::ModuleId;
use super::weights::{LoraAdapter, LoraWeights};
use std::sync::Arc;

/// One adapter of a mix with the request's scale `s_i`.
#[derive(Debug, Clone)]
pub struct MixEntry {
    pub adapter: Arc<LoraAdapter>,
    pub scale: f64,
}

/// The adapters a request applies, each with its own scale. Empty = the base model.
#[derive(Debug, Clone, Default)]
pub struct AdapterMix {
    pub entries: Vec<MixEntry>,
}

impl AdapterMix {
    pub fn new(entries: Vec<MixEntry>) -> Self {
        Self { entries }
    }

    pub fn single(adapter: Arc<LoraAdapter>, scale: f64) -> Self {
        Self { entries: vec![MixEntry { adapter, scale }] }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The same adapters (by identity, not by name) with the same scales.
    pub fn same_as(&self, other: &AdapterMix) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(a, b)| Arc::ptr_eq(&a.adapter, &b.adapter) && a.scale == b.scale)
    }

    /// The `(weights, c_i)` terms that touch `id`, in the mix's order, with
    /// `c_i = s_i · scaling_i`. Zero-scale LoRA entries are skipped, so a zero scale leaves the
    /// base output bit-for-bit unchanged; a zero-scale DoRA entry is kept, since PEFT still
    /// applies its magnitude ([`super::dora`]).
    pub fn terms(&self, id: ModuleId) -> impl Iterator<Item = (&LoraWeights, f64)> {
        self.entries.iter().filter_map(move |e| {
            e.adapter
                .module(id)
                .filter(|w| e.scale != 0.0 || w.dora.is_some())
                .map(|w| (w, e.scale * w.scaling))
        })
    }

    /// Whether some term of `id` is a DoRA one (it rescales the module's running result).
    pub fn rescales(&self, id: ModuleId) -> bool {
        self.terms(id).any(|(w, _)| w.dora.is_some())
    }
}
