//! The training loop: seeded example order, micro-batches as ragged batches (no padding),
//! loss on answer tokens + EOS only, gradient accumulation and clipping, AdamW, a progress bar,
//! a JSONL log, resumable checkpoints, and the PEFT folder (with model card and loss curve)
//! written atomically at the end.

use super::data::{self, Record, TrainExample};
use super::params::LoraParams;
use super::run::TrainRun;
use super::TrainConfig;
use crate::model::lora::AdapterMix;
use crate::model::{BatchInput, Decoder, Exec, StepLora};
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One line of the training log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Real (unpadded) tokens processed in this step.
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// Index of the example used at global position `g` (epoch-wise seeded shuffles, so a resumed
/// run sees the same order without saving RNG state).
pub fn example_at(g: usize, n: usize, seed: u64) -> usize {
    let epoch = g / n;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(epoch as u64)));
    order[g % n]
}

/// Mean cross-entropy over the answer tokens of `batch` (a ragged batch: no padding), by the
/// differentiable forward (passed down this call only: the model serves on beside it).
pub fn batch_loss(
    model: &Decoder,
    lora: &StepLora,
    batch: &[&TrainExample],
) -> candle_core::Result<(Tensor, usize)> {
    let mut input = BatchInput::default();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut offset = 0u32;
    for ex in batch {
        input.push(&ex.input);
        rows.extend(ex.positions.iter().map(|p| offset + p));
        targets.extend_from_slice(&ex.targets);
        offset += ex.input.len() as u32;
    }
    let hidden = model
        .forward_in(Exec::Differentiable, &input, None, lora)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let dev = hidden.device().clone();
    let h = hidden.index_select(&Tensor::new(rows.as_slice(), &dev)?, 0)?;
    let logits = model
        .logits_in(Exec::Differentiable, &h)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let n = targets.len();
    let loss = candle_nn::loss::cross_entropy(&logits, &Tensor::new(targets.as_slice(), &dev)?)?;
    Ok((loss, n))
}

pub(super) fn checkpoint_dir(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    output.with_file_name(format!(".{name}.checkpoint"))
}

/// What a run reports.
pub struct TrainOutcome {
    pub params: LoraParams,
    /// All steps ran (not stopped early by `stop_after`).
    pub finished: bool,
    pub log: Vec<StepLog>,
    pub usable: usize,
    pub skipped_long: usize,
    pub skipped_unanswerable: usize,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Mean loss per target token of the validation data, when given.
    pub validation_loss: Option<f64>,
    /// The training data's format (`None` for examples given already tokenized).
    pub format: Option<data::Format>,
}

/// Peak resident memory of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Runs the recipe on `model` (made differentiable here) and writes the adapter.
pub fn train(
    model: &Decoder,
    tok: &crate::model::tokenizer::TextTokenizer,
    cfg: &TrainConfig,
    progress: bool,
) -> anyhow::Result<TrainOutcome> {
    // Both files are read and checked before any training starts.
    let dataset = data::load(&cfg.data)?;
    let (format, all) = (dataset.format, dataset.records);
    let validation = match &cfg.validation_data {
        Some(path) => Some(tokenize_all(&data::load(path)?.records, tok, cfg)?),
        None => None,
    };
    let per_step = cfg.batch_size * cfg.grad_accum;
    // Visit the raw examples in a seeded order and tokenize only as many as the run needs
    // (SQuAD train has 87,599; a 133-step run uses 1,064).
    let mut visit: Vec<usize> = (0..all.len()).collect();
    visit.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed));
    let needed = cfg.steps.map(|s| s * per_step);
    let mut examples = Vec::new();
    let (mut skipped_long, mut skipped_unanswerable) = (0, 0);
    for rec in visit.iter().map(|&i| &all[i]) {
        if needed.is_some_and(|n| examples.len() >= n) {
            break;
        }
        if matches!(rec, Record::Squad(q) if q.answers.is_empty()) {
            skipped_unanswerable += 1;
            continue;
        }
        match data::tokenize(rec, tok, cfg.max_seq_len, cfg.overflow)? {
            Some(t) => examples.push(t),
            None => skipped_long += 1,
        }
    }
    anyhow::ensure!(
        !examples.is_empty(),
        "no usable training examples in `{}`",
        cfg.data.display()
    );
    let mut outcome = train_on(model, &examples, cfg, progress, Some(tok))?;
    if let (Some(v), true) = (&validation, outcome.finished) {
        let adapter = Arc::new(outcome.params.as_adapter(&model.cfg, "validation")?);
        outcome.validation_loss = Some(mean_loss(model, &adapter, v, cfg.batch_size)?);
    }
    outcome.skipped_long = skipped_long;
    outcome.format = Some(format);
    outcome.skipped_unanswerable = skipped_unanswerable;
    if outcome.finished {
        write_output(cfg, &outcome.params, &outcome)?;
    }
    let ckpt = checkpoint_dir(&cfg.output);
    if outcome.finished && ckpt.exists() {
        std::fs::remove_dir_all(&ckpt)?;
    }
    Ok(outcome)
}

