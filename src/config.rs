//! Serve options: every option is a CLI flag, a `LORAPLEX_*` environment variable and a key
//! of the TOML config file. Precedence: defaults < TOML < environment < command line. Raw
//! options ([`ServeOptions`]) become a validated [`ServeConfig`] once, here.

use crate::engine::EngineConfig;
use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Declares the serve options once: the struct (clap reads its `#[arg]`s for flags and
/// `LORAPLEX_*` variables, serde its fields as TOML keys), every option's name, and the merge
/// of the command line over the file. `tests` below checks that each option has its flag, its
/// variable and a documented key in `config/loraplex.toml`.
macro_rules! serve_options {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: Option<$ty:ty>,)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$fmeta])* pub $field: Option<$ty>,)*
        }

        impl $name {
            /// Every option's name: its TOML key (the flag is the same with `-`, the variable
            /// `LORAPLEX_` and the name in capitals).
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// `self` (command line / environment) over `lower` (the TOML file).
            pub fn over(self, lower: $name) -> $name {
                $name { $($field: self.$field.or(lower.$field)),* }
            }
        }
    };
}

serve_options! {
/// Raw options, from the command line / environment (clap) or the TOML file (serde).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeOptions {
    /// Base model: `.gguf` file, Hugging Face folder, or `hf:ORG/NAME`. [default: the fetched SmolLM2 GGUF]
    #[arg(long, env = "LORAPLEX_MODEL")]
    pub model: Option<String>,
    /// Folder of PEFT adapters, watched for changes. [default: adapters]
    #[arg(long, env = "LORAPLEX_ADAPTERS")]
    pub adapters: Option<PathBuf>,
    /// Address to bind. [default: 127.0.0.1]
    #[arg(long, env = "LORAPLEX_HOST")]
    pub host: Option<String>,
    /// [default: 8000]
    #[arg(long, env = "LORAPLEX_PORT")]
    pub port: Option<u16>,
    /// `cpu`, `cuda[:N]` or `metal`. [default: cpu]
    #[arg(long, env = "LORAPLEX_DEVICE")]
    pub device: Option<String>,
    /// `auto`, `f32`, `bf16`, `f16`, `quantized`, `q8_0`, `q4_0`. [default: auto]
    #[arg(long, env = "LORAPLEX_DTYPE")]
    pub dtype: Option<String>,
    /// Inference endpoints need `Authorization: Bearer <key>` when set.
    #[arg(long, env = "LORAPLEX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Adapter mutations need this key when set.
    #[arg(long, env = "LORAPLEX_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Sequences decoded together at most. [default: 32]
    #[arg(long, env = "LORAPLEX_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Sequences waiting for a batch slot at most; more get 429. [default: 256]
    #[arg(long, env = "LORAPLEX_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Prompt tokens prefilled per engine step at most. [default: 512]
    #[arg(long, env = "LORAPLEX_MAX_PREFILL_TOKENS")]
    pub max_prefill_tokens: Option<usize>,
    /// Bytes of the KV cache block pool (e.g. `2GiB`, `512MiB`, or plain bytes). [default:
    /// a full batch of full-context sequences, capped at 40% of available memory]
    #[arg(long, env = "LORAPLEX_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<ByteSize>,
    /// Reuse cached KV blocks of equal prompt prefixes under the same adapter mix
    /// (`--prefix-cache=false` turns it off). [default: true]
    #[arg(long, env = "LORAPLEX_PREFIX_CACHE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub prefix_cache: Option<bool>,
    /// While other sequences decode, keep a step that prefills to about this many times a
    /// decode step (their inter-token latency) by shrinking its prompt chunk; 0 = off (chunks
    /// of `max_prefill_tokens`). [default: 1.5]
    #[arg(long, env = "LORAPLEX_STEP_LATENCY_RATIO")]
    pub step_latency_ratio: Option<f64>,
    /// Prompt tokens per sequence at most. [default: 4096, capped by the model's context]
    #[arg(long, env = "LORAPLEX_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Prompt + generated tokens per sequence at most. [default: the model's context]
    #[arg(long, env = "LORAPLEX_MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<usize>,
    /// `max_tokens` when a request gives none. [default: 256]
    #[arg(long, env = "LORAPLEX_DEFAULT_MAX_TOKENS")]
    pub default_max_tokens: Option<usize>,
    /// Adapters in one request's mix at most. [default: 8]
    #[arg(long, env = "LORAPLEX_MAX_ADAPTERS_PER_REQUEST")]
    pub max_adapters_per_request: Option<usize>,
    /// A named mix, addressable as `model`: `name=adapter:scale,adapter:scale` (repeat the flag
    /// for more; `;` separates them in the variable; a TOML list). Mixes can also be defined in
    /// `mixes.toml` in the adapters folder, which is reread while serving.
    #[arg(long = "mix", env = "LORAPLEX_MIX", value_delimiter = ';')]
    pub mix: Option<Vec<String>>,
    /// Bytes of adapter weights kept loaded at most (LRU eviction). [default: 1073741824]
    #[arg(long, env = "LORAPLEX_ADAPTER_BUDGET_BYTES")]
    pub adapter_budget_bytes: Option<usize>,
    /// Versions of each adapter name kept resident and addressable as `name@N` (the current one
    /// and the K − 1 before it; older ones are evicted, then answered 404). [default: 2]
    #[arg(long, env = "LORAPLEX_ADAPTER_VERSIONS")]
    pub adapter_versions: Option<usize>,
    /// Request body size limit in bytes; larger bodies get 413. [default: 1048576]
    #[arg(long, env = "LORAPLEX_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Seconds a request body may take to arrive in full; a slower (or never-ending) body gets
    /// 408 and its connection is closed. [default: 30]
    #[arg(long, env = "LORAPLEX_BODY_TIMEOUT_SECS")]
    pub body_timeout_secs: Option<u64>,
    /// Tokens of work one request may ask for: prompt + `max_tokens` of every sequence
    /// (prompts × `n`); more get 422. [default: 65536]
    #[arg(long, env = "LORAPLEX_MAX_REQUEST_TOKENS")]
    pub max_request_tokens: Option<usize>,
    /// Browser origins (`https://app.example.com`, or `*`) allowed to call the inference
    /// routes cross-origin (comma-separated; a TOML list). Admin routes are never reachable
    /// cross-origin. [default: none]
    #[arg(long, env = "LORAPLEX_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Option<Vec<String>>,
    /// Host names answered besides IP addresses, `localhost` and `*.localhost` when the server
    /// is on loopback without an API key (against DNS rebinding; comma-separated; a TOML list).
    /// [default: none]
    #[arg(long, env = "LORAPLEX_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Option<Vec<String>>,
    /// `n` (choices per prompt) at most. [default: 8]
    #[arg(long, env = "LORAPLEX_MAX_N")]
    pub max_n: Option<usize>,
    /// Periodic rescan of the adapters folder, in milliseconds. [default: 2000]
    #[arg(long, env = "LORAPLEX_RESCAN_INTERVAL_MS")]
    pub rescan_interval_ms: Option<u64>,
    /// How long SIGTERM waits for running requests before exiting, in seconds. [default: 30]
    #[arg(long, env = "LORAPLEX_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// Folder of the fine-tuning API's state: uploaded files, jobs, their events and
    /// checkpoints (kept across restarts; a running job resumes). [default: `.loraplex-state`
    /// inside the adapters folder]
    #[arg(long, env = "LORAPLEX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// While requests run, engine steps between two passes of a fine-tuning job (fewer than
    /// one inter-token gap in this many holds a pass); 0 = a job waits until no request runs.
    /// [default: 200]
    #[arg(long, env = "LORAPLEX_TRAIN_SLICE_GAP")]
    pub train_slice_gap: Option<usize>,
    /// Bytes of one uploaded file (`POST /v1/files`) at most. [default: 536870912]
    #[arg(long, env = "LORAPLEX_MAX_UPLOAD_BYTES")]
    pub max_upload_bytes: Option<usize>,
    /// `text` or `json` log lines. [default: text]
    #[arg(long, env = "LORAPLEX_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Also export the series the Gateway API Inference Extension's endpoint picker reads
    /// (vLLM's names: `vllm:num_requests_waiting`, …). [default: false]
    #[arg(long, env = "LORAPLEX_GATEWAY_METRICS", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub gateway_metrics: Option<bool>,
    /// Collect metrics (false: `/metrics` serves only build info and live gauges; for measuring
    /// the overhead; `--metrics=false`). [default: true]
    #[arg(long, env = "LORAPLEX_METRICS", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub metrics: Option<bool>,
    /// Distinct adapter label values in metrics; later adapters count as `adapter="other"`. [default: 100]
    #[arg(long, env = "LORAPLEX_METRICS_ADAPTER_CAP")]
    pub metrics_adapter_cap: Option<usize>,
    /// Bytes of compiled structured-output grammars kept for reuse (each weighs what its
    /// compile left allocated; least recently used leave first). [default: 256MiB]
    #[arg(long, env = "LORAPLEX_GRAMMAR_CACHE_BYTES")]
    pub grammar_cache_bytes: Option<ByteSize>,
    /// Milliseconds one request waits for its grammar to compile; longer is a 400
    /// (`grammar_compile_timeout`). [default: 10000]
    #[arg(long, env = "LORAPLEX_GRAMMAR_COMPILE_TIMEOUT_MS")]
    pub grammar_compile_timeout_ms: Option<u64>,
}
}

