//! One training run as a state machine advanced one forward/backward pass at a time, so the
//! CLI can loop over it and the serving engine can interleave its passes with inference steps
//! (`finetune`). Parameters and optimizer moments change only when a step's last pass ends,
//! so a checkpoint taken at any moment is the state after the last finished step.

use super::data::TrainExample;
use super::optim::{clip_grad_norm, lr_at, AdamW};
use super::params::LoraParams;
use super::trainer::{batch_loss, example_at, StepLog};
use super::TrainConfig;
use crate::adapters::PeftConfig;
use crate::model::lora::{AdapterMix, LoraAdapter};
use crate::model::{Decoder, StepLora};
use anyhow::Context;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The step being accumulated: its passes, in order, and the gradients so far.
struct Step {
    adapter: Arc<LoraAdapter>,
    /// `(micro-batch, first example's place in it, example indices)` per pass.
    passes: Vec<(usize, usize, Vec<usize>)>,
    /// Answer tokens of each micro-batch (the pass losses are shares of the batch mean).
    targets: Vec<usize>,
    next: usize,
    sums: Vec<Option<Tensor>>,
    loss: f64,
    tokens: usize,
    busy: Duration,
}

pub struct TrainRun {
    cfg: TrainConfig,
    examples: Vec<TrainExample>,
    pub params: LoraParams,
    vars: Vec<Var>,
    opt: AdamW,
    total: usize,
    pub log: Vec<StepLog>,
    name: String,
    checkpoint: PathBuf,
    started: Instant,
    /// Wall time of earlier runs of a resumed job.
    elapsed_before: f64,
    step: Option<Step>,
}

