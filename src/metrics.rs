//! Prometheus metrics: every name as a constant here, registered once, with per-adapter labels
//! kept to a bounded set (a cap; the least-used adapters' series fold into `adapter="other"`).
//! Gauges that mirror live state (queue, KV cache, registry) are refreshed at scrape time.
//! With `gateway_metrics`, the series the Gateway API Inference Extension's endpoint picker
//! reads (vLLM's names) are exported too.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;

pub const REQUESTS_TOTAL: &str = "loraplex_requests_total";
pub const PROMPT_TOKENS_TOTAL: &str = "loraplex_prompt_tokens_total";
pub const GENERATED_TOKENS_TOTAL: &str = "loraplex_generated_tokens_total";
pub const TIME_TO_FIRST_TOKEN: &str = "loraplex_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "loraplex_inter_token_latency_seconds";
pub const REQUEST_DURATION: &str = "loraplex_request_duration_seconds";
pub const QUEUE_WAIT: &str = "loraplex_queue_wait_seconds";
pub const PREFILL_STEP: &str = "loraplex_prefill_step_duration_seconds";
pub const DECODE_STEP: &str = "loraplex_decode_step_duration_seconds";
pub const BATCH_SIZE: &str = "loraplex_batch_size";
pub const ADAPTERS_PER_REQUEST: &str = "loraplex_adapters_per_request";
pub const SEQUENCES_RUNNING: &str = "loraplex_sequences_running";
pub const SEQUENCES_WAITING: &str = "loraplex_sequences_waiting";
pub const KV_CACHE_TOKENS: &str = "loraplex_kv_cache_tokens";
pub const KV_CACHE_CAPACITY_TOKENS: &str = "loraplex_kv_cache_capacity_tokens";
pub const KV_BLOCKS: &str = "loraplex_kv_cache_blocks";
pub const KV_CACHE_BYTES: &str = "loraplex_kv_cache_bytes";
pub const PREFIX_CACHE_QUERIES: &str = "loraplex_prefix_cache_queries_total";
pub const PREFIX_CACHE_HITS: &str = "loraplex_prefix_cache_hits_total";
pub const PREEMPTIONS: &str = "loraplex_preemptions_total";
pub const PREFILL_TOKENS: &str = "loraplex_prefill_tokens_total";
pub const ENGINE_FAULTS: &str = "loraplex_engine_faults_total";
pub const MASK_COMPUTE: &str = "loraplex_structured_mask_seconds";
pub const MASK_WAIT: &str = "loraplex_structured_mask_wait_seconds";
pub const ADAPTERS: &str = "loraplex_adapters";
pub const ADAPTER_RESIDENT_BYTES: &str = "loraplex_adapter_resident_bytes";
pub const ADAPTER_BUDGET_BYTES: &str = "loraplex_adapter_budget_bytes";
pub const ADAPTER_LOADS_TOTAL: &str = "loraplex_adapter_loads_total";
pub const ADAPTER_LOAD_DURATION: &str = "loraplex_adapter_load_duration_seconds";
pub const ADAPTER_EVICTIONS_TOTAL: &str = "loraplex_adapter_evictions_total";
pub const ADAPTER_RELOADS_TOTAL: &str = "loraplex_adapter_reloads_total";
pub const GRAMMAR_CACHE_BYTES: &str = "loraplex_grammar_cache_bytes";
pub const GRAMMAR_CACHE_ENTRIES: &str = "loraplex_grammar_cache_entries";
pub const GRAMMAR_CACHE_BUDGET_BYTES: &str = "loraplex_grammar_cache_budget_bytes";
pub const BUILD_INFO: &str = "loraplex_build_info";
/// The label value for requests without adapters.
pub const BASE_LABEL: &str = "base";
/// The label value adapters past the cardinality cap share.
pub const OTHER_LABEL: &str = "other";

/// Latency buckets from 5 ms (GPU decode) to 2 minutes (long CPU prefills).
const LATENCY_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0];

/// Mask-time buckets, 10 µs to 1 s.
const MASK_BUCKETS: [f64; 12] =
    [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 0.6, 1.0];

/// Request outcome label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    ClientError,
    ServerError,
    Cancelled,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
        }
    }

    /// The outcome an HTTP status stands for.
    pub fn from_status(status: u16) -> Self {
        match status {
            429 | 503 => Outcome::Rejected,
            400..=499 => Outcome::ClientError,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Ok,
        }
    }
}