impl ServeOptions {
    pub fn from_toml_file(path: &Path) -> anyhow::Result<ServeOptions> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config `{}`", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config `{}`", path.display()))
    }
}

/// A size in bytes: plain digits, or a number with `K`/`M`/`G`/`T` (powers of 1000) or
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024); from the command line, the environment, or the
/// TOML file (an integer or such a string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = (t[..split].trim(), t[split..].trim());
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size (e.g. 2GiB, 512MiB, 1000000)"))?;
        let scale: f64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "t" | "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => {
                return Err(format!(
                    "`{text}`: unknown size unit `{unit}` (use K, M, G, T, KiB, MiB, GiB or TiB)"
                ))
            }
        };
        Ok(ByteSize((value * scale).round() as usize))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n as usize)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Request limits checked at the API edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_prompt_tokens: usize,
    /// `None`: the model's context length.
    pub max_total_tokens: Option<usize>,
    pub default_max_tokens: usize,
    pub max_adapters_per_request: usize,
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (408 beyond).
    pub body_timeout: Duration,
    /// Prompt + `max_tokens` tokens over all of a request's sequences (422 beyond).
    pub max_request_tokens: usize,
    pub max_n: usize,
    pub max_logprobs: usize,
    pub max_stop: usize,
    pub max_stop_len: usize,
    pub max_abs_scale: f64,
    /// Bytes of one uploaded file (`POST /v1/files`).
    pub max_upload_bytes: usize,
    /// How long an upload may take to arrive.
    pub upload_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 4096,
            max_total_tokens: None,
            default_max_tokens: 256,
            max_adapters_per_request: 8,
            max_body_bytes: 1 << 20,
            body_timeout: Duration::from_secs(30),
            max_request_tokens: 65536,
            max_n: 8,
            max_logprobs: 20,
            max_stop: 4,
            max_stop_len: 256,
            max_abs_scale: 100.0,
            max_upload_bytes: 512 << 20,
            upload_timeout: Duration::from_secs(600),
        }
    }
}

