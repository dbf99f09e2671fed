//! The KV block pool: a budget of fixed-size blocks shared by every sequence, and the prefix
//! cache over it.
//!
//! A block is *used* while anything holds it (a sequence's table or the prefix cache): its
//! [`Lease`] counts it, so the count cannot leak. The prefix cache keys each full block by the
//! chain of token blocks before it *and* the adapter mix that computed it ([`MixKey`]: any LoRA
//! term changes the hidden states later layers' K/V come from). Cached blocks outlive their
//! sequence and are evicted least-recently-used when an allocation needs room, but only while
//! no sequence holds them.

use crate::model::kv_cache::{KvBlock, Lease, SeqCache, BLOCK_TOKENS};
use crate::model::lora::{AdapterMix, LoraAdapter};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

/// Identity of an adapter mix for the prefix cache: names, versions and exact scales, in
/// order, and the loaded adapters themselves (weakly), so a reloaded adapter never matches
/// the blocks of the copy it replaced even where its name and version repeat.
#[derive(Debug)]
pub struct MixKey {
    hash: u64,
    entries: Vec<(Weak<LoraAdapter>, u64)>,
}

impl MixKey {
    pub fn of(mix: &AdapterMix) -> Self {
        let mut h = DefaultHasher::new();
        mix.entries.len().hash(&mut h);
        for e in &mix.entries {
            (&e.adapter.name, e.adapter.version, e.scale.to_bits()).hash(&mut h);
        }
        Self {
            hash: h.finish(),
            entries: mix
                .entries
                .iter()
                .map(|e| (Arc::downgrade(&e.adapter), e.scale.to_bits()))
                .collect(),
        }
    }

    fn same(&self, other: &MixKey) -> bool {
        self.hash == other.hash
            && self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(a, b)| Weak::ptr_eq(&a.0, &b.0) && a.1 == b.1)
    }
}

/// Chain hash of a full block: the previous block's hash (0 for the first), the mix and the
/// block's tokens.
pub fn block_hash(parent: u64, mix: &MixKey, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    (parent, mix.hash, tokens).hash(&mut h);
    h.finish()
}

/// Chain hashes of every full block of `tokens` under `mix`, from the start: the keys
/// [`KvPool::register`] gives those blocks once they are computed.
pub fn chain_hashes(tokens: &[u32], mix: &MixKey) -> Vec<u64> {
    let mut parent = 0;
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|chunk| {
            parent = block_hash(parent, mix, chunk);
            parent
        })
        .collect()
}

struct Entry {
    block: Arc<KvBlock>,
    parent: u64,
    tokens: Vec<u32>,
    mix: Arc<MixKey>,
    last_used: u64,
}

/// Where a sequence's prefix-cache chain stands: the hashes of its leading full blocks that
/// are known to the cache (matched at admission or registered since).
#[derive(Debug, Default, Clone)]
pub struct PrefixChain {
    pub hashes: Vec<u64>,
}

/// What the prefix cache holds for a prompt ([`KvPool::peek`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peek {
    /// Chain hashes of the prompt's full blocks looked at.
    pub hashes: Vec<u64>,
    /// Leading blocks the cache holds.
    pub hits: usize,
    /// Of those, the ones no sequence holds.
    pub idle: usize,
}

/// Running totals the metrics read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounters {
    /// Prompt tokens looked up in the prefix cache (admitted sequences only).
    pub queried_tokens: u64,
    /// Of those, tokens served from cached blocks.
    pub hit_tokens: u64,
    pub preemptions: u64,
}

/// The pool. Owned by the engine thread (or a caller's batcher).
pub struct KvPool {
    capacity: usize,
    live: Arc<AtomicUsize>,
    layers: usize,
    width: usize,
    /// Blocks carry data (host storage) or count only (device storage).
    host: bool,
    /// `None`: prefix caching is off.
    cache: Option<HashMap<u64, Entry>>,
    tick: u64,
    pub counters: PoolCounters,
}

impl KvPool {
    /// `capacity` blocks of `layers × width` floats each for K and V.
    pub fn new(
        capacity: usize,
        layers: usize,
        width: usize,
        host: bool,
        prefix_cache: bool,
    ) -> Self {
        Self {
            capacity,
            live: Arc::new(AtomicUsize::new(0)),
            layers,
            width,
            host,
            cache: (prefix_cache && host).then(HashMap::new),
            tick: 0,
            counters: PoolCounters::default(),
        }
    }