/// Every usable example of `records` (none may fail to tokenize; over-long ones are dropped).
fn tokenize_all(
    records: &[Record],
    tok: &crate::model::tokenizer::TextTokenizer,
    cfg: &TrainConfig,
) -> anyhow::Result<Vec<TrainExample>> {
    let mut out = Vec::new();
    for rec in records {
        if let Some(t) = data::tokenize(rec, tok, cfg.max_seq_len, cfg.overflow)? {
            out.push(t);
        }
    }
    anyhow::ensure!(!out.is_empty(), "no usable validation examples");
    Ok(out)
}

/// Mean cross-entropy per target token of `examples` under `adapter` (no dropout), computed
/// by the training forward.
pub fn mean_loss(
    model: &Decoder,
    adapter: &Arc<crate::model::lora::LoraAdapter>,
    examples: &[TrainExample],
    batch_size: usize,
) -> anyhow::Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for part in examples.chunks(batch_size.max(1)) {
        let batch: Vec<&TrainExample> = part.iter().collect();
        let mixes = vec![AdapterMix::single(adapter.clone(), 1.0); batch.len()];
        let lora = StepLora::Training { mixes, dropout: 0.0, seed: 0 };
        let (loss, k) = batch_loss(model, &lora, &batch)?;
        sum += loss.to_scalar::<f32>()? as f64 * k as f64;
        n += k;
    }
    Ok(sum / n.max(1) as f64)
}

/// Trains on tokenized examples and returns the parameters and log (writes checkpoints, not
/// the adapter). Stops early, leaving a checkpoint, at `cfg.stop_after` (tests of `--resume`).
pub fn train_on(
    model: &Decoder,
    examples: &[TrainExample],
    cfg: &TrainConfig,
    progress: bool,
    eval_tok: Option<&crate::model::tokenizer::TextTokenizer>,
) -> anyhow::Result<TrainOutcome> {
    let mut run = TrainRun::new(model, examples.to_vec(), cfg, checkpoint_dir(&cfg.output))?;
    let total = run.total_steps();
    let bar = progress_bar(total, run.steps_done(), progress);
    while !run.done() {
        let Some(entry) = run.pass(model)? else { continue };
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            entry.loss, entry.lr, entry.tokens_per_s
        ));
        bar.inc(1);
        let step = entry.step;
        if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 && step < total {
            run.save_checkpoint()?;
        }
        if cfg.stop_after.is_some_and(|n| step >= n) && step < total {
            run.save_checkpoint()?;
            break;
        }
        if cfg.eval_every > 0 && step % cfg.eval_every == 0 {
            if let (Some(dev), Some(tok)) = (&cfg.eval_data, eval_tok) {
                let r = super::eval::evaluate_params(model, tok, &run.params, dev, cfg.eval_limit)?;
                bar.println(format!(
                    "step {step}: dev EM {:.1} F1 {:.1} on {} questions",
                    r.exact_match, r.f1, r.n
                ));
            }
        }
    }
    bar.finish();
    // The step's activations were kept for the next step (`keep_freed_memory`); no next step.
    let peak = peak_rss_bytes();
    crate::kernels::alloc::release_freed_memory();
    Ok(TrainOutcome {
        finished: run.done(),
        usable: examples.len(),
        skipped_long: 0,
        skipped_unanswerable: 0,
        seconds: run.seconds(),
        peak_rss_bytes: peak,
        validation_loss: None,
        format: None,
        log: run.log,
        params: run.params,
    })
}

fn progress_bar(total: usize, start: usize, visible: bool) -> indicatif::ProgressBar {
    let bar = if visible {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start as u64);
    bar
}

fn write_output(cfg: &TrainConfig, params: &LoraParams, o: &TrainOutcome) -> anyhow::Result<()> {
    let log_jsonl: String =
        o.log.iter().filter_map(|l| serde_json::to_string(l).ok()).map(|l| l + "\n").collect();
    let mut extra: Vec<(&str, Vec<u8>)> = vec![
        ("training_log.jsonl", log_jsonl.into_bytes()),
        ("training_recipe.json", serde_json::to_vec_pretty(cfg)?),
        ("README.md", model_card(cfg, o).into_bytes()),
    ];
    match super::plot::loss_curve_png(&o.log) {
        Ok(png) => extra.push(("loss.png", png)),
        Err(e) => eprintln!("warning: no loss curve: {e}"),
    }
    crate::adapters::writer::save_dora_modules(
        &cfg.output,
        &params.config,
        &params.export()?,
        &params.export_magnitudes()?,
        &extra,
    )?;
    Ok(())
}

