//! The compiled-grammar cache, bounded by bytes: each entry weighs what compiling it left
//! allocated (measured, [`crate::kernels::alloc::retained`]) plus its key's text, and the
//! least recently used entries leave first. An entry heavier than the whole budget is never
//! kept (its request is served, the next one compiles again).

use super::{ConstraintSpec, Grammar};
use std::collections::HashMap;
use std::sync::Arc;

struct Entry {
    grammar: Arc<Grammar>,
    bytes: usize,
    used: u64,
}

pub struct GrammarCache {
    budget: usize,
    bytes: usize,
    clock: u64,
    entries: HashMap<ConstraintSpec, Entry>,
}

impl GrammarCache {
    pub fn new(budget: usize) -> Self {
        Self { budget, bytes: 0, clock: 0, entries: HashMap::new() }
    }

    pub fn get(&mut self, spec: &ConstraintSpec) -> Option<Arc<Grammar>> {
        self.clock += 1;
        let e = self.entries.get_mut(spec)?;
        e.used = self.clock;
        Some(e.grammar.clone())
    }

    /// Keeps `grammar` (weighing `bytes`), evicting the least recently used entries until the
    /// total fits the budget.
    pub fn insert(&mut self, spec: ConstraintSpec, grammar: Arc<Grammar>, bytes: usize) {
        let bytes = bytes.saturating_add(spec.text_len());
        if bytes > self.budget {
            return;
        }
        if let Some(old) = self.entries.remove(&spec) {
            self.bytes -= old.bytes;
        }
        while self.bytes + bytes > self.budget {
            let Some(oldest) =
                self.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
        self.clock += 1;
        self.bytes += bytes;
        self.entries.insert(spec, Entry { grammar, bytes, used: self.clock });
    }

    /// Bytes held, entries held, and the budget.
    pub fn usage(&self) -> CacheUsage {
        CacheUsage { bytes: self.bytes, entries: self.entries.len(), budget: self.budget }
    }
}

/// The cache's size, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    pub bytes: usize,
    pub entries: usize,
    pub budget: usize,
}
