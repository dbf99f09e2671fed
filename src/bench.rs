//! `loraplex bench`: a load generator for a running server. N concurrent clients send
//! streaming completions, each with K adapters drawn from a pool (uniform or power-law), and
//! the run reports requests/s, output tokens/s, time to first token and inter-token latency
//! percentiles as JSON and as a markdown table row. `--make-adapters` writes synthetic PEFT
//! adapters for the pool. Traffic goes only to the given URL (loopback in our scripts).
//!
//! Two more scenarios measure the scheduler ([`Scenario`]): `prefix-reuse` (one long context,
//! many questions in turn: time to first token with and without the prefix cache) and
//! `long-prefill` (one long prompt arriving while other streams decode: their inter-token
//! latency during its prefill against their median). Every run can sample the server's
//! resident memory from `/metrics`.

use crate::adapters::writer::save_adapter;
use crate::model::{DecoderConfig, ModuleId};
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    Uniform,
    /// Adapter `i` (0-based) is drawn with weight `1 / (i + 1)`.
    PowerLaw,
    /// Client `c` always uses adapter `c mod count` (so `count` clients run `count` distinct
    /// adapters at every moment).
    PerClient,
}

/// Which server's request shape to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// loraplex: adapters by name in the `adapters` field.
    Loraplex,
    /// llama.cpp's `llama-server`: adapters by load order in its `lora` field (adapter `PREFIXi`
    /// must have been loaded as the i-th `--lora`); tokens counted from the stream when the
    /// server sends no usage.
    Llamacpp,
}

/// What the run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// N clients in closed loop (throughput, TTFT, ITL).
    Load,
    /// One `--context-tokens` context and `--questions` different questions after it, one at a
    /// time: TTFT of the first against the rest.
    PrefixReuse,
    /// `--concurrency` streams decoding `--max-tokens`; after 2 s one `--prompt-tokens` prompt:
    /// the streams' inter-token gaps during its prefill against their median outside it.
    LongPrefill,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = Scenario::Load)]
    pub scenario: Scenario,
    /// `prefix-reuse`: approximate context length in tokens.
    #[arg(long, default_value_t = 1000)]
    pub context_tokens: usize,
    /// `prefix-reuse`: questions asked after the context.
    #[arg(long, default_value_t = 16)]
    pub questions: usize,
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Adapter pool: names `PREFIX0..PREFIX{count-1}` (0 = base model only).
    #[arg(long, default_value = "synth-")]
    pub adapter_prefix: String,
    #[arg(long, default_value_t = 0)]
    pub adapter_count: usize,
    /// Adapters mixed into each request (distinct, drawn from the pool).
    #[arg(long, default_value_t = 1)]
    pub adapters_per_request: usize,
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Generated tokens per request (EOS ignored so every request has this length).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A name for this run in the report.
    #[arg(long, default_value = "run")]
    pub label: String,
    /// Append the JSON result as one line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Fraction of requests whose client hangs up mid-stream (after its first tokens): the
    /// server must cancel them and free their batch slot. Counted as `cancelled`.
    #[arg(long, default_value_t = 0.0)]
    pub disconnect_fraction: f64,
    /// Instead of benchmarking, write `adapter_count` synthetic rank-8 q/v adapters named
    /// `PREFIX{i}` into this folder (for the default model's shapes) and exit.
    #[arg(long)]
    pub make_adapters: Option<PathBuf>,
    /// The request shape of the server under test.
    #[arg(long, value_enum, default_value_t = Api::Loraplex)]
    pub api: Api,
    /// Structured outputs: client `i` constrains every request to its own JSON schema (an
    /// array of integers up to `100 + i`, longer than `--max-tokens`, so each request still
    /// generates exactly `--max-tokens` tokens). The report adds the server's mask time per step.
    #[arg(long)]
    pub json_schema_per_client: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub label: String,
    pub concurrency: usize,
    pub adapter_count: usize,
    pub adapters_per_request: usize,
    pub duration_s: f64,
    pub requests: usize,
    /// Requests that did not complete and were not hung up by the client.
    pub errors: usize,
    pub outcomes: Outcomes,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    /// The server's peak resident memory during the run (sampled from `/metrics`).
    pub peak_rss_mib: Option<f64>,
    /// Structured outputs: the server's mean time computing a step's token masks (beside the
    /// forward), and the part of it the step waited for, in ms (from `/metrics`).
    pub mask_ms_per_step: Option<f64>,
    pub mask_wait_ms_per_step: Option<f64>,
}