    /// A pool that never runs out (tools and tests that do not exercise the budget).
    pub fn unbounded(layers: usize, width: usize, host: bool) -> Self {
        Self::new(usize::MAX / 2, layers, width, host, false)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn prefix_caching(&self) -> bool {
        self.cache.is_some()
    }

    /// Blocks held by anything, cached ones included.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Cached blocks no sequence holds (evictable).
    pub fn idle_cached(&self) -> usize {
        self.cache
            .as_ref()
            .map_or(0, |c| c.values().filter(|e| Arc::strong_count(&e.block) == 1).count())
    }

    /// Blocks in use by sequences (idle cached ones count as free, as vLLM counts them), and
    /// the idle cached ones: one pass over the cache.
    pub fn used_and_idle(&self) -> (usize, usize) {
        let idle = self.idle_cached();
        (self.live() - idle, idle)
    }

    pub fn used(&self) -> usize {
        self.used_and_idle().0
    }

    /// Blocks an allocation could get now, evicting idle cached ones.
    pub fn available(&self) -> usize {
        self.capacity.saturating_sub(self.live()) + self.idle_cached()
    }

    /// One empty block, evicting the least recently used idle cached block if the pool is full.
    pub fn allocate(&mut self) -> Option<Arc<KvBlock>> {
        if self.live() >= self.capacity && !self.evict_one() {
            return None;
        }
        Some(Arc::new(KvBlock::new(
            self.layers,
            self.width,
            self.host,
            Some(Lease::take(&self.live)),
        )))
    }

    fn evict_one(&mut self) -> bool {
        let Some(cache) = &mut self.cache else { return false };
        let victim = cache
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.block) == 1)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(h, _)| *h);
        victim.is_some_and(|h| cache.remove(&h).is_some())
    }

    /// The cached blocks that continue `tokens` under `mix` from the start, at most
    /// `max_blocks`, with their chain. Touches them (LRU).
    pub fn lookup(
        &mut self,
        tokens: &[u32],
        mix: &MixKey,
        max_blocks: usize,
    ) -> (Vec<Arc<KvBlock>>, PrefixChain) {
        let Some(cache) = &mut self.cache else { return (Vec::new(), PrefixChain::default()) };
        self.tick += 1;
        let (mut blocks, mut chain, mut parent) = (Vec::new(), PrefixChain::default(), 0u64);
        for chunk in tokens.chunks_exact(BLOCK_TOKENS).take(max_blocks) {
            let h = block_hash(parent, mix, chunk);
            match cache.get_mut(&h) {
                Some(e) if e.parent == parent && e.tokens == chunk && e.mix.same(mix) => {
                    e.last_used = self.tick;
                    blocks.push(e.block.clone());
                    chain.hashes.push(h);
                    parent = h;
                }
                _ => break,
            }
        }
        (blocks, chain)
    }

    /// What [`KvPool::lookup`] would find, without touching anything: the chain hashes of the
    /// full blocks of `tokens` (at most `max_blocks`), how many leading ones the cache holds,
    /// and how many of those are idle (held by the cache alone).
    pub fn peek(&self, tokens: &[u32], mix: &MixKey, max_blocks: usize) -> Peek {
        let mut out = Peek::default();
        let mut matching = self.cache.is_some();
        for chunk in tokens.chunks_exact(BLOCK_TOKENS).take(max_blocks) {
            let parent = out.hashes.last().copied().unwrap_or(0);
            let h = block_hash(parent, mix, chunk);
            let hit = self
                .cache
                .as_ref()
                .filter(|_| matching)
                .and_then(|c| c.get(&h))
                .filter(|e| e.parent == parent && e.tokens == chunk && e.mix.same(mix));
            match hit {
                Some(e) => {
                    out.hits += 1;
                    out.idle += usize::from(Arc::strong_count(&e.block) == 1);
                }
                None => matching = false,
            }
            out.hashes.push(h);
        }
        out
    }

    /// Records the outcome of an admitted sequence's lookup.
    pub fn count_lookup(&mut self, queried: usize, hit: usize) {
        if self.cache.is_some() {
            self.counters.queried_tokens += queried as u64;
            self.counters.hit_tokens += hit as u64;
        }
    }

    /// Puts the sequence's full blocks past `chain` into the cache. `tokens` are the tokens
    /// its cache holds, in order.
    pub fn register(
        &mut self,
        cache: &SeqCache,
        tokens: &[u32],
        mix: &Arc<MixKey>,
        chain: &mut PrefixChain,
    ) {
        let Some(map) = &mut self.cache else { return };
        let full =
            (cache.len() / BLOCK_TOKENS).min(cache.blocks().len()).min(tokens.len() / BLOCK_TOKENS);
        if chain.hashes.len() >= full {
            return;
        }
        self.tick += 1;
        for b in chain.hashes.len()..full {
            let parent = chain.hashes.last().copied().unwrap_or(0);
            let chunk = &tokens[b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS];
            let h = block_hash(parent, mix, chunk);
            // An equal block computed by another sequence meanwhile stays the cached one.
            let e = map.entry(h).or_insert_with(|| Entry {
                block: cache.blocks()[b].clone(),
                parent,
                tokens: chunk.to_vec(),
                mix: mix.clone(),
                last_used: 0,
            });
            e.last_used = self.tick;
            chain.hashes.push(h);
        }
    }

    /// Drops every idle cached block (tests: the pool must then be empty).
    pub fn clear_cache(&mut self) {
        if let Some(c) = &mut self.cache {
            c.retain(|_, e| Arc::strong_count(&e.block) > 1);
        }
    }
}
