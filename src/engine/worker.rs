//! The engine thread and its handle. The handle is cheap to clone and is all the HTTP side
//! sees: `submit` either queues a request (bounded: 429 past the limit) or refuses it.

use super::batcher::{Batcher, LoraPath};
use super::scheduler::admit;
use super::sequence::Sequence;
use super::{EngineConfig, EngineError, Request, TokenEvent};
use crate::model::tokenizer::TextTokenizer;
use crate::model::Llama;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Live counters the engine publishes (read by health checks, metrics and shutdown).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Accepted but not yet in the batch.
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_tokens: AtomicUsize,
    pub steps: AtomicU64,
    pub draining: AtomicBool,
    /// Adapter names in the running batch and in the queue (for the gateway's LoRA gauge).
    pub adapters_running: std::sync::Mutex<Vec<String>>,
    pub adapters_waiting: std::sync::Mutex<Vec<String>>,
}

fn adapter_names<'a>(reqs: impl Iterator<Item = &'a Request>) -> Vec<String> {
    let mut names: Vec<String> = reqs.flat_map(|r| r.mix.entries.iter().map(|e| e.adapter.name.clone())).collect();
    names.sort();
    names.dedup();
    names
}

struct Submission {
    id: u64,
    req: Request,
    events: UnboundedSender<TokenEvent>,
    submitted_at: std::time::Instant,
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Submission>,
    stats: Arc<EngineStats>,
    cfg: EngineConfig,
    next_id: Arc<AtomicU64>,
}

impl Engine {
    /// Moves the model into a new engine thread and returns the handle.
    pub fn start(model: Llama, tok: Arc<TextTokenizer>, cfg: EngineConfig, metrics: Option<Arc<crate::metrics::Metrics>>) -> std::io::Result<Engine> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("loraplex-engine".into())
            .spawn(move || run(model, tok, cfg, rx, worker_stats, metrics))?;
        Ok(Engine { tx, stats, cfg, next_id: Arc::new(AtomicU64::new(1)) })
    }

    /// Queues one sequence; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the sequence.
    pub fn submit(&self, req: Request) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        if self.stats.draining.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.cfg.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull { waiting, limit: self.cfg.max_waiting });
        }
        let (events, rx) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Submission { id, req, events, submitted_at: std::time::Instant::now() }).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::ShuttingDown);
        }
        Ok(rx)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn config(&self) -> EngineConfig {
        self.cfg
    }

    /// Stops intake: later submissions get [`EngineError::ShuttingDown`]; running and waiting
    /// sequences still finish.
    pub fn drain(&self) {
        self.stats.draining.store(true, Ordering::SeqCst);
    }

    /// No sequence is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.stats.waiting.load(Ordering::SeqCst) == 0 && self.stats.running.load(Ordering::SeqCst) == 0
    }
}

fn run(model: Llama, tok: Arc<TextTokenizer>, cfg: EngineConfig, rx: mpsc::Receiver<Submission>, stats: Arc<EngineStats>, metrics: Option<Arc<crate::metrics::Metrics>>) {
    let mut batcher = Batcher::new(&model, &tok, LoraPath::Batched);
    batcher.prefill_chunk = cfg.max_prefill_tokens;
    batcher.metrics = metrics.clone();
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    loop {
        if batcher.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(s) => waiting.push_back(s),
                Err(_) => return, // every handle is gone
            }
        }
        waiting.extend(rx.try_iter());
        let before = waiting.len();
        waiting.retain(|s| !s.events.is_closed());
        let cancelled = before - waiting.len();
        let lens: Vec<usize> = waiting.iter().map(|s| s.req.prompt_ids.len()).collect();
        let n = admit(&lens, batcher.running.len(), cfg.max_batch_size, cfg.max_prefill_tokens);
        // Count the admitted ones as running before they leave `waiting`, so the engine never
        // looks idle while it holds a sequence.
        stats.running.fetch_add(n, Ordering::SeqCst);
        for s in waiting.drain(..n) {
            if let Some(m) = &metrics {
                m.queue_wait.observe(s.submitted_at.elapsed().as_secs_f64());
                m.adapters_per_request.observe(s.req.mix.entries.len() as f64);
            }
            let mut seq = Sequence::new(s.id, s.req, model.cfg.num_layers, s.events);
            seq.submitted_at = s.submitted_at;
            batcher.add(seq);
        }
        stats.waiting.fetch_sub(n + cancelled, Ordering::SeqCst);
        if metrics.is_some() {
            *stats.adapters_running.lock().unwrap_or_else(|p| p.into_inner()) = adapter_names(batcher.running.iter().map(|s| &s.req));
            *stats.adapters_waiting.lock().unwrap_or_else(|p| p.into_inner()) = adapter_names(waiting.iter().map(|s| &s.req));
        }
        let started = std::time::Instant::now();
        let report = batcher.step();
        if let Some(m) = &metrics {
            let secs = started.elapsed().as_secs_f64();
            if report.prefill_tokens > 0 {
                m.prefill_step.observe(secs);
            } else if report.decode_tokens > 0 {
                m.decode_step.observe(secs);
            }
            if report.sequences > 0 {
                m.batch_size.observe(report.sequences as f64);
            }
        }
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.running.store(batcher.running.len(), Ordering::SeqCst);
        stats.kv_tokens.store(batcher.kv_tokens(), Ordering::Relaxed);
        tracing::trace!(?report, "engine step");
    }
}