impl BenchReport {
    pub fn markdown_header() -> &'static str {
        "| run | clients | adapters (pool/per req) | req/s | output tok/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | errors | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|"
    }

    pub fn markdown_row(&self) -> String {
        format!(
            "| {} | {} | {}/{} | {:.2} | {:.1} | {:.0}/{:.0}/{:.0} | {:.1}/{:.1}/{:.1} | {} | {} |",
            self.label,
            self.concurrency,
            self.adapter_count,
            self.adapters_per_request,
            self.requests_per_s,
            self.output_tokens_per_s,
            self.ttft_ms.p50,
            self.ttft_ms.p95,
            self.ttft_ms.p99,
            self.itl_ms.p50,
            self.itl_ms.p95,
            self.itl_ms.p99,
            self.errors,
            self.peak_rss_mib.map_or("-".to_string(), |m| format!("{m:.0}"))
        )
    }
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles { p50: 0.0, p95: 0.0, p99: 0.0 };
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles { p50: at(0.5), p95: at(0.95), p99: at(0.99) }
}

/// What became of each request: every one lands in exactly one bucket.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcomes {
    /// Streamed to `[DONE]` with all requested tokens.
    pub completed: usize,
    /// Hung up by the client on purpose (`--disconnect-fraction`).
    pub cancelled: usize,
    /// Refused with a 4xx and an error body, by status code.
    pub rejected: std::collections::BTreeMap<u16, usize>,
    /// Answered with a 5xx.
    pub server_errors: usize,
    /// Accepted, then ended by an error event in the stream.
    pub stream_errors: usize,
    /// Accepted, then the stream broke or ended without `[DONE]` or an error: lost.
    pub lost: usize,
    /// Never reached the server (connection refused or reset before a response).
    pub connect_errors: usize,
}

impl Outcomes {
    fn add(&mut self, o: &Outcomes) {
        self.completed += o.completed;
        self.cancelled += o.cancelled;
        for (k, v) in &o.rejected {
            *self.rejected.entry(*k).or_default() += v;
        }
        self.server_errors += o.server_errors;
        self.stream_errors += o.stream_errors;
        self.lost += o.lost;
        self.connect_errors += o.connect_errors;
    }

    fn failed(&self) -> usize {
        self.rejected.values().sum::<usize>()
            + self.server_errors
            + self.stream_errors
            + self.lost
            + self.connect_errors
    }
}

