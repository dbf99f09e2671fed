//! The engine thread and its handle. The handle is cheap to clone and is all the HTTP side
//! sees: `submit` either queues a request (bounded: 429 past the limit) or refuses it.

use super::batcher::{Batcher, LoraPath};
use super::kv_pool::KvPool;
use super::scheduler::IDLE_GRACE;
use super::sequence::Sequence;
use super::{Background, EngineConfig, EngineError, Request, TokenEvent};
use crate::model::tokenizer::TextTokenizer;
use crate::model::Decoder;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Live counters the engine publishes (read by health checks, metrics and shutdown).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Accepted but not yet in the batch.
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_tokens: AtomicUsize,
    /// KV blocks held by sequences, and idle ones kept by the prefix cache.
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_cached: AtomicUsize,
    pub steps: AtomicU64,
    pub draining: AtomicBool,
    /// The models (adapter or mix names, and the adapters in them) of queued requests, for the
    /// gateway's LoRA gauge.
    pub adapters_waiting: std::sync::Mutex<Vec<String>>,
}

fn adapter_names<'a>(reqs: impl Iterator<Item = &'a Request>) -> Vec<String> {
    let mut names: Vec<String> = reqs
        .flat_map(|r| {
            r.model
                .iter()
                .map(|m| m.to_string())
                .chain(r.mix.entries.iter().map(|e| e.adapter.name.clone()))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What the engine thread receives: a request's sequences, or a nudge to look at its
/// background work.
enum Inbox {
    Submit(Submission),
    Wake,
}

/// The sequences of one request, queued together (so the `n` choices of a prompt arrive in the
/// same step and share its prefill).
struct Submission {
    sequences: Vec<(u64, Request, UnboundedSender<TokenEvent>)>,
    submitted_at: std::time::Instant,
}

/// The KV pool's fixed shape, as the engine sized it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvInfo {
    pub blocks: usize,
    pub block_bytes: usize,
    /// The pool in bytes (`blocks · block_bytes`).
    pub bytes: usize,
    pub prefix_cache: bool,
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Inbox>,
    stats: Arc<EngineStats>,
    cfg: EngineConfig,
    kv: KvInfo,
    next_id: Arc<AtomicU64>,
}

impl Engine {
    /// Moves the model into a new engine thread and returns the handle.
    pub fn start(
        model: Decoder,
        tok: Arc<TextTokenizer>,
        cfg: EngineConfig,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> std::io::Result<Engine> {
        Self::start_with(model, tok, cfg, metrics, None)
    }

    /// [`Engine::start`] with background work (fine-tuning jobs) run on the same model.
    pub fn start_with(
        model: Decoder,
        tok: Arc<TextTokenizer>,
        cfg: EngineConfig,
        metrics: Option<Arc<crate::metrics::Metrics>>,
        background: Option<Arc<dyn Background>>,
    ) -> std::io::Result<Engine> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let worker_stats = stats.clone();
        let block_bytes = model.kv_block_bytes();
        let per_token = block_bytes / crate::model::kv_cache::BLOCK_TOKENS;
        let bytes = cfg.kv_cache_bytes.unwrap_or_else(|| {
            super::default_kv_cache_bytes(
                per_token,
                model.cfg.max_position_embeddings,
                cfg.max_batch_size,
            )
        });
        let blocks = (bytes / block_bytes).max(1);
        let kv = KvInfo {
            blocks,
            block_bytes,
            bytes: blocks * block_bytes,
            prefix_cache: cfg.prefix_cache && model.host_kv(),
        };
        tracing::info!(
            kv_cache_bytes = kv.bytes,
            blocks,
            tokens = blocks * crate::model::kv_cache::BLOCK_TOKENS,
            block_bytes,
            prefix_cache = kv.prefix_cache,
            configured = cfg.kv_cache_bytes.is_some(),
            "KV cache pool"
        );
        std::thread::Builder::new().name("loraplex-engine".into()).spawn({
            let cfg = cfg.clone();
            move || {
                Worker { model, tok, cfg, kv, rx, stats: worker_stats, metrics, background }.run()
            }
        })?;
        Ok(Engine { tx, stats, cfg, kv, next_id: Arc::new(AtomicU64::new(1)) })
    }

    /// The KV pool's shape.
    pub fn kv(&self) -> KvInfo {
        self.kv
    }

    /// Queues one sequence; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the sequence.
    pub fn submit(&self, req: Request) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        let mut rxs = self.submit_all(vec![req])?;
        rxs.pop().ok_or(EngineError::ShuttingDown)
    }

    /// Queues the sequences of one request together, or none of them: a request with more
    /// sequences than the queue can ever hold is refused for good
    /// ([`EngineError::TooManySequences`]), one that does not fit the queue now is refused
    /// until later ([`EngineError::QueueFull`]).
    pub fn submit_all(
        &self,
        reqs: Vec<Request>,
    ) -> Result<Vec<UnboundedReceiver<TokenEvent>>, EngineError> {
        if self.stats.draining.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        for req in &reqs {
            let blocks = crate::model::kv_cache::blocks_for(req.prompt_ids.len() + req.max_tokens);
            if blocks > self.kv.blocks {
                return Err(EngineError::TooLarge {
                    prompt: req.prompt_ids.len(),
                    max_tokens: req.max_tokens,
                    blocks,
                    capacity: self.kv.blocks,
                });
            }
        }
        let (adding, limit) = (reqs.len(), self.cfg.max_waiting);
        if adding > limit {
            return Err(EngineError::TooManySequences { sequences: adding, limit });
        }
        let reserved = self.stats.waiting.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
            (w + adding <= limit).then_some(w + adding)
        });
        if let Err(waiting) = reserved {
            return Err(EngineError::QueueFull { waiting, adding, limit });
        }
        let mut sequences = Vec::with_capacity(adding);
        let mut rxs = Vec::with_capacity(adding);
        for req in reqs {
            let (events, rx) = unbounded_channel();
            sequences.push((self.next_id.fetch_add(1, Ordering::Relaxed), req, events));
            rxs.push(rx);
        }
        let submission = Submission { sequences, submitted_at: std::time::Instant::now() };
        if self.tx.send(Inbox::Submit(submission)).is_err() {
            self.stats.waiting.fetch_sub(adding, Ordering::SeqCst);
            return Err(EngineError::ShuttingDown);
        }
        Ok(rxs)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Tells an idle engine thread to look at its background work (a job was queued).
    pub fn wake(&self) {
        let _ = self.tx.send(Inbox::Wake);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Stops intake: later submissions get [`EngineError::ShuttingDown`]; running and waiting
    /// sequences still finish.
    pub fn drain(&self) {
        self.stats.draining.store(true, Ordering::SeqCst);
    }

    /// No sequence is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.stats.waiting.load(Ordering::SeqCst) == 0
            && self.stats.running.load(Ordering::SeqCst) == 0
    }
}

