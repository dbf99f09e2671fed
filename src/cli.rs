//! Command-line arguments (clap) and the commands behind them.

use crate::adapters::load_adapter;
use crate::engine::{LoraPath, Request};
use crate::generate::generate;
use crate::model::load::{load_model, DEFAULT_MODEL};
use crate::model::lora::{AdapterMix, MixEntry};
use crate::model::sampling::{LogitRules, SamplingParams};
use crate::model::tokenizer::ChatMessage;
use crate::model::{parse_device, WeightFormat};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "loraplex",
    version,
    about = "One frozen base LLM, many LoRA adapters mixed per request"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-style HTTP API with hot-loaded adapters.
    Serve(ServeArgs),
    /// Generate a completion for one prompt (prints text, or one JSON object with --json).
    Generate(GenerateArgs),
    /// Load-test a running server (or write synthetic adapters with --make-adapters).
    Bench(crate::bench::BenchArgs),
    /// Fine-tune a LoRA adapter on SQuAD and write it in PEFT format.
    Train(TrainArgs),
    /// SQuAD exact match / F1 of the base model or an adapter mix.
    Eval(EvalArgs),
    /// Convert PEFT adapter folders to llama.cpp's GGUF LoRA files (for serving them there too).
    ExportLora(ExportLoraArgs),
    /// Write the model's tokenizer as a Hugging Face folder (tokenizer.json and
    /// tokenizer_config.json), for tools that count tokens offline (aiperf's `--tokenizer`).
    ExportTokenizer(ExportTokenizerArgs),
}

#[derive(Debug, Args)]
pub struct ExportTokenizerArgs {
    /// A `.gguf` file or a Hugging Face folder.
    #[arg(long, env = "LORAPLEX_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Folder to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExportLoraArgs {
    /// The base model the adapters belong to (its config and GGUF architecture are read).
    #[arg(long, env = "LORAPLEX_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Folder for the `<adapter>.gguf` files (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// PEFT adapter folders.
    #[arg(required = true)]
    pub adapters: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML recipe (keys = the flags with `_`); flags override it. E.g. config/train-squad.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: crate::train::TrainOptions,
    /// Base weights for training: f32, bf16 or packed (QLoRA-style, the serving kernel). [default: f32]
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// No progress bar (logs still go to the adapter's training_log.jsonl).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// SQuAD JSON (v1.1/v2.0, optionally .gz) or JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// First N questions only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// `DIR_OR_NAME:SCALE` (as named mixes write `adapter:scale`), repeatable; none = the
    /// base model.
    #[arg(long = "adapter", value_name = "DIR_OR_NAME:SCALE")]
    pub adapters: Vec<String>,
    #[arg(long, env = "LORAPLEX_ADAPTERS", default_value = "adapters")]
    pub adapters_dir: PathBuf,
    /// Questions decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Reuse a passage's KV blocks across its questions (`--prefix-cache=false` to compare).
    #[arg(long, env = "LORAPLEX_PREFIX_CACHE", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = true)]
    pub prefix_cache: bool,
    /// Write the JSON report (with every prediction) here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (every option below is also a key there). [default: config/loraplex.toml if present]
    #[arg(long, env = "LORAPLEX_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: crate::config::ServeOptions,
}

/// Where the base model comes from and how it is stored.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// A `.gguf` file, a Hugging Face model folder, or `hf:ORG/NAME` (downloads; needs network).
    #[arg(long, env = "LORAPLEX_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// `cpu`, `cuda[:N]` or `metal` (the latter two need the matching cargo feature).
    #[arg(long, env = "LORAPLEX_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Base weight storage: `auto` (packed on CPU, bf16 on CUDA), `packed` (4/8-bit integer
    /// CPU kernels, GGUF blocks as stored), `f32`, `bf16`, `f16`, `quantized` (candle's kernels
    /// on the GGUF's own types), `q8_0` or `q4_0` (re-quantized at load).
    #[arg(long, env = "LORAPLEX_DTYPE", default_value = "auto")]
    pub dtype: String,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text (tokenized as it is, or as the user turn with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// `DIR_OR_NAME:SCALE` (scale defaults to 1.0; as named mixes write `adapter:scale`);
    /// repeat to mix adapters. A bare name is
    /// looked up in --adapters-dir.
    #[arg(long = "adapter", value_name = "DIR_OR_NAME:SCALE")]
    pub adapters: Vec<String>,
    #[arg(long, env = "LORAPLEX_ADAPTERS", default_value = "adapters")]
    pub adapters_dir: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the generated text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past EOS (for comparisons with references that do).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Top alternatives reported per position in --json output.
    #[arg(long, default_value_t = 5)]
    pub logprobs: usize,
    /// Use the per-row reference LoRA path instead of the batched one.
    #[arg(long)]
    pub reference_lora: bool,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// Logs to stderr, as text or JSON lines; `LORAPLEX_LOG` sets the filter (default `info`).
/// Colours only on a terminal: a log file or collector gets plain text.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORAPLEX_LOG")
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging(false);
    }
    match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => run_serve(args),
        Command::Bench(args) => crate::bench::run(args),
        Command::Train(args) => run_train(args),
        Command::Eval(args) => run_eval(args),
        Command::ExportLora(args) => run_export_lora(args),
        Command::ExportTokenizer(args) => run_export_tokenizer(args),
    }
}

