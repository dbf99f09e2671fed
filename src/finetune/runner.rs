//! The engine-thread side of fine-tuning: [`FineTuning`] as the engine's background work.
//! A job's files are tokenized on a helper thread; then each slice is one forward/backward
//! pass of the running job on the engine's own model; a
//! step's end logs its loss, every few steps leave a resumable state, each epoch's end a
//! servable checkpoint adapter, and the last step the job's adapter, registered at once.

use super::objects::{now, Checkpoint, Event, JobError, JobStatus};
use super::{fine_tuned_name, lock, FineTuning, BASE_LR};
use crate::engine::Background;
use crate::model::Decoder;
use crate::train::data::{self, Record, TrainExample};
use crate::train::run::TrainRun;
use crate::train::trainer::StepLog;
use crate::train::{TrainConfig, TrainOptions};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

/// Steps between two resumable states (and at each epoch's end).
const SAVE_EVERY: usize = 5;

/// Epoch ends kept as servable checkpoints, the job's final adapter included.
const SERVABLE_EPOCHS: usize = 3;

/// Validation examples the server scores at a job's end at most (the loss is a mean; a huge
/// validation file would hold the engine thread).
const MAX_VALIDATION: usize = 256;

/// How long one slice waits for a job's files to finish tokenizing.
const PREPARE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The engine thread's fine-tuning work: a job whose files are being read and tokenized on a
/// helper thread (a large file must not hold the engine), or a job training.
pub enum Slot {
    Preparing { job: Box<super::objects::Job>, ready: mpsc::Receiver<anyhow::Result<Tokenized>> },
    Training(Box<Active>),
}

/// A job's files, tokenized.
pub struct Tokenized {
    examples: Vec<TrainExample>,
    validation: Option<Vec<TrainExample>>,
}

/// The job the engine thread is training.
pub struct Active {
    job_id: String,
    name: String,
    run: TrainRun,
    cfg: TrainConfig,
    steps_per_epoch: usize,
    epochs: usize,
    validation: Option<Vec<TrainExample>>,
}

impl Background for FineTuning {
    fn pending(&self) -> bool {
        if self.stopping.load(Ordering::SeqCst) {
            return lock(&self.runner).is_some();
        }
        self.waiting.load(Ordering::SeqCst) || lock(&self.runner).is_some()
    }

    fn run_slice(&self, model: &Decoder) {
        let mut slot = lock(&self.runner);
        if self.stopping.load(Ordering::SeqCst) {
            if let Some(Slot::Training(a)) = slot.take() {
                self.park(&a);
            }
            return;
        }
        *slot = match slot.take() {
            None => self.start_next(model),
            Some(Slot::Preparing { job, ready }) => self.await_files(job, ready, model),
            Some(Slot::Training(a)) => self.train_pass(a, model),
        };
    }
}

impl FineTuning {
    /// Marks the oldest running (resumed) or queued job running and tokenizes its files on a
    /// helper thread.
    fn start_next(&self, model: &Decoder) -> Option<Slot> {
        let job = {
            let st = lock(&self.state);
            let pick = |s: JobStatus| st.jobs.iter().find(|j| j.job.status == s);
            let next = pick(JobStatus::Running).or_else(|| pick(JobStatus::Queued));
            // Cleared under the state lock; `create_job` sets it after adding its job under the
            // same lock, so a job added after this scan sets it again.
            if next.is_none() {
                self.waiting.store(false, Ordering::SeqCst);
            }
            next.map(|j| j.job.clone())?
        };
        self.update(&job.id, |j| j.status = JobStatus::Running);
        let max_len = max_seq_len(model);
        let tok = self.tokenizer.clone();
        let train = self.store.content_path(&job.training_file);
        let valid = job.validation_file.as_ref().map(|v| self.store.content_path(v));
        let (tx, ready) = mpsc::channel();
        let spawned =
            std::thread::Builder::new().name("loraplex-ft-data".into()).spawn(move || {
                let read = || -> anyhow::Result<Tokenized> {
                    let examples = tokenize_file(&train, &tok, max_len)?;
                    let validation = match valid {
                        Some(v) => Some(tokenize_file(&v, &tok, max_len)?),
                        None => None,
                    };
                    Ok(Tokenized { examples, validation })
                };
                let _ = tx.send(read());
            });
        if let Err(e) = spawned {
            self.fail(&job.id, "server_error", &format!("cannot start reading the files: {e}"));
            return None;
        }
        Some(Slot::Preparing { job: Box::new(job), ready })
    }