/// Live values sampled at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub running: usize,
    pub waiting: usize,
    pub kv_tokens: usize,
    pub kv_capacity: usize,
    /// KV blocks held by running sequences, idle in the prefix cache, and in the pool.
    pub kv_blocks_used: usize,
    pub kv_blocks_cached: usize,
    pub kv_blocks_total: usize,
    pub kv_cache_bytes: usize,
    pub adapters_known: usize,
    pub adapters_resident: usize,
    pub adapters_failed: usize,
    pub resident_bytes: usize,
    pub budget_bytes: usize,
    /// The compiled-grammar cache: bytes, entries, budget.
    pub grammar_cache: crate::structured::cache::CacheUsage,
    /// Adapters that can be resident at once (the protocol's `max_lora`).
    pub max_lora: usize,
    /// Resident adapters and mixes, ready to serve with no load (`running_lora_adapters`: the
    /// endpoint picker's LoRA affinity prefers endpoints that list the request's model).
    pub running_adapters: Vec<String>,
    /// Models (adapters and mixes) of queued requests (`waiting_lora_adapters`).
    pub waiting_adapters: Vec<String>,
    pub prefix_cache: bool,
}

pub struct Metrics {
    /// False: request and engine observations are skipped (overhead measurements).
    pub enabled: bool,
    registry: Registry,
    cap: usize,
    /// Uses per adapter name, and which names currently have their own series.
    labels: Mutex<LabelSet>,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub request_duration: HistogramVec,
    pub queue_wait: Histogram,
    pub prefill_step: Histogram,
    pub decode_step: Histogram,
    pub batch_size: Histogram,
    pub mask_compute: Histogram,
    pub mask_wait: Histogram,
    pub adapters_per_request: Histogram,
    pub adapter_loads: IntCounterVec,
    pub adapter_load_duration: Histogram,
    pub adapter_evictions: IntCounter,
    pub adapter_reloads: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    preemptions: IntCounter,
    prefill_tokens: IntCounter,
    faults: IntCounterVec,
    kv_blocks: IntGaugeVec,
    kv_bytes: IntGauge,
    running: IntGauge,
    waiting: IntGauge,
    kv_tokens: IntGauge,
    kv_capacity: IntGauge,
    adapters: IntGaugeVec,
    resident_bytes: IntGauge,
    budget_bytes: IntGauge,
    grammar_cache_bytes: IntGauge,
    grammar_cache_entries: IntGauge,
    grammar_cache_budget: IntGauge,
    gateway: Option<Gateway>,
}

#[derive(Default)]
struct LabelSet {
    uses: HashMap<String, u64>,
    own: std::collections::HashSet<String>,
}

struct Gateway {
    waiting: Gauge,
    running: Gauge,
    cache_usage: Gauge,
    /// The KV gauge's former name, still read by older endpoint pickers.
    cache_usage_old: Gauge,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    preemptions: IntCounter,
    lora_info: GaugeVec,
    cache_config: GaugeVec,
}

fn hist(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<Histogram> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
}

