//! `loraplex train` and `loraplex eval`: fine-tune a LoRA adapter against the frozen base on a
//! chat, prompt/completion or SQuAD dataset (`train::data`) and write it in PEFT format; score
//! the base or any adapter mix with SQuAD's EM/F1.

pub mod data;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod plot;
pub mod run;
pub mod squad;
pub mod trainer;

use anyhow::{bail, Context};
use clap::Args;
use optim::Schedule;
use serde::Deserialize;
use squad::Overflow;
use std::path::{Path, PathBuf};

/// Where the official SQuAD v1.1 train set is looked for, and fetched to when online.
pub const DEFAULT_DATA: &str = "data/squad/train-v1.1.json";
pub const SQUAD_TRAIN_URL: &str =
    "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json";

/// Raw training options: flags (clap) or keys of a TOML recipe (serde). Flags win.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    /// Base model (`.gguf`, Hugging Face folder, `hf:ORG/NAME`). [default: the fetched SmolLM2]
    #[arg(long)]
    pub model: Option<String>,
    /// Training data, its format told from the content: OpenAI chat JSONL ({"messages": […]}),
    /// prompt/completion JSONL, SQuAD v1.1/v2.0 JSON (optionally .gz) or JSONL of
    /// {"context","question","answer"}. [default: data/squad/train-v1.1.json, downloaded when
    /// online]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Validation data in any of those formats: its loss is reported when training ends.
    #[arg(long)]
    pub validation_data: Option<PathBuf>,
    /// Output adapter folder, e.g. adapters/squad-r16. [default: adapters/squad]
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// LoRA rank. [default: 16]
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha. [default: 32]
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input. [default: 0.05]
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Comma-separated projections. [default: q_proj,k_proj,v_proj,o_proj]
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// rsLoRA scaling (alpha / sqrt(r)); a switch (`--rslora`, `--rslora=false`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub rslora: Option<bool>,
    /// DoRA (weight-decomposed LoRA, PEFT's `use_dora`): a trained magnitude per output row
    /// beside A and B; a switch (`--use-dora`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub use_dora: Option<bool>,
    /// Optimizer steps (wins over --epochs). [default: 133]
    #[arg(long)]
    pub steps: Option<usize>,
    /// Epochs over the usable examples (when --steps is not given).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Examples per micro-batch. [default: 8]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step. [default: 1]
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Examples per forward/backward pass: a batch runs as passes of this many examples, its
    /// loss normalised over the whole batch's answer tokens, so the gradient is the batch's
    /// (only the peak memory shrinks). 0 = the whole batch in one pass. [default: 2]
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Peak learning rate. [default: 5e-4]
    #[arg(long)]
    pub lr: Option<f64>,
    /// [default: 20]
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// linear | cosine | constant. [default: linear]
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    /// Decoupled weight decay. [default: 0]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 = off). [default: 1.0]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Tokens per example (prompt + answer + EOS). [default: 384]
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// skip | truncate (the context, around the answer) for longer examples. [default: skip]
    #[arg(long, value_enum)]
    pub overflow: Option<Overflow>,
    /// [default: 42]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Save a resumable checkpoint every N steps (0 = never). [default: 25]
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Continue from the output's last checkpoint; a switch (`--resume`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub resume: Option<bool>,
    /// Evaluate on a small dev slice every N steps (0 = never). [default: 0]
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Dev data for --eval-every. [default: none]
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Questions in the dev slice. [default: 50]
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Stop (leaving a checkpoint) after this many steps: simulates an interruption in tests.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

macro_rules! merge_train {
    ($hi:expr, $lo:expr, $($f:ident),*) => { TrainOptions { $($f: $hi.$f.or($lo.$f)),* } };
}

impl TrainOptions {
    pub fn over(self, lower: TrainOptions) -> TrainOptions {
        merge_train!(
            self,
            lower,
            model,
            data,
            validation_data,
            output,
            rank,
            alpha,
            dropout,
            target_modules,
            rslora,
            use_dora,
            steps,
            epochs,
            batch_size,
            grad_accum,
            micro_batch,
            lr,
            warmup_steps,
            schedule,
            weight_decay,
            max_grad_norm,
            max_seq_len,
            overflow,
            seed,
            checkpoint_every,
            resume,
            eval_every,
            eval_data,
            eval_limit,
            stop_after
        )
    }
}

