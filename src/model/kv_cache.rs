//! Per-sequence KV caches: one growable K/V buffer per layer, so sequences of different
//! lengths can share a batch (ragged) and join or leave it at any step.

use super::Result;
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;

/// Growth step of the buffers, in tokens: buffers grow by copying, so not every token.
const GROW_BY: usize = 128;

/// The KV cache of one sequence across all layers. Tensors are token-major
/// `(T, n_kv_heads, head_dim)`, so the cached prefix is a contiguous slice.
#[derive(Debug, Clone)]
pub struct SeqCache {
    layers: Vec<KvCache>,
}

impl SeqCache {
    /// `capacity_hint`: expected total tokens (prompt + generation), to avoid regrowth.
    pub fn new(num_layers: usize, capacity_hint: usize) -> Self {
        let cap = capacity_hint.div_ceil(GROW_BY).max(1) * GROW_BY;
        Self { layers: (0..num_layers).map(|_| KvCache::new(0, cap)).collect() }
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.current_seq_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's `k`, `v` for `layer` and returns the whole cached K and V.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let cache = &mut self.layers[layer];
        Ok(cache.append(&k.contiguous()?, &v.contiguous()?)?)
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                [l.k_cache(), l.v_cache()]
                    .iter()
                    .filter_map(|c| c.all_data().as_ref())
                    .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                    .sum::<usize>()
            })
            .sum()
    }
}