#[derive(Default)]
struct ClientStats {
    requests: usize,
    outcomes: Outcomes,
    tokens: usize,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

fn draw(rng: &mut rand::rngs::StdRng, args: &BenchArgs, client: usize) -> Vec<serde_json::Value> {
    let k = args.adapters_per_request.min(args.adapter_count);
    let mut picked: Vec<usize> = Vec::with_capacity(k);
    while picked.len() < k {
        let i = match args.distribution {
            Distribution::PerClient => (client + picked.len()) % args.adapter_count,
            Distribution::Uniform => rng.random_range(0..args.adapter_count),
            Distribution::PowerLaw => {
                let total: f64 = (1..=args.adapter_count).map(|i| 1.0 / i as f64).sum();
                let mut x = rng.random_range(0.0..total);
                (0..args.adapter_count)
                    .find(|&i| {
                        x -= 1.0 / (i + 1) as f64;
                        x <= 0.0
                    })
                    .unwrap_or(args.adapter_count - 1)
            }
        };
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    match args.api {
        Api::Loraplex => picked.iter().map(|i| serde_json::json!({"name": format!("{}{i}", args.adapter_prefix), "scale": 1.0})).collect(),
        Api::Llamacpp => picked.iter().map(|i| serde_json::json!({"id": i, "scale": 1.0})).collect(),
    }
}

async fn client(args: BenchArgs, id: usize, deadline: Instant) -> ClientStats {
    let http = awc::Client::builder()
        .timeout(Duration::from_secs(600))
        .connector(
            awc::Connector::new().timeout(Duration::from_secs(600)).conn_lifetime(Duration::ZERO),
        )
        .finish();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_add(id as u64));
    let filler = "The quick brown fox jumps over the lazy dog. "
        .repeat(args.prompt_tokens.div_ceil(10).max(1));
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let mut st = ClientStats::default();
    while Instant::now() < deadline {
        // A distinct start per request: no request reuses another's cached prompt blocks.
        let prompt = format!("Request {}-{}-{}: {filler}", args.seed, id, st.requests);
        let mut body = serde_json::json!({
            "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": true, "ignore_eos": true,
            "stream_options": {"include_usage": true},
        });
        let field = match args.api {
            Api::Loraplex => "adapters",
            Api::Llamacpp => "lora",
        };
        body[field] = serde_json::Value::Array(draw(&mut rng, &args, id));
        if args.json_schema_per_client {
            body["response_format"] = client_schema(id);
        }
        if args.api == Api::Llamacpp {
            // llama-server caches prompts per slot; every request must do its own prefill, as
            // loraplex's do.
            body["cache_prompt"] = serde_json::Value::Bool(false);
        }
        let started = Instant::now();
        let hang_up =
            args.disconnect_fraction > 0.0 && rng.random::<f64>() < args.disconnect_fraction;
        st.requests += 1;
        let mut resp =
            match http.post(&url).insert_header(("connection", "close")).send_json(&body).await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) if r.status().is_server_error() => {
                    st.outcomes.server_errors += 1;
                    continue;
                }
                Ok(r) => {
                    *st.outcomes.rejected.entry(r.status().as_u16()).or_default() += 1;
                    continue;
                }
                Err(e) => {
                    if st.outcomes.connect_errors == 0 {
                        eprintln!("client {id}: request failed before a response: {e}");
                    }
                    st.outcomes.connect_errors += 1;
                    continue;
                }
            };
        let (mut buf, mut last, mut first) = (Vec::new(), started, true);
        let (mut done, mut errored, mut broke, mut events, mut tokens) =
            (false, false, false, 0usize, 0usize);
        'stream: while let Some(chunk) = resp.next().await {
            let Ok(chunk) = chunk else {
                broke = true;
                break;
            };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..pos + 2).collect();
                let text = String::from_utf8_lossy(&event);
                if text.starts_with("data: [DONE]") {
                    done = true;
                    continue;
                }
                let Some(v) = text
                    .strip_prefix("data: ")
                    .and_then(|j| serde_json::from_str::<serde_json::Value>(j.trim()).ok())
                else {
                    continue;
                };
                if v.get("error").is_some() {
                    errored = true;
                    continue;
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n as usize;
                }
                // A token event: a choice still running, or a last choice that carries text.
                let choice = &v["choices"][0];
                let has_text = choice["text"]
                    .as_str()
                    .or(choice["delta"]["content"].as_str())
                    .is_some_and(|t| !t.is_empty());
                if choice.is_object() && (choice["finish_reason"].is_null() || has_text) {
                    let now = Instant::now();
                    if first {
                        st.ttft.push((now - started).as_secs_f64() * 1e3);
                        first = false;
                    } else {
                        st.itl.push((now - last).as_secs_f64() * 1e3);
                    }
                    last = now;
                    events += 1;
                    if hang_up && events >= 2 {
                        break 'stream;
                    }
                }
            }
        }
        if tokens == 0 && args.api == Api::Llamacpp && done {
            tokens = events;
        }
        st.tokens += tokens;
        if hang_up && events >= 2 && !done {
            st.outcomes.cancelled += 1;
        } else if errored {
            st.outcomes.stream_errors += 1;
        } else if done && !broke && tokens == args.max_tokens {
            st.outcomes.completed += 1;
        } else {
            st.outcomes.lost += 1;
        }
    }
    st
}

