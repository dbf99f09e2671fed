//! Per-sequence KV caches, so sequences of different lengths can share a batch (ragged) and
//! join or leave it at any step.
//!
//! The host storage (what the fused CPU attention reads) is paged: a table of fixed-size
//! [`KvBlock`]s of [`BLOCK_TOKENS`] tokens, each holding every layer's keys and values for its
//! tokens. Blocks are reference-counted: a full block can be shared read-only by several
//! sequences (a cached prefix, [`crate::engine::kv_pool`]); a sequence only ever writes into
//! its own tail block, which nobody else holds. A block taken from a pool carries a [`Lease`]
//! that counts it as used there until the last reference drops, so the pool's accounting
//! cannot leak whichever way a sequence ends.
//!
//! The device storage (candle tensors, any device and dtype; the composed path, which is what
//! CUDA runs) grows one head-major buffer `(n_kv_heads, capacity, head_dim)` per layer, so that
//! a cached prefix is a strided view cuBLAS multiplies as it is (a token-major buffer's
//! per-head view has no stride cuBLAS accepts). Its block table, if any, is accounting only.

use super::{ModelError, Result};
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Tokens per KV block: one key tile of the attention kernel.
pub const BLOCK_TOKENS: usize = crate::kernels::fused::KV_TILE;

/// Growth step of the device buffers, in tokens: buffers grow by copying, so not every token.
const GROW_BY: usize = 128;

/// Blocks needed for `tokens` tokens.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// One used block counted in a pool's `live` counter; released when the block is dropped.
#[derive(Debug)]
pub struct Lease(Arc<AtomicUsize>);

impl Lease {
    /// Counts one more block as used in `live`.
    pub fn take(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Lease(live.clone())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// [`BLOCK_TOKENS`] tokens of keys and values for every layer: per layer one key tile
/// `(width, 16)` and 16 value rows `(16, width)`, `width = n_kv_heads · head_dim`. An
/// accounting-only block (device storage) holds no data.
#[derive(Debug)]
pub struct KvBlock {
    k: Vec<f32>,
    v: Vec<f32>,
    width: usize,
    _lease: Option<Lease>,
}

/// Bytes of [`BLOCK_TOKENS`] tokens of K and V over `layers` layers of `width` values each, at
/// `elem` bytes per value: a host block (f32), or that much of a device buffer.
pub fn block_bytes(layers: usize, width: usize, elem: usize) -> usize {
    2 * layers * width * BLOCK_TOKENS * elem
}

impl KvBlock {
    pub fn new(layers: usize, width: usize, host: bool, lease: Option<Lease>) -> Self {
        let n = if host { layers * width * BLOCK_TOKENS } else { 0 };
        Self { k: vec![0.0; n], v: vec![0.0; n], width, _lease: lease }
    }

    /// Bytes of one host block.
    pub fn bytes(layers: usize, width: usize) -> usize {
        block_bytes(layers, width, std::mem::size_of::<f32>())
    }

    fn span(&self, layer: usize) -> std::ops::Range<usize> {
        let n = self.width * BLOCK_TOKENS;
        layer * n..(layer + 1) * n
    }

    pub fn key_tile(&self, layer: usize) -> &[f32] {
        &self.k[self.span(layer)]
    }

    pub fn value_rows(&self, layer: usize) -> &[f32] {
        &self.v[self.span(layer)]
    }

    /// Writes token-major rows `k`, `v` of `layer` at slots `at..`.
    pub fn write(&mut self, layer: usize, at: usize, k: &[f32], v: &[f32]) {
        let span = self.span(layer);
        crate::kernels::fused::write_block(
            &mut self.k[span.clone()],
            &mut self.v[span],
            at,
            k,
            v,
            self.width,
        );
    }
}

#[derive(Debug, Clone)]
enum Storage {
    /// Nothing appended yet.
    Empty,
    /// The block table holds the data; `lens[l]` tokens of layer `l` are written (a forward
    /// writes layer by layer, so they differ only inside a step).
    Host {
        lens: Vec<usize>,
        width: usize,
    },
    Device(Vec<KvCache>),
}

/// One layer of a host cache as the attention kernel reads it: key tiles and value rows, one
/// per block, and the tokens written.
pub type HostView<'a> = (Vec<&'a [f32]>, Vec<&'a [f32]>, usize);

/// The KV cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct SeqCache {
    num_layers: usize,
    capacity_hint: usize,
    storage: Storage,
    blocks: Vec<Arc<KvBlock>>,
    /// Blocks come from a pool, reserved before each step ([`SeqCache::push_block`]); the
    /// forward never allocates. Unpooled caches (tests, tools) allocate their own.
    pooled: bool,
}

impl SeqCache {
    /// An unpooled cache. `capacity_hint`: expected total tokens (prompt + generation).
    pub fn new(num_layers: usize, capacity_hint: usize) -> Self {
        Self {
            num_layers,
            capacity_hint,
            storage: Storage::Empty,
            blocks: Vec::new(),
            pooled: false,
        }
    }