fn run_export_tokenizer(args: ExportTokenizerArgs) -> anyhow::Result<()> {
    use crate::model::tokenizer::TextTokenizer;
    let path = std::path::Path::new(&args.model);
    let tok = if path.is_dir() {
        TextTokenizer::from_dir(path)?
    } else {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("opening `{}`", path.display()))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut f)
            .with_context(|| format!("reading `{}` as GGUF", path.display()))?;
        TextTokenizer::from_gguf(&content)?
    };
    tok.save_dir(&args.out)?;
    println!("{}", args.out.display());
    Ok(())
}

fn run_export_lora(args: ExportLoraArgs) -> anyhow::Result<()> {
    let (cfg, arch) = crate::model::load::read_config(&args.model)
        .with_context(|| format!("reading `{}`", args.model))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating `{}`", args.out.display()))?;
    for dir in &args.adapters {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into());
        let adapter = load_adapter(dir, &name, &cfg, &candle_core::Device::Cpu)
            .with_context(|| format!("loading `{}`", dir.display()))?;
        let path = args.out.join(format!("{name}.gguf"));
        crate::adapters::gguf_lora::write_gguf_lora(&adapter, &cfg, &arch, &path)?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Parses `DIR_OR_NAME[:SCALE]` into `(spec, scale)`: the one adapter-spec syntax, as named
/// mixes write `adapter:scale`. The older `DIR_OR_NAME=SCALE` is still read, with a warning.
pub fn parse_adapter_spec(spec: &str) -> anyhow::Result<(String, f64)> {
    let scale_of =
        |s: &str| s.trim().parse::<f64>().with_context(|| format!("bad scale in `{spec}`"));
    let (name, scale) = match (spec.rsplit_once(':'), spec.rsplit_once('=')) {
        // A `:` followed by a path (`C:/x`) is part of the name.
        (Some((n, s)), _) if !s.contains(['/', '\\']) => (n, scale_of(s)?),
        (_, Some((n, s))) => {
            tracing::warn!(spec, "`NAME=SCALE` adapter specs are deprecated; write `NAME:SCALE`");
            (n, scale_of(s)?)
        }
        _ => (spec, 1.0),
    };
    if !scale.is_finite() {
        bail!("scale in `{spec}` must be finite");
    }
    Ok((name.to_string(), scale))
}

/// A directory given directly, or a name inside `adapters_dir`.
pub fn resolve_adapter_dir(spec: &str, adapters_dir: &Path) -> PathBuf {
    let direct = PathBuf::from(spec);
    if direct.is_dir() {
        direct
    } else {
        adapters_dir.join(spec)
    }
}

/// Loads `DIR_OR_NAME:SCALE` specs into a mix, with a JSON description of each entry.
fn load_mix(
    specs: &[String],
    adapters_dir: &Path,
    model: &crate::model::Decoder,
    device: &candle_core::Device,
) -> anyhow::Result<(AdapterMix, Vec<serde_json::Value>)> {
    let base = model.projections();
    let mut entries = Vec::new();
    let mut described = Vec::new();
    for spec in specs {
        let (name_or_dir, scale) = parse_adapter_spec(spec)?;
        let dir = resolve_adapter_dir(&name_or_dir, adapters_dir);
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or(name_or_dir);
        let adapter =
            crate::adapters::load_adapter_on(&dir, &name, &model.cfg, device, Some(&base))
                .with_context(|| format!("adapter `{}`", dir.display()))?;
        described.push(
            serde_json::json!({"name": name, "scale": scale, "path": dir.display().to_string()}),
        );
        entries.push(MixEntry { adapter: Arc::new(adapter), scale });
    }
    Ok((AdapterMix::new(entries), described))
}

fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    crate::runtime::training_spin_limit();
    let file = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading `{}`", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing `{}`", p.display()))?
        }
        None => crate::train::TrainOptions::default(),
    };
    let cfg = crate::train::TrainConfig::try_from(args.options.over(file))?;
    crate::train::ensure_data(&cfg.data)?;
    let device = candle_core::Device::Cpu;
    let format = WeightFormat::parse(&args.dtype, &device)?;
    if matches!(format, WeightFormat::Quantized(_)) {
        bail!("training needs dense or packed base weights (--dtype f32, bf16 or packed): candle's quantized matmul has no backward");
    }
    let loaded = load_model(&cfg.model, format, &device)
        .with_context(|| format!("loading `{}`", cfg.model))?;
    let o = crate::train::trainer::train(&loaded.model, &loaded.tokenizer, &cfg, !args.quiet)?;
    let tokens: usize = o.log.iter().map(|l| l.tokens).sum();
    println!(
        "wrote {} — {} steps, final loss {:.4}, {} tokens in {:.0} s ({:.0} tok/s), peak memory {:.2} GB; {} usable examples, {} too long, {} unanswerable",
        cfg.output.display(), o.log.len(), o.log.last().map_or(f64::NAN, |l| l.loss), tokens, o.seconds,
        tokens as f64 / o.seconds.max(1e-9), o.peak_rss_bytes.unwrap_or(0) as f64 / 1e9, o.usable, o.skipped_long, o.skipped_unanswerable
    );
    if let Some(v) = o.validation_loss {
        println!("validation loss {v:.4}");
    }
    Ok(())
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.model.device)?;
    let format = WeightFormat::parse(&args.model.dtype, &device)?;
    let loaded = load_model(&args.model.model, format, &device)
        .with_context(|| format!("loading `{}`", args.model.model))?;
    let (mix, described) = load_mix(&args.adapters, &args.adapters_dir, &loaded.model, &device)?;
    let mut examples = crate::train::squad::load(&args.data)?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    let report = crate::train::eval::evaluate(
        &loaded.model,
        &loaded.tokenizer,
        &examples,
        &mix,
        args.batch_size,
        args.prefix_cache,
    )?;
    let label = if described.is_empty() { "base".to_string() } else { args.adapters.join(" + ") };
    let cached = 100.0 * report.cached_prompt_tokens as f64 / report.prompt_tokens.max(1) as f64;
    println!(
        "| model | questions | EM | F1 | seconds | prefix cache | prompt tokens from cache |\n|---|---|---|---|---|---|---|\n| {label} | {} | {:.1} | {:.1} | {:.0} | {} | {cached:.1}% |",
        report.n, report.exact_match, report.f1, report.seconds, if args.prefix_cache { "on" } else { "off" }
    );
    if let Some(path) = &args.json_out {
        let json = serde_json::json!({"data": args.data.display().to_string(), "adapters": described, "report": report});
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.model.device)?;
    let format = WeightFormat::parse(&args.model.dtype, &device)?;
    let loaded = load_model(&args.model.model, format, &device)
        .with_context(|| format!("loading `{}`", args.model.model))?;
    let (mix, described) = load_mix(&args.adapters, &args.adapters_dir, &loaded.model, &device)?;
    let prompt_ids = if args.chat {
        let user = [ChatMessage::text("user", args.prompt.clone())];
        loaded.tokenizer.encode_chat(&user, &[], true)?.ids
    } else {
        loaded.tokenizer.encode(&args.prompt)?
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let req = Request {
        prompt_logprobs: None,
        prompt_ids: prompt_ids.clone(),
        mix,
        max_tokens: args.max_tokens.max(1),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            min_p: 0.0,
            seed: args.seed,
        },
        rules: LogitRules::default(),
        stop: args.stop.clone(),
        stop_token_ids: Vec::new(),
        constraint: None,
        logprobs: Some(args.logprobs),
        stop_at_eos: !args.ignore_eos,
        model: None,
        span: tracing::Span::none(),
    };
    let path = if args.reference_lora { LoraPath::PerRow } else { LoraPath::Batched };
    let out = generate(&loaded.model, &loaded.tokenizer, &[req], path)?
        .pop()
        .context("generation returned no output")?;
    if args.json {
        let top: Vec<Vec<(u32, f32)>> = out.top_logprobs;
        let obj = serde_json::json!({
            "prompt_ids": prompt_ids,
            "ids": out.ids,
            "text": out.text,
            "logprobs": out.logprobs,
            "top_logprobs": top,
            "adapters": described,
            "finish_reason": out.finish_reason,
        });
        println!("{obj}");
    } else {
        println!("{}", out.text);
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let default_file = PathBuf::from("config/loraplex.toml");
    let file = match &args.config {
        Some(p) => crate::config::ServeOptions::from_toml_file(p)?,
        None if default_file.exists() => {
            crate::config::ServeOptions::from_toml_file(&default_file)?
        }
        None => crate::config::ServeOptions::default(),
    };
    let cfg = crate::config::ServeConfig::try_from(args.options.over(file))?;
    init_logging(cfg.log_json);
    crate::serve::run(cfg)
}

#[cfg(test)]
mod tests {
    use super::parse_adapter_spec;

    #[test]
    fn adapter_specs_are_name_colon_scale_and_the_old_form_still_reads() {
        let p = |s: &str| parse_adapter_spec(s).map_err(|e| format!("{e:#}"));
        assert_eq!(p("qa-r8:0.7"), Ok(("qa-r8".into(), 0.7)));
        assert_eq!(p("qa-r8"), Ok(("qa-r8".into(), 1.0)));
        assert_eq!(p("../shared/adapters/qa-r8:-2"), Ok(("../shared/adapters/qa-r8".into(), -2.0)));
        assert_eq!(
            p("../shared/adapters/qa-r8=0.5"),
            Ok(("../shared/adapters/qa-r8".into(), 0.5)),
            "deprecated form"
        );
        assert_eq!(p("C:/adapters/qa"), Ok(("C:/adapters/qa".into(), 1.0)));
        assert!(p("qa-r8:lots").unwrap_err().contains("qa-r8:lots"));
        assert!(p("qa-r8:inf").unwrap_err().contains("finite"));
    }
}