/// Client `id`'s own JSON schema: distinct text per client (so one grammar each), and
/// unbounded enough that no request ends before `--max-tokens`.
fn client_schema(id: usize) -> serde_json::Value {
    let schema = serde_json::json!({"type": "object", "properties": {"values": {"type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 100 + id}, "minItems": 4096}},
        "required": ["values"], "additionalProperties": false});
    serde_json::json!({"type": "json_schema", "json_schema": {"name": format!("client_{id}"), "schema": schema}})
}

/// The server's `(sum, count)` of a histogram in `/metrics`, when it has one.
async fn histogram(base: &str, name: &str) -> Option<(f64, f64)> {
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    let body = http_client().get(&url).send().await.ok()?.body().limit(1 << 24).await.ok()?;
    let text = String::from_utf8_lossy(&body);
    let read = |suffix: &str| {
        let key = format!("{name}_{suffix} ");
        text.lines().find(|l| l.starts_with(&key))?.split(' ').nth(1)?.parse::<f64>().ok()
    };
    Some((read("sum")?, read("count")?))
}

/// Mean ms per observation of a histogram between two scrapes.
fn mean_ms(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let ((s0, c0), (s1, c1)) = (before.unwrap_or_default(), after?);
    (c1 > c0).then(|| (s1 - s0) / (c1 - c0) * 1e3)
}

/// Writes `count` synthetic rank-8 q/v adapters for SmolLM2-135M's shapes into `dir`.
fn make_adapters(dir: &std::path::Path, args: &BenchArgs) -> anyhow::Result<()> {
    let cfg = DecoderConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        ..DecoderConfig::tiny()
    };
    let dev = candle_core::Device::Cpu;
    let config = crate::adapters::synth::random_config(8, &["q_proj", "v_proj"])?;
    for i in 0..args.adapter_count {
        let name = format!("{}{i}", args.adapter_prefix);
        let a = crate::adapters::synth::random_adapter(
            &name,
            &cfg,
            8,
            &["q_proj", "v_proj"],
            args.seed + i as u64,
            &dev,
        )?;
        let weights: Vec<_> = ModuleId::all(cfg.num_layers)
            .filter_map(|id| a.module(id).map(|w| (id, w.a.clone(), w.b.clone())))
            .collect();
        save_adapter(&dir.join(&name), &config, &weights)?;
    }
    println!("wrote {} adapters to {}", args.adapter_count, dir.display());
    Ok(())
}

fn http_client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(600))
        .connector(
            awc::Connector::new().timeout(Duration::from_secs(600)).conn_lifetime(Duration::ZERO),
        )
        .finish()
}

/// Sends one streaming completion and returns when each token event arrived (after `sent`).
async fn token_times(
    http: &awc::Client,
    url: &str,
    mut body: serde_json::Value,
) -> anyhow::Result<(Instant, Vec<Instant>)> {
    body["stream"] = serde_json::Value::Bool(true);
    let sent = Instant::now();
    let mut resp = http
        .post(url)
        .insert_header(("connection", "close"))
        .send_json(&body)
        .await
        .map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    if !resp.status().is_success() {
        let text =
            resp.body().await.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        bail!("HTTP {}: {text}", resp.status());
    }
    let (mut buf, mut times, mut done) = (Vec::new(), Vec::new(), false);
    while let Some(chunk) = resp.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| anyhow::anyhow!("stream broke: {e}"))?);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let text = String::from_utf8_lossy(&event);
            if text.starts_with("data: [DONE]") {
                done = true;
            } else if let Some(v) = text
                .strip_prefix("data: ")
                .and_then(|j| serde_json::from_str::<serde_json::Value>(j.trim()).ok())
            {
                if v.get("error").is_some() {
                    bail!("stream error: {v}");
                }
                if v["choices"][0].is_object() {
                    times.push(Instant::now());
                }
            }
        }
    }
    if !done {
        bail!("the stream ended without [DONE]");
    }
    Ok((sent, times))
}

/// Samples the server's `process_resident_memory_bytes` every 250 ms until `stop`; the peak.
async fn peak_rss(
    base: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Option<f64> {
    let http = http_client();
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    let mut peak: Option<f64> = None;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        if let Ok(mut r) = http.get(&url).send().await {
            if let Ok(body) = r.body().limit(1 << 24).await {
                let text = String::from_utf8_lossy(&body);
                if let Some(v) = text
                    .lines()
                    .find(|l| l.starts_with("process_resident_memory_bytes "))
                    .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
                {
                    peak = Some(peak.map_or(v, |p: f64| p.max(v)));
                }
            }
        }
        actix_web::rt::time::sleep(Duration::from_millis(250)).await;
    }
    peak
}

