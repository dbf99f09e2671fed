//! Per-sequence KV caches: one growable K/V buffer per layer, so sequences of different
//! lengths can share a batch (ragged) and join or leave it at any step.
//!
//! Two storages, chosen at the first append by the attention path that uses the cache: plain
//! host `Vec<f32>`s that the fused CPU attention reads and appends to in place, or candle
//! tensors (any device and dtype) for the composed reference path.

use super::{ModelError, Result};
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;

/// Growth step of the device buffers, in tokens: buffers grow by copying, so not every token.
const GROW_BY: usize = 128;

/// One layer's host K and V, f32: keys in tiles of 16 tokens laid out for the attention
/// kernel ([`crate::kernels::fused::append_key_tiles`]), values token-major
/// `(len, n_kv_heads, head_dim)`.
#[derive(Debug, Clone, Default)]
pub struct HostKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub len: usize,
}

impl HostKv {
    /// Appends this step's rows (token-major, `kv_heads · head_dim` wide).
    pub fn append(&mut self, k: &[f32], v: &[f32], kv_heads: usize, head_dim: usize) {
        crate::kernels::fused::append_key_tiles(&mut self.k, self.len, k, kv_heads, head_dim);
        self.v.extend_from_slice(v);
        self.len += k.len() / (kv_heads * head_dim);
    }
}

#[derive(Debug, Clone)]
enum Layers {
    /// Nothing appended yet.
    Empty,
    Host { layers: Vec<HostKv>, width: usize },
    Device(Vec<KvCache>),
}

/// The KV cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct SeqCache {
    num_layers: usize,
    capacity_hint: usize,
    layers: Layers,
}

impl SeqCache {
    /// `capacity_hint`: expected total tokens (prompt + generation), to avoid regrowth.
    pub fn new(num_layers: usize, capacity_hint: usize) -> Self {
        Self { num_layers, capacity_hint, layers: Layers::Empty }
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> usize {
        match &self.layers {
            Layers::Empty => 0,
            Layers::Host { layers, .. } => layers.first().map_or(0, |l| l.len),
            Layers::Device(l) => l.first().map_or(0, |l| l.current_seq_len()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the cache can take host appends (it is empty or already host).
    pub fn is_host_or_empty(&self) -> bool {
        matches!(self.layers, Layers::Empty | Layers::Host { .. })
    }

    /// Appends this step's `k`, `v` for `layer` (device storage) and returns the whole cached K
    /// and V, `(T, n_kv_heads, head_dim)` contiguous prefixes of the buffers.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if matches!(self.layers, Layers::Empty) {
            let cap = self.capacity_hint.div_ceil(GROW_BY).max(1) * GROW_BY;
            self.layers = Layers::Device((0..self.num_layers).map(|_| KvCache::new(0, cap)).collect());
        }
        match &mut self.layers {
            Layers::Device(layers) => Ok(layers[layer].append(&k.contiguous()?, &v.contiguous()?)?),
            _ => Err(ModelError::Generation("a host KV cache used by the reference attention; this is a bug".into())),
        }
    }

    /// The host buffers of `layer` (`width` = `n_kv_heads · head_dim` floats per token),
    /// created on first use.
    pub fn host_layer(&mut self, layer: usize, width: usize) -> Result<&mut HostKv> {
        if matches!(self.layers, Layers::Empty) {
            let reserve = self.capacity_hint * width;
            let tiled = self.capacity_hint.div_ceil(crate::kernels::fused::KV_TILE) * crate::kernels::fused::KV_TILE * width;
            let layers = (0..self.num_layers).map(|_| HostKv { k: Vec::with_capacity(tiled), v: Vec::with_capacity(reserve), len: 0 }).collect();
            self.layers = Layers::Host { layers, width };
        }
        match &mut self.layers {
            Layers::Host { layers, width: w } if *w == width => Ok(&mut layers[layer]),
            _ => Err(ModelError::Generation("a device KV cache used by the fused attention; this is a bug".into())),
        }
    }

    /// The host buffers of `layer`, if the cache is a host one.
    pub fn host_layer_ref(&self, layer: usize) -> Option<&HostKv> {
        match &self.layers {
            Layers::Host { layers, .. } => layers.get(layer),
            _ => None,
        }
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn size_in_bytes(&self) -> usize {
        match &self.layers {
            Layers::Empty => 0,
            Layers::Host { layers, .. } => layers.iter().map(|l| (l.k.capacity() + l.v.capacity()) * 4).sum(),
            Layers::Device(layers) => layers
                .iter()
                .map(|l| {
                    [l.k_cache(), l.v_cache()]
                        .iter()
                        .filter_map(|c| c.all_data().as_ref())
                        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                        .sum::<usize>()
                })
                .sum(),
        }
    }
}