/// Validated serve configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: String,
    pub adapters: PathBuf,
    pub host: String,
    pub port: u16,
    pub device: String,
    pub dtype: String,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub adapter_budget_bytes: usize,
    /// Versions of each adapter name kept resident (`name@N`).
    pub adapter_versions: usize,
    /// Named mixes from the `mix` option.
    pub mixes: Vec<(String, Vec<crate::adapters::mixes::MixMember>)>,
    pub rescan_interval: Duration,
    pub drain_timeout: Duration,
    pub state_dir: PathBuf,
    pub log_json: bool,
    pub gateway_metrics: bool,
    pub metrics: bool,
    pub metrics_adapter_cap: usize,
    /// Browser origins allowed on the inference routes.
    pub cors_origins: Vec<String>,
    /// Extra host names a keyless loopback server answers.
    pub allowed_hosts: Vec<String>,
    /// The structured-output compiler's cache and time budget.
    pub grammars: crate::structured::GrammarOptions,
}

impl ServeConfig {
    /// Whether the server binds only to the loopback interface.
    pub fn loopback(&self) -> bool {
        self.host == "localhost"
            || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// The HTTP policy: CORS origins; and, for a loopback server without an API key (which a
    /// DNS-rebinding page could otherwise reach through the user's browser), the host names.
    pub fn http_policy(&self) -> crate::api::guard::HttpPolicy {
        let guard_hosts = self.loopback() && self.api_key.is_none();
        crate::api::guard::HttpPolicy {
            cors_origins: self.cors_origins.clone(),
            allowed_hosts: guard_hosts.then(|| self.allowed_hosts.clone()),
        }
    }
}

/// Checks `cors_origins` entries: `*` or `scheme://host[:port]` with no path.
fn check_origins(origins: &[String]) -> anyhow::Result<()> {
    for o in origins {
        let ok = o == "*"
            || o.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https")
                    && !rest.is_empty()
                    && !rest.contains(['/', '?', '#', ' '])
            });
        if !ok {
            bail!("`cors_origins`: `{}` is not an origin (`*` or `scheme://host[:port]`, e.g. `https://app.example.com`)", o.escape_debug());
        }
    }
    Ok(())
}