/// Text of about `tokens` tokens, distinct per `seed` from its first words on.
fn passage(seed: u64, tokens: usize) -> String {
    let words = [
        "river", "castle", "merchant", "winter", "harbour", "council", "bridge", "library",
        "valley", "engine", "market", "scholar",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut text = format!("Passage {seed}.");
    // Each word is one token, each twelfth word also carries a period.
    for i in 0..(tokens.saturating_sub(4) * 12 / 13) {
        text.push(' ');
        text.push_str(words[rng.random_range(0..words.len())]);
        if i % 12 == 11 {
            text.push('.');
        }
    }
    text
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefixReuseReport {
    pub label: String,
    pub context_tokens: usize,
    pub questions: usize,
    pub first_ttft_ms: f64,
    /// TTFT of questions 2.., median and worst.
    pub rest_ttft_ms: Percentiles,
    pub rest_max_ms: f64,
    /// Median TTFT of the rest over the first's.
    pub ratio: f64,
}

async fn prefix_reuse(args: &BenchArgs) -> anyhow::Result<PrefixReuseReport> {
    let http = http_client();
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let context = passage(args.seed, args.context_tokens);
    let mut ttfts = Vec::new();
    for q in 0..args.questions.max(2) {
        let prompt = format!(
            "{context}\nQuestion {q}: what does the passage say about item number {q}?\nAnswer:"
        );
        let body = serde_json::json!({"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": true, "adapters": draw(&mut rand::rngs::StdRng::seed_from_u64(args.seed), args, 0)});
        let (sent, times) = token_times(&http, &url, body).await?;
        let first = times.first().ok_or_else(|| anyhow::anyhow!("no token streamed"))?;
        ttfts.push((*first - sent).as_secs_f64() * 1e3);
    }
    let rest = ttfts[1..].to_vec();
    let rest_max = rest.iter().copied().fold(0.0, f64::max);
    let p = percentiles(rest);
    Ok(PrefixReuseReport {
        label: args.label.clone(),
        context_tokens: args.context_tokens,
        questions: ttfts.len(),
        first_ttft_ms: ttfts[0],
        ratio: p.p50 / ttfts[0],
        rest_ttft_ms: p,
        rest_max_ms: rest_max,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct LongPrefillReport {
    pub label: String,
    pub streams: usize,
    pub prompt_tokens: usize,
    /// The long prompt's time to its (only) token.
    pub long_ttft_ms: f64,
    /// The streams' gaps outside the prefill (median) and during it.
    pub itl_median_ms: f64,
    pub during_ms: Percentiles,
    pub during_max_ms: f64,
    /// p99 during the prefill over the median outside it.
    pub ratio: f64,
}

async fn long_prefill(args: &BenchArgs) -> anyhow::Result<LongPrefillReport> {
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let streams: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let (url, args) = (url.clone(), args.clone());
            actix_web::rt::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed + i as u64);
                let body = serde_json::json!({"prompt": format!("Stream {i}: once upon a time"), "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": true, "adapters": draw(&mut rng, &args, i)});
                token_times(&http_client(), &url, body).await
            })
        })
        .collect();
    actix_web::rt::time::sleep(Duration::from_secs(2)).await;
    let body = serde_json::json!({"prompt": passage(args.seed + 1000, args.prompt_tokens), "max_tokens": 1, "temperature": 0});
    let (t0, long) = token_times(&http_client(), &url, body).await?;
    let t1 = *long.first().ok_or_else(|| anyhow::anyhow!("the long prompt streamed no token"))?;
    let (mut outside, mut during) = (Vec::new(), Vec::new());
    for s in streams {
        let (_, times) = s.await.context("stream task panicked")??;
        for w in times.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64() * 1e3;
            // A gap that overlaps the prefill window is a gap "during" it.
            if w[1] > t0 && w[0] < t1 {
                during.push(gap);
            } else {
                outside.push(gap);
            }
        }
    }
    if during.is_empty() {
        bail!("no stream was decoding during the long prefill: raise --max-tokens");
    }
    let median = percentiles(outside).p50;
    let during_max = during.iter().copied().fold(0.0, f64::max);
    let d = percentiles(during);
    Ok(LongPrefillReport {
        label: args.label.clone(),
        streams: args.concurrency,
        prompt_tokens: args.prompt_tokens,
        long_ttft_ms: (t1 - t0).as_secs_f64() * 1e3,
        itl_median_ms: median,
        ratio: d.p99 / median,
        during_ms: d,
        during_max_ms: during_max,
    })
}

