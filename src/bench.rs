//! `loraplex bench`: a load generator for a running server. N concurrent clients send
//! streaming completions, each with K adapters drawn from a pool (uniform or power-law), and
//! the run reports requests/s, output tokens/s, time to first token and inter-token latency
//! percentiles as JSON and as a markdown table row. `--make-adapters` writes synthetic PEFT
//! adapters for the pool. Traffic goes only to the given URL (loopback in our scripts).

use crate::adapters::writer::save_adapter;
use crate::model::{LlamaConfig, ModuleId};
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

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
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
}

impl BenchReport {
    pub fn markdown_header() -> &'static str {
        "| run | clients | adapters (pool/per req) | req/s | output tok/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | errors |\n|---|---|---|---|---|---|---|---|"
    }

    pub fn markdown_row(&self) -> String {
        format!(
            "| {} | {} | {}/{} | {:.2} | {:.1} | {:.0}/{:.0}/{:.0} | {:.1}/{:.1}/{:.1} | {} |",
            self.label, self.concurrency, self.adapter_count, self.adapters_per_request, self.requests_per_s, self.output_tokens_per_s,
            self.ttft_ms.p50, self.ttft_ms.p95, self.ttft_ms.p99, self.itl_ms.p50, self.itl_ms.p95, self.itl_ms.p99, self.errors
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
        self.rejected.values().sum::<usize>() + self.server_errors + self.stream_errors + self.lost + self.connect_errors
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
                (0..args.adapter_count).find(|&i| {
                    x -= 1.0 / (i + 1) as f64;
                    x <= 0.0
                }).unwrap_or(args.adapter_count - 1)
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
    let http = awc::Client::builder().timeout(Duration::from_secs(600)).connector(awc::Connector::new().timeout(Duration::from_secs(600)).conn_lifetime(Duration::ZERO)).finish();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_add(id as u64));
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(args.prompt_tokens.div_ceil(10).max(1));
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let mut st = ClientStats::default();
    while Instant::now() < deadline {
        let mut body = serde_json::json!({
            "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": true, "ignore_eos": true,
            "stream_options": {"include_usage": true},
        });
        let field = match args.api {
            Api::Loraplex => "adapters",
            Api::Llamacpp => "lora",
        };
        body[field] = serde_json::Value::Array(draw(&mut rng, &args, id));
        if args.api == Api::Llamacpp {
            // llama-server caches prompts per slot; every request must do its own prefill, as
            // loraplex's do.
            body["cache_prompt"] = serde_json::Value::Bool(false);
        }
        let started = Instant::now();
        let hang_up = args.disconnect_fraction > 0.0 && rng.random::<f64>() < args.disconnect_fraction;
        st.requests += 1;
        let mut resp = match http.post(&url).insert_header(("connection", "close")).send_json(&body).await {
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
        let (mut done, mut errored, mut broke, mut events, mut tokens) = (false, false, false, 0usize, 0usize);
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
                let Some(v) = text.strip_prefix("data: ").and_then(|j| serde_json::from_str::<serde_json::Value>(j.trim()).ok()) else { continue };
                if v.get("error").is_some() {
                    errored = true;
                    continue;
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n as usize;
                }
                // A token event: a choice still running, or a last choice that carries text.
                let choice = &v["choices"][0];
                let has_text = choice["text"].as_str().or(choice["delta"]["content"].as_str()).is_some_and(|t| !t.is_empty());
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

/// Writes `count` synthetic rank-8 q/v adapters for SmolLM2-135M's shapes into `dir`.
fn make_adapters(dir: &std::path::Path, args: &BenchArgs) -> anyhow::Result<()> {
    let cfg = LlamaConfig { vocab_size: 49152, hidden_size: 576, intermediate_size: 1536, num_layers: 30, num_heads: 9, num_kv_heads: 3, head_dim: 64, ..LlamaConfig::tiny() };
    let dev = candle_core::Device::Cpu;
    for i in 0..args.adapter_count {
        let name = format!("{}{i}", args.adapter_prefix);
        let a = crate::adapters::synth::random_adapter(&name, &cfg, 8, &["q_proj", "v_proj"], args.seed + i as u64, &dev)?;
        let weights: Vec<_> = ModuleId::all(cfg.num_layers)
            .filter_map(|id| a.module(id).map(|w| (id, w.a.clone(), w.b.clone())))
            .collect();
        save_adapter(&dir.join(&name), &a.config, &weights)?;
    }
    println!("wrote {} adapters to {}", args.adapter_count, dir.display());
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.make_adapters {
        return make_adapters(dir, &args);
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let report = actix_web::rt::System::new().block_on(async {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(args.duration_secs);
        let tasks: Vec<_> = (0..args.concurrency).map(|i| actix_web::rt::spawn(client(args.clone(), i, deadline))).collect();
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
        anyhow::Ok(BenchReport {
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
    let json = serde_json::to_string(&report)?;
    println!("{json}");
    println!("{}\n{}", BenchReport::markdown_header(), report.markdown_row());
    if let Some(path) = &args.json_out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{json}")?;
    }
    Ok(())
}