    /// A cache whose blocks are reserved from a pool by the scheduler.
    pub fn pooled(num_layers: usize, capacity_hint: usize) -> Self {
        Self { pooled: true, ..Self::new(num_layers, capacity_hint) }
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Empty => 0,
            Storage::Host { lens, .. } => lens.first().copied().unwrap_or(0),
            Storage::Device(l) => l.first().map_or(0, |l| l.current_seq_len()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the cache can take host appends (it is empty or already host).
    pub fn is_host_or_empty(&self) -> bool {
        matches!(self.storage, Storage::Empty | Storage::Host { .. })
    }

    /// The block table.
    pub fn blocks(&self) -> &[Arc<KvBlock>] {
        &self.blocks
    }

    /// Adds a reserved block at the end of the table.
    pub fn push_block(&mut self, block: Arc<KvBlock>) {
        self.blocks.push(block);
    }

    /// Starts an empty cache from cached full blocks of the same prefix (host storage): the
    /// sequence continues at position `blocks.len() · 16`.
    pub fn attach_prefix(&mut self, blocks: Vec<Arc<KvBlock>>, width: usize) -> Result<()> {
        if !self.blocks.is_empty() || !matches!(self.storage, Storage::Empty) {
            return Err(ModelError::Generation(
                "a prefix attached to a non-empty KV cache; this is a bug".into(),
            ));
        }
        if blocks.is_empty() {
            return Ok(());
        }
        let len = blocks.len() * BLOCK_TOKENS;
        self.blocks = blocks;
        self.storage = Storage::Host { lens: vec![len; self.num_layers], width };
        Ok(())
    }

    /// Drops everything (blocks go back to their pool, or to its prefix cache).
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.storage = Storage::Empty;
    }

    /// Appends this step's `k`, `v` (`(n_kv_heads, t, head_dim)`) for `layer` (device storage)
    /// and returns the whole cached K and V, `(n_kv_heads, T, head_dim)` views of the buffers.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if matches!(self.storage, Storage::Empty) {
            let cap = self.capacity_hint.div_ceil(GROW_BY).max(1) * GROW_BY;
            self.storage =
                Storage::Device((0..self.num_layers).map(|_| KvCache::new(1, cap)).collect());
        }
        match &mut self.storage {
            Storage::Device(layers) => {
                Ok(layers[layer].append(&k.contiguous()?, &v.contiguous()?)?)
            }
            _ => Err(ModelError::Generation(
                "a host KV cache used by the reference attention; this is a bug".into(),
            )),
        }
    }

    /// Appends this step's token-major rows of `layer` (`width` = `n_kv_heads · head_dim`
    /// floats per token) to the host blocks.
    pub fn host_append(&mut self, layer: usize, width: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let bug = |what: &str| ModelError::Generation(format!("{what}; this is a bug"));
        if matches!(self.storage, Storage::Empty) {
            if !self.pooled {
                self.blocks.reserve(blocks_for(self.capacity_hint));
            }
            self.storage = Storage::Host { lens: vec![0; self.num_layers], width };
        }
        let Storage::Host { lens, width: w } = &mut self.storage else {
            return Err(bug("a device KV cache used by the fused attention"));
        };
        if *w != width || layer >= lens.len() {
            return Err(bug("a host KV cache of another shape"));
        }
        let n = k.len() / width.max(1);
        let (mut len, mut i) = (lens[layer], 0);
        while i < n {
            let (b, at) = (len / BLOCK_TOKENS, len % BLOCK_TOKENS);
            let m = (BLOCK_TOKENS - at).min(n - i);
            if b == self.blocks.len() {
                if self.pooled {
                    return Err(bug("a KV block used before the scheduler reserved it"));
                }
                self.blocks.push(Arc::new(KvBlock::new(self.num_layers, width, true, None)));
            }
            let block = Arc::get_mut(&mut self.blocks[b])
                .ok_or_else(|| bug("a shared KV block written"))?;
            block.write(layer, at, &k[i * width..(i + m) * width], &v[i * width..(i + m) * width]);
            len += m;
            i += m;
        }
        lens[layer] = len;
        Ok(())
    }

    /// `layer`'s key tiles and value rows, one per block, and the tokens written, if the cache
    /// is a host one.
    pub fn host_view(&self, layer: usize) -> Option<HostView<'_>> {
        let Storage::Host { lens, .. } = &self.storage else { return None };
        let len = *lens.get(layer)?;
        let used = &self.blocks[..blocks_for(len)];
        Some((
            used.iter().map(|b| b.key_tile(layer)).collect(),
            used.iter().map(|b| b.value_rows(layer)).collect(),
            len,
        ))
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn size_in_bytes(&self) -> usize {
        match &self.storage {
            Storage::Empty => 0,
            Storage::Host { width, .. } => {
                self.blocks.len() * KvBlock::bytes(self.num_layers, *width)
            }
            Storage::Device(layers) => layers
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