impl Metrics {
    /// Registers every series. `build` = (version, git commit, device, dtype, base model).
    pub fn new(
        label_cap: usize,
        gateway_metrics: bool,
        build: [&str; 5],
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let lat = LATENCY_BUCKETS.to_vec();
        let m = Metrics {
            enabled: true,
            cap: label_cap,
            labels: Mutex::new(LabelSet::default()),
            requests: IntCounterVec::new(Opts::new(REQUESTS_TOTAL, "Requests by endpoint, adapter and outcome (a mix counts once per adapter)."), &["endpoint", "adapter", "outcome"])?,
            prompt_tokens: IntCounterVec::new(Opts::new(PROMPT_TOKENS_TOTAL, "Prompt tokens processed, by adapter."), &["adapter"])?,
            generated_tokens: IntCounterVec::new(Opts::new(GENERATED_TOKENS_TOTAL, "Tokens generated, by adapter."), &["adapter"])?,
            ttft: hist(TIME_TO_FIRST_TOKEN, "Time from submission to the first generated token.", lat.clone())?,
            itl: hist(INTER_TOKEN_LATENCY, "Time between consecutive generated tokens of a sequence.", lat.clone())?,
            request_duration: HistogramVec::new(HistogramOpts::new(REQUEST_DURATION, "End-to-end request latency at the HTTP edge.").buckets(lat.clone()), &["endpoint"])?,
            queue_wait: hist(QUEUE_WAIT, "Time a sequence waited for a batch slot.", lat.clone())?,
            prefill_step: hist(PREFILL_STEP, "Duration of engine steps that prefilled prompt tokens.", lat.clone())?,
            decode_step: hist(DECODE_STEP, "Duration of engine steps that only decoded.", lat.clone())?,
            batch_size: hist(BATCH_SIZE, "Sequences per engine step.", vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])?,
            mask_compute: hist(MASK_COMPUTE, "Per step with constrained rows: time computing their token masks (beside the forward).", MASK_BUCKETS.to_vec())?,
            mask_wait: hist(MASK_WAIT, "Per step with constrained rows: time the step waited for its masks after the forward.", MASK_BUCKETS.to_vec())?,
            adapters_per_request: hist(ADAPTERS_PER_REQUEST, "Adapters in a request's mix.", vec![0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0])?,
            adapter_loads: IntCounterVec::new(Opts::new(ADAPTER_LOADS_TOTAL, "Adapter loads by result."), &["result"])?,
            adapter_load_duration: hist(ADAPTER_LOAD_DURATION, "Time to load and validate an adapter.", vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])?,
            adapter_evictions: IntCounter::new(ADAPTER_EVICTIONS_TOTAL, "Adapters evicted from memory (LRU, budget).")?,
            adapter_reloads: IntCounter::new(ADAPTER_RELOADS_TOTAL, "Loaded adapters replaced by a new version of their folder.")?,
            prefix_queries: IntCounter::new(PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.")?,
            prefix_hits: IntCounter::new(PREFIX_CACHE_HITS, "Prompt tokens served from the prefix cache.")?,
            preemptions: IntCounter::new(PREEMPTIONS, "Running sequences preempted for lack of KV blocks (recomputed later).")?,
            prefill_tokens: IntCounter::new(PREFILL_TOKENS, "Prompt tokens computed by the model (prefix-cache hits excluded, recomputation included).")?,
            faults: IntCounterVec::new(
                Opts::new(ENGINE_FAULTS, "Engine faults: `sequence` (one sequence failed, its batch went on), `step` (a forward failed; its sequences were re-queued)."),
                &["scope"],
            )?,
            kv_blocks: IntGaugeVec::new(Opts::new(KV_BLOCKS, "KV cache blocks (16 tokens each) by state: used by sequences, cached (idle prefix blocks, evictable), total."), &["state"])?,
            kv_bytes: IntGauge::new(KV_CACHE_BYTES, "Configured KV cache pool size in bytes.")?,
            running: IntGauge::new(SEQUENCES_RUNNING, "Sequences in the running batch.")?,
            waiting: IntGauge::new(SEQUENCES_WAITING, "Sequences waiting for a batch slot.")?,
            kv_tokens: IntGauge::new(KV_CACHE_TOKENS, "Tokens held in KV caches.")?,
            kv_capacity: IntGauge::new(KV_CACHE_CAPACITY_TOKENS, "KV cache tokens the pool holds.")?,
            adapters: IntGaugeVec::new(Opts::new(ADAPTERS, "Adapters by state."), &["state"])?,
            resident_bytes: IntGauge::new(ADAPTER_RESIDENT_BYTES, "Bytes of loaded adapter weights.")?,
            budget_bytes: IntGauge::new(ADAPTER_BUDGET_BYTES, "Adapter memory budget.")?,
            grammar_cache_bytes: IntGauge::new(GRAMMAR_CACHE_BYTES, "Bytes held by compiled structured-output grammars kept for reuse (what each compile left allocated).")?,
            grammar_cache_entries: IntGauge::new(GRAMMAR_CACHE_ENTRIES, "Compiled structured-output grammars kept for reuse.")?,
            grammar_cache_budget: IntGauge::new(GRAMMAR_CACHE_BUDGET_BYTES, "Bytes the compiled-grammar cache may hold.")?,
            gateway: if gateway_metrics {
                Some(Gateway {
                    waiting: Gauge::new("vllm:num_requests_waiting", "Requests waiting (Gateway API Inference Extension protocol).")?,
                    running: Gauge::new("vllm:num_requests_running", "Requests running (Gateway API Inference Extension protocol).")?,
                    cache_usage: Gauge::new("vllm:kv_cache_usage_perc", "KV cache utilisation, 0 to 1 (Gateway API Inference Extension protocol).")?,
                    cache_usage_old: Gauge::new("vllm:gpu_cache_usage_perc", "KV cache utilisation, 0 to 1 (the gauge's former name).")?,
                    prefix_queries: IntCounter::new("vllm:prefix_cache_queries_total", "Prefix cache queries, in queried tokens (vLLM's name).")?,
                    prefix_hits: IntCounter::new("vllm:prefix_cache_hits_total", "Prefix cache hits, in cached tokens (vLLM's name).")?,
                    preemptions: IntCounter::new("vllm:num_preemptions_total", "Cumulative preemptions (vLLM's name).")?,
                    lora_info: GaugeVec::new(
                        Opts::new("vllm:lora_requests_info", "Last update time; labels list running and waiting adapters."),
                        &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                    )?,
                    cache_config: GaugeVec::new(
                        Opts::new("vllm:cache_config_info", "KV cache configuration in labels (value 1)."),
                        &["block_size", "num_gpu_blocks", "enable_prefix_caching", "kv_cache_memory_bytes"],
                    )?,
                })
            } else {
                None
            },
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Build and configuration."),
            &["version", "commit", "device", "dtype", "model"],
        )?;
        build_info.with_label_values(&build).set(1);
        m.registry.register(Box::new(build_info))?;
        for c in [&m.requests, &m.prompt_tokens, &m.generated_tokens, &m.adapter_loads] {
            m.registry.register(Box::new(c.clone()))?;
        }
        for h in [
            &m.ttft,
            &m.itl,
            &m.queue_wait,
            &m.prefill_step,
            &m.decode_step,
            &m.batch_size,
            &m.mask_compute,
            &m.mask_wait,
            &m.adapters_per_request,
            &m.adapter_load_duration,
        ] {
            m.registry.register(Box::new(h.clone()))?;
        }
        m.registry.register(Box::new(m.request_duration.clone()))?;
        m.registry.register(Box::new(m.adapter_evictions.clone()))?;
        m.registry.register(Box::new(m.adapter_reloads.clone()))?;
        for c in [&m.prefix_queries, &m.prefix_hits, &m.preemptions, &m.prefill_tokens] {
            m.registry.register(Box::new(c.clone()))?;
        }
        m.registry.register(Box::new(m.faults.clone()))?;
        m.registry.register(Box::new(m.kv_blocks.clone()))?;
        m.registry.register(Box::new(m.kv_bytes.clone()))?;
        for g in [
            &m.running,
            &m.waiting,
            &m.kv_tokens,
            &m.kv_capacity,
            &m.resident_bytes,
            &m.budget_bytes,
            &m.grammar_cache_bytes,
            &m.grammar_cache_entries,
            &m.grammar_cache_budget,
        ] {
            m.registry.register(Box::new(g.clone()))?;
        }
        m.registry.register(Box::new(m.adapters.clone()))?;
        if let Some(g) = &m.gateway {
            for x in [&g.waiting, &g.running, &g.cache_usage, &g.cache_usage_old] {
                m.registry.register(Box::new(x.clone()))?;
            }
            for c in [&g.prefix_queries, &g.prefix_hits, &g.preemptions] {
                m.registry.register(Box::new(c.clone()))?;
            }
            m.registry.register(Box::new(g.lora_info.clone()))?;
            m.registry.register(Box::new(g.cache_config.clone()))?;
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(m)
    }