fn emit(json: String, row: String, header: &str, out: &Option<PathBuf>) -> anyhow::Result<()> {
    println!("{json}");
    println!("{header}\n{row}");
    if let Some(path) = out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{json}")?;
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.make_adapters {
        return make_adapters(dir, &args);
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    match args.scenario {
        Scenario::Load => {}
        Scenario::PrefixReuse => {
            let r = actix_web::rt::System::new().block_on(prefix_reuse(&args))?;
            let row = format!(
                "| {} | {} | {} | {:.0} | {:.0} / {:.0} | {:.3} |",
                r.label,
                r.context_tokens,
                r.questions,
                r.first_ttft_ms,
                r.rest_ttft_ms.p50,
                r.rest_max_ms,
                r.ratio
            );
            return emit(serde_json::to_string(&r)?, row, "| run | context tokens | questions | TTFT q1 ms | TTFT q2.. median / max ms | ratio |\n|---|---|---|---|---|---|", &args.json_out);
        }
        Scenario::LongPrefill => {
            let r = actix_web::rt::System::new().block_on(long_prefill(&args))?;
            let row = format!(
                "| {} | {} | {} | {:.0} | {:.1} | {:.0} / {:.0} | {:.2} |",
                r.label,
                r.streams,
                r.prompt_tokens,
                r.long_ttft_ms,
                r.itl_median_ms,
                r.during_ms.p99,
                r.during_max_ms,
                r.ratio
            );
            return emit(serde_json::to_string(&r)?, row, "| run | streams | long prompt tokens | its TTFT ms | ITL median ms | ITL during prefill p99 / max ms | p99 / median |\n|---|---|---|---|---|---|---|", &args.json_out);
        }
    }
    let report = actix_web::rt::System::new().block_on(async {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let masks = [crate::metrics::MASK_COMPUTE, crate::metrics::MASK_WAIT];
        let masks_before =
            [histogram(&args.url, masks[0]).await, histogram(&args.url, masks[1]).await];
        let sampler = actix_web::rt::spawn(peak_rss(args.url.clone(), stop.clone()));
        let started = Instant::now();
        let deadline = started + Duration::from_secs(args.duration_secs);
        let tasks: Vec<_> = (0..args.concurrency)
            .map(|i| actix_web::rt::spawn(client(args.clone(), i, deadline)))
            .collect();
        let mut all = ClientStats::default();
        for t in tasks {
            let s = t.await.context("bench client panicked")?;
            all.requests += s.requests;
            all.outcomes.add(&s.outcomes);
            all.tokens += s.tokens;
            all.ttft.extend(s.ttft);
            all.itl.extend(s.itl);
        }
        let secs = started.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let peak = sampler.await.ok().flatten();
        let masks_after =
            [histogram(&args.url, masks[0]).await, histogram(&args.url, masks[1]).await];
        anyhow::Ok(BenchReport {
            mask_ms_per_step: mean_ms(masks_before[0], masks_after[0]),
            mask_wait_ms_per_step: mean_ms(masks_before[1], masks_after[1]),
            peak_rss_mib: peak.map(|b| b / (1024.0 * 1024.0)),
            label: args.label.clone(),
            concurrency: args.concurrency,
            adapter_count: args.adapter_count,
            adapters_per_request: args.adapters_per_request.min(args.adapter_count),
            duration_s: secs,
            requests: all.requests,
            errors: all.outcomes.failed(),
            outcomes: all.outcomes.clone(),
            requests_per_s: all.outcomes.completed as f64 / secs,
            output_tokens_per_s: all.tokens as f64 / secs,
            ttft_ms: percentiles(all.ttft),
            itl_ms: percentiles(all.itl),
        })
    })?;
    emit(
        serde_json::to_string(&report)?,
        report.markdown_row(),
        BenchReport::markdown_header(),
        &args.json_out,
    )
}