impl TrainRun {
    /// A run of `cfg` over `examples`, continued from `checkpoint` when `cfg.resume` and it
    /// exists.
    pub fn new(
        model: &Decoder,
        examples: Vec<TrainExample>,
        cfg: &TrainConfig,
        checkpoint: PathBuf,
    ) -> anyhow::Result<TrainRun> {
        anyhow::ensure!(!examples.is_empty(), "no usable training examples");
        let per_step = cfg.batch_size * cfg.grad_accum;
        let total = cfg
            .steps
            .unwrap_or_else(|| {
                ((cfg.epochs.unwrap_or(1.0) * examples.len() as f64) / per_step as f64).ceil()
                    as usize
            })
            .max(1);
        let peft = PeftConfig::from_json(&serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": (cfg.dropout as f64 * 1e6).round() / 1e6,
            "target_modules": cfg.target_modules, "use_rslora": cfg.rslora, "bias": "none",
            "use_dora": cfg.use_dora,
            "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        }).to_string())?;
        let base = model.projections();
        let params = LoraParams::init_on(&model.cfg, peft, cfg.seed, model.device(), Some(&base))?;
        let vars = params.vars();
        let mut opt = AdamW::new(&vars, cfg.weight_decay)?;
        let mut log = Vec::new();
        if cfg.resume && checkpoint.exists() {
            log = load_checkpoint(&checkpoint, &params, &mut opt)?;
            tracing::info!(step = log.len(), dir = %checkpoint.display(), "resuming training");
        }
        let name =
            cfg.output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let elapsed_before = log.last().map_or(0.0, |l: &StepLog| l.elapsed_s);
        Ok(TrainRun {
            cfg: cfg.clone(),
            examples,
            params,
            vars,
            opt,
            total,
            log,
            name,
            checkpoint,
            started: Instant::now(),
            elapsed_before,
            step: None,
        })
    }

    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// Steps finished.
    pub fn steps_done(&self) -> usize {
        self.log.len()
    }

    pub fn done(&self) -> bool {
        self.log.len() >= self.total
    }

    pub fn examples(&self) -> usize {
        self.examples.len()
    }

    /// Runs the next forward/backward pass on `model` (its forward differentiable, passed down
    /// the pass's own calls); returns the step's log line when the pass ended a step.
    pub fn pass(&mut self, model: &Decoder) -> anyhow::Result<Option<StepLog>> {
        if self.done() {
            return Ok(None);
        }
        let t0 = Instant::now();
        if self.step.is_none() {
            self.step = Some(self.begin_step(model)?);
        }
        let result = self.run_pass(model);
        let step = self.step.as_mut().context("no step in progress")?;
        step.busy += t0.elapsed();
        result?;
        if step.next < step.passes.len() {
            return Ok(None);
        }
        self.end_step().map(Some)
    }

    fn begin_step(&self, model: &Decoder) -> anyhow::Result<Step> {
        let (cfg, step) = (&self.cfg, self.log.len());
        // Viewed again each step: a fused module's parts are row selections of its `B`,
        // computed from the values the last update left.
        let adapter = Arc::new(self.params.as_adapter(&model.cfg, &self.name)?);
        let (mut passes, mut targets, mut tokens) = (Vec::new(), Vec::new(), 0);
        for micro in 0..cfg.grad_accum {
            let base = (step * cfg.grad_accum + micro) * cfg.batch_size;
            let batch: Vec<usize> = (0..cfg.batch_size)
                .map(|i| example_at(base + i, self.examples.len(), cfg.seed))
                .collect();
            tokens += batch.iter().map(|&i| self.examples[i].full_len()).sum::<usize>();
            targets.push(batch.iter().map(|&i| self.examples[i].targets.len()).sum());
            let pass = if cfg.micro_batch == 0 { batch.len() } else { cfg.micro_batch };
            for (k, part) in batch.chunks(pass).enumerate() {
                passes.push((micro, k * pass, part.to_vec()));
            }
        }
        Ok(Step {
            adapter,
            passes,
            targets,
            next: 0,
            sums: vec![None; self.vars.len()],
            loss: 0.0,
            tokens,
            busy: Duration::ZERO,
        })
    }

    fn run_pass(&mut self, model: &Decoder) -> anyhow::Result<()> {
        let (cfg, step_no) = (&self.cfg, self.log.len());
        let step = self.step.as_mut().context("no step in progress")?;
        let (micro, first, idx) = &step.passes[step.next];
        let part: Vec<&TrainExample> = idx.iter().map(|&i| &self.examples[i]).collect();
        // Each pass draws its own dropout masks, seeded by step and place in the batch.
        let lora = StepLora::Training {
            mixes: vec![AdapterMix::single(step.adapter.clone(), 1.0); part.len()],
            dropout: cfg.dropout,
            seed: dropout_seed(cfg.seed, step_no * cfg.grad_accum + micro, *first),
        };
        let (loss, n) = batch_loss(model, &lora, &part)?;
        // The pass's share of the batch mean (mean over all answer tokens of the batch).
        let share = n as f64 / step.targets[*micro] as f64 / cfg.grad_accum as f64;
        let loss = (loss * share)?;
        step.loss += loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        drop(loss);
        for (i, v) in self.vars.iter().enumerate() {
            let g = grads.get(v).cloned().context("a LoRA parameter got no gradient")?;
            step.sums[i] = Some(match step.sums[i].take() {
                Some(s) => (s + g)?,
                None => g,
            });
        }
        step.next += 1;
        Ok(())
    }

    fn end_step(&mut self) -> anyhow::Result<StepLog> {
        let step = self.step.take().context("no step in progress")?;
        let cfg = &self.cfg;
        let n = self.log.len();
        let lr = lr_at(cfg.lr, n, cfg.warmup_steps, self.total, cfg.schedule);
        let mut grads: Vec<Tensor> = step.sums.into_iter().flatten().collect();
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        self.opt.step(&self.vars, &grads, lr)?;
        let entry = StepLog {
            step: n + 1,
            loss: step.loss,
            lr,
            grad_norm,
            tokens: step.tokens,
            tokens_per_s: step.tokens as f64 / step.busy.as_secs_f64().max(1e-9),
            elapsed_s: self.elapsed_before + self.started.elapsed().as_secs_f64(),
        };
        self.log.push(entry.clone());
        Ok(entry)
    }

    /// Saves the state after the last finished step (a step in progress is redone on resume).
    pub fn save_checkpoint(&self) -> anyhow::Result<()> {
        save_checkpoint(&self.checkpoint, &self.params, &self.opt, self.cfg.seed, &self.log)
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// Saves parameters and optimizer moments alone (a training client's state, no run log).
pub fn save_state(dir: &Path, params: &LoraParams, opt: &AdamW) -> anyhow::Result<()> {
    save_checkpoint(dir, params, opt, 0, &[])
}

/// Restores what [`save_state`] saved.
pub fn load_state(dir: &Path, params: &LoraParams, opt: &mut AdamW) -> anyhow::Result<()> {
    load_checkpoint(dir, params, opt).map(|_| ())
}

/// The LoRA-dropout seed of the pass that starts at example `first` of micro-batch `micro`.
fn dropout_seed(seed: u64, micro: usize, first: usize) -> u64 {
    seed ^ ((micro as u64) << 20) ^ ((first as u64) << 48)
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    step: usize,
    adam_t: usize,
    seed: u64,
    log: Vec<StepLog>,
}

fn save_checkpoint(
    dir: &Path,
    params: &LoraParams,
    opt: &AdamW,
    seed: u64,
    log: &[StepLog],
) -> anyhow::Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, v) in params.vars().iter().enumerate() {
        tensors.insert(format!("param.{i}"), v.as_tensor().detach());
        tensors.insert(format!("m.{i}"), opt.m[i].clone());
        tensors.insert(format!("v.{i}"), opt.v[i].clone());
    }
    candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))?;
    let meta = CheckpointMeta { step: log.len(), adam_t: opt.t, seed, log: log.to_vec() };
    std::fs::write(tmp.join("state.json"), serde_json::to_vec(&meta)?)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&tmp, dir)?;
    Ok(())
}

fn load_checkpoint(
    dir: &Path,
    params: &LoraParams,
    opt: &mut AdamW,
) -> anyhow::Result<Vec<StepLog>> {
    let meta: CheckpointMeta = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
    let t =
        candle_core::safetensors::load(dir.join("state.safetensors"), &candle_core::Device::Cpu)?;
    let get = |k: String| t.get(&k).cloned().with_context(|| format!("checkpoint lacks `{k}`"));
    for (i, v) in params.vars().iter().enumerate() {
        v.set(&get(format!("param.{i}"))?)?;
        opt.m[i] = get(format!("m.{i}"))?;
        opt.v[i] = get(format!("v.{i}"))?;
    }
    opt.t = meta.adam_t;
    anyhow::ensure!(meta.log.len() == meta.step, "checkpoint log and step disagree");
    Ok(meta.log)
}