    /// The label for adapter `name`: itself if it has a series (or there is room for one under
    /// the cap), else `other`. Every call counts as a use, for [`Metrics::rebalance`].
    pub fn adapter_label(&self, name: &str) -> String {
        let mut l = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        *l.uses.entry(name.to_string()).or_default() += 1;
        if l.own.contains(name) {
            return name.to_string();
        }
        if l.own.len() < self.cap {
            l.own.insert(name.to_string());
            return name.to_string();
        }
        OTHER_LABEL.to_string()
    }

    /// Keeps the cap on the most used adapters: while an adapter counted under `other` has
    /// been used more than the least-used adapter with its own series, the latter's series are
    /// folded into `other` (values added, series removed) and the former gets its own series
    /// from then on (its earlier counts stay in `other`, so every sum is preserved).
    pub fn rebalance(&self) {
        let mut l = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let least = l
                .own
                .iter()
                .filter(|n| *n != BASE_LABEL)
                .min_by_key(|n| (l.uses.get(*n).copied().unwrap_or(0), (*n).clone()))
                .cloned();
            let best = l
                .uses
                .iter()
                .filter(|(n, _)| !l.own.contains(*n))
                .max_by_key(|(n, u)| (**u, std::cmp::Reverse((*n).clone())))
                .map(|(n, u)| (n.clone(), *u));
            match (least, best) {
                (Some(least), Some((best, uses)))
                    if uses > l.uses.get(&least).copied().unwrap_or(0) =>
                {
                    self.fold_into_other(&least);
                    l.own.remove(&least);
                    l.own.insert(best);
                }
                _ => return,
            }
        }
    }

    fn fold_into_other(&self, adapter: &str) {
        for vec in [&self.requests, &self.prompt_tokens, &self.generated_tokens] {
            for family in prometheus::core::Collector::collect(vec) {
                for m in family.get_metric() {
                    let labels: Vec<(&str, &str)> =
                        m.get_label().iter().map(|p| (p.name(), p.value())).collect();
                    if !labels.iter().any(|(k, v)| *k == "adapter" && *v == adapter) {
                        continue;
                    }
                    let value = m.get_counter().value() as u64;
                    let with_other: HashMap<&str, &str> = labels
                        .iter()
                        .map(|(k, v)| (*k, if *k == "adapter" { OTHER_LABEL } else { *v }))
                        .collect();
                    let original: HashMap<&str, &str> = labels.iter().copied().collect();
                    vec.with(&with_other).inc_by(value);
                    let _ = vec.remove(&original);
                }
            }
        }
    }

    /// Counts an admitted sequence's prefix-cache lookup, in tokens.
    fn count_prefix_lookup(&self, queried: usize, hit: usize) {
        self.prefix_queries.inc_by(queried as u64);
        self.prefix_hits.inc_by(hit as u64);
        if let Some(g) = &self.gateway {
            g.prefix_queries.inc_by(queried as u64);
            g.prefix_hits.inc_by(hit as u64);
        }
    }

    /// Counts everything one engine step reports: what it computed, what failed, its
    /// sequences' latencies, admissions, prefix lookups, preemptions and retired tokens (the
    /// step report is the engine's only source of these numbers).
    pub fn count_step(&self, r: &crate::engine::batcher::StepReport) {
        self.prefill_tokens.inc_by(r.prefill_tokens as u64);
        if r.failed > 0 {
            self.faults.with_label_values(&["sequence"]).inc_by(r.failed as u64);
        }
        if r.step_failed {
            self.faults.with_label_values(&["step"]).inc();
        }
        if !r.masks.compute.is_zero() {
            self.mask_compute.observe(r.masks.compute.as_secs_f64());
            self.mask_wait.observe(r.masks.wait.as_secs_f64());
        }
        for _ in 0..r.preempted {
            self.count_preemption();
        }
        let seen = &r.seen;
        seen.first_token.iter().for_each(|&t| self.ttft.observe(t));
        seen.inter_token.iter().for_each(|&t| self.itl.observe(t));
        for &(queued, adapters) in &seen.admitted {
            self.queue_wait.observe(queued);
            self.adapters_per_request.observe(adapters as f64);
        }
        for &(queried, hit) in &seen.prefix_lookups {
            self.count_prefix_lookup(queried, hit);
        }
        for (names, prompt, generated) in &seen.retired {
            for label in self.mix_labels(names) {
                self.prompt_tokens.with_label_values(&[&label]).inc_by(*prompt as u64);
                self.generated_tokens.with_label_values(&[&label]).inc_by(*generated as u64);
            }
        }
    }

    fn count_preemption(&self) {
        self.preemptions.inc();
        if let Some(g) = &self.gateway {
            g.preemptions.inc();
        }
    }

    /// Labels for a mix (`base` when empty).
    pub fn mix_labels(&self, names: &[String]) -> Vec<String> {
        if names.is_empty() {
            vec![BASE_LABEL.to_string()]
        } else {
            names.iter().map(|n| self.adapter_label(n)).collect()
        }
    }

    /// Counts one request (once per adapter of its mix).
    pub fn count_request(&self, endpoint: &str, adapters: &[String], outcome: Outcome) {
        if !self.enabled {
            return;
        }
        for a in self.mix_labels(adapters) {
            self.requests.with_label_values(&[endpoint, &a, outcome.as_str()]).inc();
        }
    }

    /// Renders the text exposition after refreshing the live gauges from `s`.
    pub fn render(&self, s: &Snapshot) -> String {
        self.rebalance();
        self.running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        self.kv_tokens.set(s.kv_tokens as i64);
        self.kv_capacity.set(s.kv_capacity as i64);
        self.kv_blocks.with_label_values(&["used"]).set(s.kv_blocks_used as i64);
        self.kv_blocks.with_label_values(&["cached"]).set(s.kv_blocks_cached as i64);
        self.kv_blocks.with_label_values(&["total"]).set(s.kv_blocks_total as i64);
        self.kv_bytes.set(s.kv_cache_bytes as i64);
        self.adapters.with_label_values(&["known"]).set(s.adapters_known as i64);
        self.adapters.with_label_values(&["resident"]).set(s.adapters_resident as i64);
        self.adapters.with_label_values(&["failed"]).set(s.adapters_failed as i64);
        self.resident_bytes.set(s.resident_bytes as i64);
        self.budget_bytes.set(s.budget_bytes as i64);
        self.grammar_cache_bytes.set(s.grammar_cache.bytes as i64);
        self.grammar_cache_entries.set(s.grammar_cache.entries as i64);
        self.grammar_cache_budget.set(s.grammar_cache.budget as i64);
        if let Some(g) = &self.gateway {
            g.waiting.set(s.waiting as f64);
            g.running.set(s.running as f64);
            let usage = if s.kv_blocks_total == 0 {
                0.0
            } else {
                (s.kv_blocks_used as f64 / s.kv_blocks_total as f64).min(1.0)
            };
            g.cache_usage.set(usage);
            g.cache_usage_old.set(usage);
            g.lora_info.reset();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            g.lora_info
                .with_label_values(&[
                    &s.max_lora.to_string(),
                    &s.running_adapters.join(","),
                    &s.waiting_adapters.join(","),
                ])
                .set(now);
            g.cache_config.reset();
            if s.kv_blocks_total > 0 {
                let labels = [
                    crate::model::kv_cache::BLOCK_TOKENS.to_string(),
                    s.kv_blocks_total.to_string(),
                    s.prefix_cache.to_string(),
                    s.kv_cache_bytes.to_string(),
                ];
                g.cache_config.with_label_values(&labels.each_ref().map(String::as_str)).set(1.0);
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_labels_are_capped() {
        let m = Metrics::new(100, false, ["v", "c", "cpu", "f32", "m"]).expect("metrics register");
        for i in 0..150 {
            m.count_request("completions", &[format!("a{i}")], Outcome::Ok);
        }
        let text = m.render(&Snapshot::default());
        let labels: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with(REQUESTS_TOTAL))
            .filter_map(|l| l.split("adapter=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(labels.len(), 101, "100 adapters + other");
        assert!(labels.contains(OTHER_LABEL));
        assert!(text.contains(
            r#"loraplex_requests_total{adapter="other",endpoint="completions",outcome="ok"} 50"#
        ));
        // a120 (in `other`) becomes busy: it takes the series of a least-used adapter, whose
        // count folds into `other`; the total is unchanged.
        for _ in 0..5 {
            m.count_request("completions", &["a120".to_string()], Outcome::Ok);
        }
        m.render(&Snapshot::default());
        // From now on a120 has its own series; its first 6 requests stay in `other`, which also
        // received the folded-away adapter's 1.
        m.count_request("completions", &["a120".to_string()], Outcome::Ok);
        let text = m.render(&Snapshot::default());
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with(REQUESTS_TOTAL)).collect();
        assert_eq!(series.len(), 101);
        assert!(
            text.contains(
                r#"loraplex_requests_total{adapter="a120",endpoint="completions",outcome="ok"} 1"#
            ),
            "{series:?}"
        );
        assert!(
            text.contains(
                r#"loraplex_requests_total{adapter="other",endpoint="completions",outcome="ok"} 56"#
            ),
            "{series:?}"
        );
        let total: f64 =
            series.iter().filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
        assert_eq!(total, 156.0, "folding keeps every count");
    }
}