    /// Starts training once the files are tokenized (a cancelled job is dropped).
    fn await_files(
        &self,
        job: Box<super::objects::Job>,
        ready: mpsc::Receiver<anyhow::Result<Tokenized>>,
        model: &Decoder,
    ) -> Option<Slot> {
        let data = match ready.recv_timeout(PREPARE_POLL) {
            Err(mpsc::RecvTimeoutError::Timeout) => return Some(Slot::Preparing { job, ready }),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(anyhow::anyhow!("reading the files failed"))
            }
            Ok(data) => data,
        };
        if self.job(&job.id).map(|j| j.status).ok() != Some(JobStatus::Running) {
            return None; // cancelled while its files were read
        }
        match data.and_then(|t| self.prepare(&job, t, model)) {
            Ok(a) => {
                let resumed = a.run.steps_done();
                let msg = if resumed > 0 {
                    format!("Fine-tuning job resumed at step {resumed}/{}", a.run.total_steps())
                } else {
                    format!(
                        "Fine-tuning job started: {} examples, {} steps",
                        a.run.examples(),
                        a.run.total_steps()
                    )
                };
                self.event(&job.id, Event::new("info", msg, None));
                Some(Slot::Training(Box::new(a)))
            }
            Err(e) => {
                self.fail(&job.id, "invalid_training_file", &format!("{e:#}"));
                None
            }
        }
    }

    /// One forward/backward pass of the training job.
    fn train_pass(&self, mut a: Box<Active>, model: &Decoder) -> Option<Slot> {
        let status = self.job(&a.job_id).map(|j| j.status).ok();
        if status != Some(JobStatus::Running) {
            self.discard(&a);
            return None;
        }
        // A panic in a pass fails the job, never the engine thread serving requests.
        let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.run.pass(model)));
        let pass = pass.unwrap_or_else(|_| Err(anyhow::anyhow!("the training pass panicked")));
        match pass {
            Err(e) => {
                self.fail(&a.job_id, "training_error", &format!("{e:#}"));
                None
            }
            Ok(None) => Some(Slot::Training(a)),
            Ok(Some(entry)) => {
                if let Err(e) = self.after_step(&a, &entry) {
                    tracing::warn!(job = %a.job_id, error = %e, "checkpoint failed");
                }
                if !a.run.done() {
                    return Some(Slot::Training(a));
                }
                if let Err(e) = self.finish(*a, model) {
                    tracing::error!(error = %e, "fine-tuning job could not finish");
                }
                None
            }
        }
    }

    fn prepare(
        &self,
        job: &super::objects::Job,
        data: Tokenized,
        model: &Decoder,
    ) -> anyhow::Result<Active> {
        let name = fine_tuned_name(job);
        let max_seq_len = max_seq_len(model);
        let Tokenized { examples, mut validation } = data;
        if let Some(v) = validation.as_mut() {
            v.truncate(MAX_VALIDATION);
        }
        let h = &job.hyperparameters;
        let steps_per_epoch = examples.len().div_ceil(h.batch_size as usize).max(1);
        let total = steps_per_epoch * h.n_epochs as usize;
        let cfg = TrainConfig::try_from(TrainOptions {
            model: Some(self.model_id.clone()),
            data: Some(self.store.content_path(&job.training_file)),
            validation_data: job.validation_file.as_ref().map(|v| self.store.content_path(v)),
            output: Some(self.registry.root().join(&name)),
            rank: Some(job.lora.rank),
            alpha: Some(job.lora.alpha),
            dropout: Some(job.lora.dropout),
            target_modules: Some(job.lora.target_modules.clone()),
            use_dora: Some(job.lora.use_dora),
            steps: Some(total),
            batch_size: Some(h.batch_size as usize),
            grad_accum: Some(1),
            // At most 4 examples per pass: the slices that run between inference steps stay
            // short, and each pass unpacks the weights once for its backward.
            micro_batch: Some(4),
            lr: Some(BASE_LR * h.learning_rate_multiplier),
            warmup_steps: Some(total / 10),
            max_seq_len: Some(max_seq_len),
            seed: Some(job.seed),
            resume: Some(true),
            ..Default::default()
        })?;
        let run = TrainRun::new(model, examples, &cfg, self.store.train_state(&job.id))?;
        let epochs = h.n_epochs as usize;
        Ok(Active { job_id: job.id.clone(), name, run, cfg, steps_per_epoch, epochs, validation })
    }

    fn after_step(&self, a: &Active, entry: &StepLog) -> anyhow::Result<()> {
        let (step, total) = (entry.step, a.run.total_steps());
        let metrics = serde_json::json!({
            "step": step, "total_steps": total, "train_loss": entry.loss,
            "learning_rate": entry.lr, "tokens": entry.tokens,
        });
        self.event(
            &a.job_id,
            Event::new(
                "info",
                format!("Step {step}/{total}: training loss={:.4}", entry.loss),
                Some(metrics.clone()),
            ),
        );
        let tokens: usize = a.run.log.iter().map(|l| l.tokens).sum();
        self.update(&a.job_id, |j| j.trained_tokens = Some(tokens as u64));
        if a.run.done() {
            return Ok(());
        }
        let epoch_end = step % a.steps_per_epoch == 0;
        if epoch_end || step % SAVE_EVERY == 0 {
            a.run.save_checkpoint()?;
        }
        // Like OpenAI, the last epochs' ends are kept as servable checkpoints (the final one
        // is the job's own adapter).
        let epoch = step / a.steps_per_epoch;
        let running = self.job(&a.job_id).map(|j| j.status).ok() == Some(JobStatus::Running);
        if epoch_end && epoch + SERVABLE_EPOCHS > a.epochs && running {
            let name = format!("{}-step-{step}", a.name);
            self.write_adapter(a, &name, &[])?;
            self.add_checkpoint(&a.job_id, checkpoint(&a.job_id, &name, step, metrics));
            self.event(
                &a.job_id,
                Event::new("info", format!("Checkpoint created at step {step}: {name}"), None),
            );
        }
        Ok(())
    }

    fn write_adapter(
        &self,
        a: &Active,
        name: &str,
        extra: &[(&str, Vec<u8>)],
    ) -> anyhow::Result<()> {
        let dir = self.registry.root().join(name);
        let params = &a.run.params;
        crate::adapters::writer::save_dora_modules(
            &dir,
            &params.config,
            &params.export()?,
            &params.export_magnitudes()?,
            extra,
        )?;
        self.registry.rescan();
        Ok(())
    }

    fn finish(&self, a: Active, model: &Decoder) -> anyhow::Result<()> {
        let validation_loss = match &a.validation {
            Some(v) => {
                let adapter = Arc::new(a.run.params.as_adapter(&model.cfg, &a.name)?);
                Some(crate::train::trainer::mean_loss(model, &adapter, v, a.cfg.batch_size)?)
            }
            None => None,
        };
        let log: String = a
            .run
            .log
            .iter()
            .filter_map(|l| serde_json::to_string(l).ok())
            .map(|l| l + "\n")
            .collect();
        let card = format!(
            "---\nlibrary_name: peft\n---\n\n# {}\n\nA LoRA adapter trained by loraplex's fine-tuning API \
             (job `{}`) on chat, prompt/completion or SQuAD data, in Hugging Face PEFT format. Recipe: \
             `training_recipe.json`; per-step loss: `training_log.jsonl`; validation loss {}.\n",
            a.name,
            a.job_id,
            validation_loss.map_or("not measured".into(), |v| format!("{v:.4}"))
        );
        let extra = [
            ("training_log.jsonl", log.into_bytes()),
            ("training_recipe.json", serde_json::to_vec_pretty(&a.cfg)?),
            ("README.md", card.into_bytes()),
        ];
        // Written under a hidden name the registry does not serve, then renamed into place in
        // the same step that marks the job succeeded, under the state lock `cancel` takes: a
        // cancel that arrives during the last pass or while this writes wins, and nothing of
        // the job is ever served.
        let root = self.registry.root();
        let staged = root.join(format!(".{}.staging", a.name));
        let _ = std::fs::remove_dir_all(&staged);
        let params = &a.run.params;
        crate::adapters::writer::save_dora_modules(
            &staged,
            &params.config,
            &params.export()?,
            &params.export_magnitudes()?,
            &extra,
        )?;
        let results = self.add_results(&a, validation_loss)?;
        self.before_commit();
        let committed = self.with_job(&a.job_id, |j| {
            if j.job.status != JobStatus::Running {
                return Ok(None);
            }
            let dir = root.join(&a.name);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&staged, &dir)?;
            j.job.status = JobStatus::Succeeded;
            j.job.fine_tuned_model = Some(a.name.clone());
            j.job.finished_at = Some(now());
            j.job.result_files = vec![results.clone()];
            Ok::<_, std::io::Error>(Some(j.job.clone()))
        })??;
        let Some(job) = committed else {
            let _ = std::fs::remove_dir_all(&staged);
            let _ = self.delete_file(&results);
            self.discard(&a);
            return Ok(());
        };
        self.store.save_job(&job)?;
        self.registry.rescan();
        let last = a.run.log.last().map_or(f64::NAN, |l| l.loss);
        let mut metrics = serde_json::json!({"step": a.run.steps_done(), "train_loss": last});
        if let Some(v) = validation_loss {
            metrics["valid_loss"] = serde_json::json!(v);
        }
        self.add_checkpoint(&a.job_id, checkpoint(&a.job_id, &a.name, a.run.steps_done(), metrics));
        let _ = std::fs::remove_dir_all(self.store.train_state(&a.job_id));
        self.event(
            &a.job_id,
            Event::new("info", format!("The job has successfully completed: {}", a.name), None),
        );
        Ok(())
    }

    /// The job's per-step metrics as a `fine-tune-results` CSV file.
    fn add_results(&self, a: &Active, valid: Option<f64>) -> anyhow::Result<String> {
        let mut csv = String::from("step,train_loss,learning_rate,tokens,valid_loss\n");
        for l in &a.run.log {
            csv.push_str(&format!("{},{},{},{},\n", l.step, l.loss, l.lr, l.tokens));
        }
        if let Some(v) = valid {
            csv.push_str(&format!("{},,,,{v}\n", a.run.steps_done()));
        }
        let (id, _) = self.new_upload();
        std::fs::write(self.store.content_path(&id), &csv)?;
        let file = super::objects::FileObject {
            id: id.clone(),
            object: "file".into(),
            bytes: csv.len() as u64,
            created_at: now(),
            filename: "step_metrics.csv".into(),
            purpose: "fine-tune-results".into(),
            status: "processed".into(),
            status_details: None,
        };
        self.store.save_file(&file)?;
        lock(&self.state).files.push(file);
        Ok(id)
    }

    fn fail(&self, id: &str, code: &str, message: &str) {
        tracing::warn!(job = id, code, message, "fine-tuning job failed");
        self.update(id, |j| {
            j.status = JobStatus::Failed;
            j.finished_at = Some(now());
            j.error = Some(JobError { code: code.into(), message: message.into(), param: None });
        });
        self.event(id, Event::new("error", format!("Job failed: {message}"), None));
    }

    /// A cancelled job: its run, resumable state and checkpoint adapters go.
    fn discard(&self, a: &Active) {
        let _ = std::fs::remove_dir_all(self.store.train_state(&a.job_id));
        let names: Vec<String> = self
            .with_job(&a.job_id, |j| {
                j.checkpoints.drain(..).map(|c| c.fine_tuned_model_checkpoint).collect()
            })
            .unwrap_or_default();
        for n in &names {
            let _ = std::fs::remove_dir_all(self.registry.root().join(n));
        }
        let _ = self.store.save_checkpoints(&a.job_id, &[]);
        self.registry.rescan();
    }

    /// Shutdown: the state after the last finished step is saved; the job stays `running`
    /// and resumes from it when the server starts again.
    fn park(&self, a: &Active) {
        match a.run.save_checkpoint() {
            Ok(()) => self.event(
                &a.job_id,
                Event::new(
                    "info",
                    format!("Server stopping: checkpointed at step {}", a.run.steps_done()),
                    None,
                ),
            ),
            Err(e) => tracing::error!(job = %a.job_id, error = %e, "checkpoint at shutdown failed"),
        }
    }
}