impl TryFrom<ServeOptions> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(o: ServeOptions) -> anyhow::Result<Self> {
        let engine_default = EngineConfig::default();
        let limits_default = Limits::default();
        let grammar_default = crate::structured::GrammarOptions::default();
        let cfg = ServeConfig {
            model: o.model.unwrap_or_else(|| crate::model::load::DEFAULT_MODEL.to_string()),
            state_dir: o.state_dir.unwrap_or_else(|| {
                o.adapters
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("adapters"))
                    .join(".loraplex-state")
            }),
            adapters: o.adapters.unwrap_or_else(|| PathBuf::from("adapters")),
            host: o.host.unwrap_or_else(|| "127.0.0.1".into()),
            port: o.port.unwrap_or(8000),
            device: o.device.unwrap_or_else(|| "cpu".into()),
            dtype: o.dtype.unwrap_or_else(|| "auto".into()),
            api_key: o.api_key.filter(|k| !k.is_empty()),
            admin_key: o.admin_key.filter(|k| !k.is_empty()),
            engine: EngineConfig {
                max_batch_size: o.max_batch_size.unwrap_or(engine_default.max_batch_size),
                max_waiting: o.max_waiting.unwrap_or(engine_default.max_waiting),
                max_prefill_tokens: o
                    .max_prefill_tokens
                    .unwrap_or(engine_default.max_prefill_tokens),
                kv_cache_bytes: o.kv_cache_bytes.map(|b| b.0),
                prefix_cache: o.prefix_cache.unwrap_or(engine_default.prefix_cache),
                step_latency_ratio: o
                    .step_latency_ratio
                    .unwrap_or(engine_default.step_latency_ratio),
                background_gap: o.train_slice_gap.unwrap_or(engine_default.background_gap),
                faults: None,
            },
            limits: Limits {
                max_prompt_tokens: o.max_prompt_tokens.unwrap_or(limits_default.max_prompt_tokens),
                max_total_tokens: o.max_total_tokens,
                default_max_tokens: o
                    .default_max_tokens
                    .unwrap_or(limits_default.default_max_tokens),
                max_adapters_per_request: o
                    .max_adapters_per_request
                    .unwrap_or(limits_default.max_adapters_per_request),
                max_body_bytes: o.max_body_bytes.unwrap_or(limits_default.max_body_bytes),
                body_timeout: o
                    .body_timeout_secs
                    .map_or(limits_default.body_timeout, Duration::from_secs),
                max_request_tokens: o
                    .max_request_tokens
                    .unwrap_or(limits_default.max_request_tokens),
                max_n: o.max_n.unwrap_or(limits_default.max_n),
                max_upload_bytes: o.max_upload_bytes.unwrap_or(limits_default.max_upload_bytes),
                ..limits_default
            },
            adapter_budget_bytes: o.adapter_budget_bytes.unwrap_or(1 << 30),
            adapter_versions: o.adapter_versions.unwrap_or(2),
            mixes: parse_mixes(o.mix.as_deref().unwrap_or_default())?,
            rescan_interval: Duration::from_millis(o.rescan_interval_ms.unwrap_or(2000)),
            drain_timeout: Duration::from_secs(o.drain_timeout_secs.unwrap_or(30)),
            log_json: match o.log_format.as_deref() {
                None | Some("text") => false,
                Some("json") => true,
                Some(other) => bail!("`log_format` must be `text` or `json`, got `{other}`"),
            },
            gateway_metrics: o.gateway_metrics.unwrap_or(false),
            metrics: o.metrics.unwrap_or(true),
            metrics_adapter_cap: o.metrics_adapter_cap.unwrap_or(100),
            grammars: crate::structured::GrammarOptions {
                cache_bytes: o.grammar_cache_bytes.map_or(grammar_default.cache_bytes, |b| b.0),
                compile_timeout: o
                    .grammar_compile_timeout_ms
                    .map_or(grammar_default.compile_timeout, Duration::from_millis),
                ..grammar_default
            },
            cors_origins: o
                .cors_origins
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            allowed_hosts: o
                .allowed_hosts
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        };
        check_origins(&cfg.cors_origins)?;
        for (name, v) in [
            ("max_batch_size", cfg.engine.max_batch_size),
            ("max_waiting", cfg.engine.max_waiting),
            ("max_prefill_tokens", cfg.engine.max_prefill_tokens),
            ("max_prompt_tokens", cfg.limits.max_prompt_tokens),
            ("default_max_tokens", cfg.limits.default_max_tokens),
            ("max_adapters_per_request", cfg.limits.max_adapters_per_request),
            ("max_body_bytes", cfg.limits.max_body_bytes),
            ("max_request_tokens", cfg.limits.max_request_tokens),
            ("body_timeout_secs", cfg.limits.body_timeout.as_secs() as usize),
            ("max_n", cfg.limits.max_n),
            ("adapter_budget_bytes", cfg.adapter_budget_bytes),
            ("adapter_versions", cfg.adapter_versions),
            ("max_upload_bytes", cfg.limits.max_upload_bytes),
            ("grammar_cache_bytes", cfg.grammars.cache_bytes),
            ("grammar_compile_timeout_ms", cfg.grammars.compile_timeout.as_millis() as usize),
        ] {
            if v == 0 {
                bail!("`{name}` must be at least 1");
            }
        }
        let ratio = cfg.engine.step_latency_ratio;
        if !(ratio == 0.0 || (ratio > 1.0 && ratio.is_finite())) {
            bail!("`step_latency_ratio` must be 0 (off) or above 1, got {ratio}");
        }
        if cfg.engine.kv_cache_bytes == Some(0) {
            bail!("`kv_cache_bytes` must be at least 1");
        }
        if cfg.rescan_interval.is_zero() {
            bail!("`rescan_interval_ms` must be at least 1");
        }
        Ok(cfg)
    }
}