/// The card of an adapter trained on chat or prompt/completion data.
fn generic_card(cfg: &TrainConfig, o: &TrainOutcome, format: data::Format) -> String {
    let last = o.log.last().map_or(f64::NAN, |l| l.loss);
    let (what, loss) = match format {
        data::Format::Chat => (
            "chat conversations rendered with the base model's chat template",
            "the assistant turns of weight 1 (their text and the template's end of turn)",
        ),
        _ => ("prompt/completion pairs", "the completion and the end-of-sequence token"),
    };
    format!(
        "---\nlibrary_name: peft\n---\n\n# {name}\n\nA LoRA adapter trained by `loraplex train` on {what} \
         (`{data}`), in Hugging Face PEFT format.\n\n## Recipe\n\nr {r}, alpha {alpha}, dropout {dropout}, targets \
         {targets:?}, rsLoRA {rslora}, DoRA {dora}; AdamW lr {lr}, batch {bs} × {ga}, {steps} steps, at most {maxlen} tokens per \
         example, seed {seed}. Full recipe: `training_recipe.json`. The loss covers {loss}.\n\n## Result\n\n\
         {usable} usable examples ({long} too long); final step loss {last:.4}; validation loss {val}.\n",
        name = cfg.output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        data = cfg.data.display(), r = cfg.rank, alpha = cfg.alpha, dropout = cfg.dropout,
        targets = cfg.target_modules, rslora = cfg.rslora, dora = cfg.use_dora, lr = cfg.lr, bs = cfg.batch_size, ga = cfg.grad_accum,
        steps = o.log.len(), maxlen = cfg.max_seq_len, seed = cfg.seed, usable = o.usable, long = o.skipped_long,
        val = o.validation_loss.map_or("not measured".into(), |v| format!("{v:.4}")),
    )
}

fn model_card(cfg: &TrainConfig, o: &TrainOutcome) -> String {
    if let Some(f @ (data::Format::Chat | data::Format::PromptCompletion)) = o.format {
        return generic_card(cfg, o, f);
    }
    let last = o.log.last().map_or(f64::NAN, |l| l.loss);
    let tail: Vec<f64> = o.log.iter().rev().take(10).map(|l| l.loss).collect();
    let tail_mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    let tokens: usize = o.log.iter().map(|l| l.tokens).sum();
    format!(
        "---\nlibrary_name: peft\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlicense: cc-by-sa-4.0\ndatasets: [rajpurkar/squad]\n---\n\n\
# {name}\n\nA LoRA adapter for SmolLM2-135M-Instruct trained by `loraplex train` to answer questions about a\n\
context briefly (SQuAD-style extractive QA), in Hugging Face PEFT format.\n\n\
## Recipe\n\nr {r}, alpha {alpha}, dropout {dropout}, targets {targets:?}, rsLoRA {rslora}, DoRA {dora}; AdamW lr {lr} \
({schedule:?} schedule, {warmup} warm-up steps), weight decay {wd}, batch {bs} × {ga} accumulation, clip {clip}, \
max {maxlen} tokens per example ({overflow:?} longer ones), seed {seed}, {steps} steps. Full recipe: `training_recipe.json`.\n\n\
Prompt format:\n\n```\n### CONTEXT\n{{context}}\n\n### QUESTION\n{{question}}\n\n### ANSWER\n{{answer}}<|im_end|>\n```\n\n\
The loss covers only the answer tokens and the end-of-sequence token.\n\n\
## Data\n\n`{data}`: {usable} usable examples ({long} skipped as too long, {unans} unanswerable).\n\n\
## Result\n\nFinal step loss {last:.4} (mean of the last 10 steps {tail_mean:.4}); {tokens} real tokens in {secs:.0} s \
({tps:.0} tokens/s); peak memory {peak}. Evaluation scores: see docs/TRAINING.md in the loraplex repository \
(`loraplex eval`).\n\n\
## Credits\n\nSQuAD v1.1 (Rajpurkar et al., 2016, \"SQuAD: 100,000+ Questions for Machine Comprehension of Text\"), \
CC BY-SA 4.0. The base model is SmolLM2-135M-Instruct by Hugging Face (Apache-2.0).\n",
        name = cfg.output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        r = cfg.rank, alpha = cfg.alpha, dropout = cfg.dropout, targets = cfg.target_modules, rslora = cfg.rslora, dora = cfg.use_dora,
        lr = cfg.lr, schedule = cfg.schedule, warmup = cfg.warmup_steps, wd = cfg.weight_decay, bs = cfg.batch_size,
        ga = cfg.grad_accum, clip = cfg.max_grad_norm, maxlen = cfg.max_seq_len, overflow = cfg.overflow, seed = cfg.seed,
        steps = o.log.len(), data = cfg.data.display(), usable = o.usable, long = o.skipped_long, unans = o.skipped_unanswerable,
        secs = o.seconds, tps = tokens as f64 / o.seconds.max(1e-9),
        peak = o.peak_rss_bytes.map_or("unknown".into(), |b| format!("{:.2} GB", b as f64 / 1e9)),
    )
}