/// The engine thread's whole state, moved in once.
struct Worker {
    model: Decoder,
    tok: Arc<TextTokenizer>,
    cfg: EngineConfig,
    kv: KvInfo,
    rx: mpsc::Receiver<Inbox>,
    stats: Arc<EngineStats>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    background: Option<Arc<dyn Background>>,
}

impl Worker {
    /// Steps the batch until every handle is gone.
    fn run(self) {
        let Worker { model, tok, cfg, kv, rx, stats, metrics, background } = self;
        let pool = KvPool::new(
            kv.blocks,
            model.cfg.num_layers,
            model.kv_width(),
            model.host_kv(),
            kv.prefix_cache,
        );
        let mut batcher = Batcher::with_pool(&model, &tok, LoraPath::Batched, pool);
        batcher.prefill_chunk = cfg.max_prefill_tokens;
        batcher.max_batch = cfg.max_batch_size;
        batcher.step_latency_ratio = cfg.step_latency_ratio;
        batcher.faults = cfg.faults.clone();
        let pending = || background.as_ref().filter(|b| b.pending());
        let mut since_slice = 0usize;
        let (mut slice_end, mut slice_took) = (std::time::Instant::now(), Duration::ZERO);
        let mut last_step = std::time::Instant::now();
        loop {
            if batcher.is_empty() {
                // With background work waiting, the engine waits for requests only until it
                // has been idle for the grace period.
                let wait = pending().map(|_| IDLE_GRACE.saturating_sub(last_step.elapsed()));
                let msg = match wait {
                    None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    Some(w) if w.is_zero() => Err(RecvTimeoutError::Timeout),
                    Some(w) => rx.recv_timeout(w),
                };
                match msg {
                    Ok(msg) => add(&mut batcher, msg, &model),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return, // every handle is gone
                }
            }
            for msg in rx.try_iter() {
                add(&mut batcher, msg, &model);
            }
            if let Some(bg) = pending() {
                let due = super::scheduler::background_due(
                    batcher.is_empty(),
                    last_step.elapsed(),
                    since_slice,
                    cfg.background_gap,
                    slice_end.elapsed(),
                    slice_took,
                );
                if due {
                    let started = std::time::Instant::now();
                    bg.run_slice(&model);
                    (slice_end, slice_took, since_slice) =
                        (std::time::Instant::now(), started.elapsed(), 0);
                    continue;
                }
            }
            if batcher.is_empty() {
                continue;
            }
            since_slice += 1;
            let started = std::time::Instant::now();
            let report = batcher.step();
            last_step = std::time::Instant::now();
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
                m.count_step(&report);
            }
            // Every sequence is counted as waiting or running at every moment (so the engine never
            // looks idle while it holds one): preempted and re-queued ones join `waiting` before
            // they leave `running`, admitted ones join `running` before they leave `waiting`.
            stats.waiting.fetch_add(report.preempted + report.requeued, Ordering::SeqCst);
            stats.running.store(batcher.running.len(), Ordering::SeqCst);
            stats.waiting.fetch_sub(
                report.admitted + report.cancelled_waiting + report.refused,
                Ordering::SeqCst,
            );
            stats.steps.fetch_add(1, Ordering::Relaxed);
            stats.kv_tokens.store(batcher.kv_tokens(), Ordering::Relaxed);
            let (used, idle) = batcher.pool.used_and_idle();
            stats.kv_blocks_used.store(used, Ordering::Relaxed);
            stats.kv_blocks_cached.store(idle, Ordering::Relaxed);
            if metrics.is_some() {
                *stats.adapters_waiting.lock().unwrap_or_else(|p| p.into_inner()) =
                    adapter_names(batcher.waiting.iter().map(|s| &s.req));
            }
            tracing::trace!(?report, "engine step");
        }
    }
}

fn add(batcher: &mut Batcher<'_>, msg: Inbox, model: &Decoder) {
    let Inbox::Submit(s) = msg else { return };
    for (id, req, events) in s.sequences {
        let mut seq = Sequence::new(id, req, model.cfg.num_layers, events);
        seq.submitted_at = s.submitted_at;
        batcher.add(seq);
    }
}