fn parse_mixes(
    specs: &[String],
) -> anyhow::Result<Vec<(String, Vec<crate::adapters::mixes::MixMember>)>> {
    let mut out: Vec<(String, Vec<crate::adapters::mixes::MixMember>)> = Vec::new();
    for spec in specs.iter().filter(|s| !s.trim().is_empty()) {
        let (name, members) = crate::adapters::mixes::parse_named(spec).context("`mix`")?;
        if out.iter().any(|(n, _)| *n == name) {
            bail!("`mix`: mix `{name}` is defined twice");
        }
        out.push((name, members));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: ServeOptions,
    }

    #[test]
    fn every_option_has_its_flag_its_variable_and_a_documented_key() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let docs =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/loraplex.toml"))
                .unwrap();
        let documented = |key: &str| {
            docs.lines().any(|l| {
                l.trim_start_matches(['#', ' ']).split_once(" =").is_some_and(|(k, _)| k == key)
            })
        };
        for key in ServeOptions::KEYS {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == *key)
                .unwrap_or_else(|| panic!("`{key}`: no flag"));
            assert_eq!(arg.get_long(), Some(key.replace('_', "-").as_str()), "`{key}`: the flag");
            let env = format!("LORAPLEX_{}", key.to_uppercase());
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(env.as_str()),
                "`{key}`: the variable"
            );
            assert!(arg.get_help().is_some(), "`{key}`: no help text");
            assert!(documented(key), "`{key}` is not documented in config/loraplex.toml");
        }
        assert_eq!(
            cmd.get_arguments().filter(|a| a.get_long().is_some()).count(),
            ServeOptions::KEYS.len()
        );
    }

    #[test]
    fn sizes_parse_with_units_and_name_a_bad_value() {
        assert_eq!("2GiB".parse::<ByteSize>(), Ok(ByteSize(2 << 30)));
        assert_eq!("512 MiB".parse::<ByteSize>(), Ok(ByteSize(512 << 20)));
        assert_eq!("1.5G".parse::<ByteSize>(), Ok(ByteSize(1_500_000_000)));
        assert_eq!("1000000".parse::<ByteSize>(), Ok(ByteSize(1_000_000)));
        assert!("2 parsecs".parse::<ByteSize>().unwrap_err().contains("parsecs"));
        assert!("lots".parse::<ByteSize>().unwrap_err().contains("lots"));
        let t: ServeOptions =
            toml::from_str("kv_cache_bytes = \"1GiB\"\nprefix_cache = false").unwrap();
        assert_eq!((t.kv_cache_bytes, t.prefix_cache), (Some(ByteSize(1 << 30)), Some(false)));
        let t: ServeOptions = toml::from_str("kv_cache_bytes = 4096").unwrap();
        assert_eq!(t.kv_cache_bytes, Some(ByteSize(4096)));
    }

    #[test]
    fn boolean_options_are_switches() {
        let c = Cli::try_parse_from([
            "x",
            "--prefix-cache=false",
            "--gateway-metrics",
            "--kv-cache-bytes",
            "2GiB",
        ])
        .unwrap();
        assert_eq!(
            (c.o.prefix_cache, c.o.gateway_metrics, c.o.kv_cache_bytes),
            (Some(false), Some(true), Some(ByteSize(2 << 30)))
        );
        let c = Cli::try_parse_from(["x", "--prefix-cache", "--metrics=false"]).unwrap();
        assert_eq!((c.o.prefix_cache, c.o.metrics), (Some(true), Some(false)));
        let e = Cli::try_parse_from(["x", "--kv-cache-bytes", "big"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("big"), "{e}");
        let cfg = ServeConfig::try_from(ServeOptions {
            step_latency_ratio: Some(0.5),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(cfg.contains("step_latency_ratio"), "{cfg}");
    }

    #[test]
    fn mixes_come_from_flags_the_environment_form_and_toml_and_bad_ones_are_named() {
        let c =
            Cli::try_parse_from(["x", "--mix", "a=qa-r8:0.5,all-r16", "--mix", "b=qa-r8"]).unwrap();
        let cfg = ServeConfig::try_from(c.o).unwrap();
        assert_eq!(
            cfg.mixes.iter().map(|(n, m)| (n.as_str(), m.len())).collect::<Vec<_>>(),
            [("a", 2), ("b", 1)]
        );
        // The variable's form: `;` between mixes.
        let c = Cli::try_parse_from(["x", "--mix", "a=qa-r8;b=all-r16:2"]).unwrap();
        assert_eq!(ServeConfig::try_from(c.o).unwrap().mixes[1].1[0].scale, 2.0);
        let t: ServeOptions = toml::from_str("mix = [\"blend=qa-r8:0.7,all-r16:0.3\"]").unwrap();
        assert_eq!(ServeConfig::try_from(t).unwrap().mixes[0].0, "blend");
        for (bad, want) in
            [("a=x:1;a=y", "defined twice"), ("a=x:big", "big"), ("nameless", "name=adapter")]
        {
            let c = Cli::try_parse_from(["x", "--mix", bad]).unwrap();
            let e = format!("{:#}", ServeConfig::try_from(c.o).unwrap_err());
            assert!(e.contains("`mix`") && e.contains(want), "{bad}: {e}");
        }
    }
}