/// Tokens per training example: the model's context, at most 1024.
fn max_seq_len(model: &Decoder) -> usize {
    model.cfg.max_position_embeddings.clamp(16, 1024)
}

/// A stored file's usable examples (SQuAD's unanswerable and over-long ones dropped).
fn tokenize_file(
    path: &std::path::Path,
    tok: &crate::model::tokenizer::TextTokenizer,
    max_len: usize,
) -> anyhow::Result<Vec<TrainExample>> {
    let records = data::load(path)?.records;
    let mut out = Vec::new();
    for rec in &records {
        if matches!(rec, Record::Squad(q) if q.answers.is_empty()) {
            continue;
        }
        if let Some(ex) = data::tokenize(rec, tok, max_len, crate::train::squad::Overflow::Skip)? {
            out.push(ex);
        }
    }
    let name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    anyhow::ensure!(!out.is_empty(), "file `{name}` has no example that fits {max_len} tokens");
    Ok(out)
}

fn checkpoint(job: &str, name: &str, step: usize, metrics: serde_json::Value) -> Checkpoint {
    Checkpoint {
        id: super::objects::new_id("ftckpt"),
        object: "fine_tuning.job.checkpoint".into(),
        created_at: now(),
        fine_tuned_model_checkpoint: name.into(),
        fine_tuning_job_id: job.into(),
        step_number: step,
        metrics,
    }
}