/// A validated training recipe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainConfig {
    pub model: String,
    pub data: PathBuf,
    pub validation_data: Option<PathBuf>,
    pub output: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub target_modules: Vec<String>,
    pub rslora: bool,
    pub use_dora: bool,
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub micro_batch: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub max_seq_len: usize,
    pub overflow: Overflow,
    pub seed: u64,
    pub checkpoint_every: usize,
    pub resume: bool,
    pub eval_every: usize,
    pub eval_data: Option<PathBuf>,
    pub eval_limit: usize,
    pub stop_after: Option<usize>,
}

impl TryFrom<TrainOptions> for TrainConfig {
    type Error = anyhow::Error;

    fn try_from(o: TrainOptions) -> anyhow::Result<Self> {
        let c = TrainConfig {
            model: o.model.unwrap_or_else(|| crate::model::load::DEFAULT_MODEL.into()),
            data: o.data.unwrap_or_else(|| DEFAULT_DATA.into()),
            validation_data: o.validation_data,
            output: o.output.unwrap_or_else(|| "adapters/squad".into()),
            rank: o.rank.unwrap_or(16),
            alpha: o.alpha.unwrap_or(32.0),
            dropout: o.dropout.unwrap_or(0.05),
            target_modules: o.target_modules.unwrap_or_else(|| {
                ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec()
            }),
            rslora: o.rslora.unwrap_or(false),
            use_dora: o.use_dora.unwrap_or(false),
            steps: o.steps.or(if o.epochs.is_some() { None } else { Some(133) }),
            epochs: o.epochs,
            batch_size: o.batch_size.unwrap_or(8),
            grad_accum: o.grad_accum.unwrap_or(1),
            micro_batch: o.micro_batch.unwrap_or(2),
            lr: o.lr.unwrap_or(5e-4),
            warmup_steps: o.warmup_steps.unwrap_or(20),
            schedule: o.schedule.unwrap_or(Schedule::Linear),
            weight_decay: o.weight_decay.unwrap_or(0.0),
            max_grad_norm: o.max_grad_norm.unwrap_or(1.0),
            max_seq_len: o.max_seq_len.unwrap_or(384),
            overflow: o.overflow.unwrap_or(Overflow::Skip),
            seed: o.seed.unwrap_or(42),
            checkpoint_every: o.checkpoint_every.unwrap_or(25),
            resume: o.resume.unwrap_or(false),
            eval_every: o.eval_every.unwrap_or(0),
            eval_data: o.eval_data,
            eval_limit: o.eval_limit.unwrap_or(50),
            stop_after: o.stop_after,
        };
        if c.rank == 0 || c.batch_size == 0 || c.grad_accum == 0 || c.max_seq_len < 16 {
            bail!("rank, batch-size and grad-accum must be at least 1, max-seq-len at least 16");
        }
        if !(0.0..1.0).contains(&c.dropout) || !c.lr.is_finite() || c.lr <= 0.0 {
            bail!("dropout must be in [0, 1) and lr positive");
        }
        if c.output.file_name().is_none() {
            bail!("--output must name a folder, e.g. adapters/squad");
        }
        Ok(c)
    }
}

/// The training data, downloading the official SQuAD v1.1 train set to the default path
/// when it is missing and we are online.
pub fn ensure_data(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if path != Path::new(DEFAULT_DATA) {
        bail!("training data `{}` not found", path.display());
    }
    eprintln!("downloading the official SQuAD v1.1 train set to {} …", path.display());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let fetched = std::process::Command::new("curl")
        .args(["-sSfL", "--max-time", "300", "-o"])
        .arg(path)
        .arg(SQUAD_TRAIN_URL)
        .status();
    match fetched {
        Ok(s) if s.success() => Ok::<(), anyhow::Error>(()),
        _ => {
            let _ = std::fs::remove_file(path);
            bail!(
                "no training data: put the official SQuAD v1.1 `train-v1.1.json` (or `.json.gz`) at `{}` or pass --data (offline here, so the download from {SQUAD_TRAIN_URL} failed)",
                path.display()
            )
        }
    }
    .context("fetching SQuAD")
}
