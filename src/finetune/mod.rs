//! Fine-tuning as a service: OpenAI's files and fine-tuning jobs on the running server. Files
//! are checked at upload and again when a job is made (the checks of `loraplex train`); jobs
//! run one at a time on the engine thread's own model (`runner`, no second copy), at lower
//! priority than inference; the finished adapter is written into the adapters folder and
//! served at once as the job's `fine_tuned_model`. Everything lives in the state folder
//! (`store`) and survives a restart: a running job resumes from its last checkpoint.

pub mod objects;
pub mod runner;
pub mod store;

use crate::adapters::registry::Registry;
use crate::model::tokenizer::TextTokenizer;
use crate::model::DecoderConfig;
use objects::{now, Checkpoint, Event, FileObject, Hyperparameters, Job, JobStatus, LoraSettings};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use store::{JobRecord, Store};

/// Why a fine-tuning request was refused.
#[derive(Debug, thiserror::Error)]
pub enum FineTuneError {
    #[error("no {what} `{id}`")]
    NotFound { what: &'static str, id: String },
    #[error("{message}")]
    Invalid { param: Option<&'static str>, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("fine-tuning state: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(param: &'static str, message: impl Into<String>) -> FineTuneError {
    FineTuneError::Invalid { param: Some(param), message: message.into() }
}

/// A validated job request (the HTTP edge parses the JSON into this).
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: Option<u64>,
    /// `None` = `"auto"`.
    pub n_epochs: Option<u32>,
    pub batch_size: Option<u32>,
    pub learning_rate_multiplier: Option<f64>,
    pub lora: LoraSettings,
    pub metadata: Option<serde_json::Value>,
}

/// The learning rate a multiplier of 1 gives (`loraplex train`'s default).
pub const BASE_LR: f64 = 5e-4;

#[derive(Default)]
struct State {
    files: Vec<FileObject>,
    jobs: Vec<JobRecord>,
}

pub struct FineTuning {
    store: Store,
    state: Mutex<State>,
    registry: Arc<Registry>,
    tokenizer: Arc<TextTokenizer>,
    model_id: String,
    model_cfg: DecoderConfig,
    /// Why this server cannot train (its weight format), if it cannot.
    trainable: Result<(), String>,
    engine: OnceLock<crate::engine::Engine>,
    runner: Mutex<Option<runner::Slot>>,
    /// A job may be waiting to start (cleared when the engine finds none): what the engine
    /// checks before every step costs one atomic load.
    waiting: AtomicBool,
    /// SIGTERM: checkpoint the running job and take no more slices.
    stopping: AtomicBool,
    /// Set once a stop left nothing running.
    parked: AtomicBool,
    /// Test-only: runs once, after a job's last pass and before its success is committed (the
    /// window a cancel can arrive in). Production never sets it.
    commit_hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FineTuning {
    /// Opens the state folder; jobs left running or queued by an earlier process run again
    /// (a running one from its checkpoint).
    pub fn open(
        state_dir: &Path,
        registry: Arc<Registry>,
        tokenizer: Arc<TextTokenizer>,
        model_id: String,
        model_cfg: DecoderConfig,
        trainable: Result<(), String>,
    ) -> std::io::Result<FineTuning> {
        let (store, files, jobs) = Store::open(state_dir)?;
        let unfinished = jobs.iter().filter(|j| !j.job.status.finished()).count();
        tracing::info!(dir = %state_dir.display(), files = files.len(), jobs = jobs.len(), unfinished, "fine-tuning state");
        Ok(FineTuning {
            store,
            state: Mutex::new(State { files, jobs }),
            registry,
            tokenizer,
            model_id,
            model_cfg,
            trainable,
            engine: OnceLock::new(),
            runner: Mutex::new(None),
            waiting: AtomicBool::new(unfinished > 0),
            stopping: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            commit_hook: Mutex::new(None),
        })
    }

    /// Test-only: `hook` runs once between a job's last pass and the commit of its success.
    #[doc(hidden)]
    pub fn set_commit_hook(&self, hook: Box<dyn FnOnce() + Send>) {
        *lock(&self.commit_hook) = Some(hook);
    }

    fn before_commit(&self) {
        let hook = lock(&self.commit_hook).take();
        if let Some(h) = hook {
            h();
        }
    }

    /// The engine whose thread runs the jobs (woken when one is queued).
    pub fn attach(&self, engine: crate::engine::Engine) {
        let _ = self.engine.set(engine);
    }

    fn wake(&self) {
        if let Some(e) = self.engine.get() {
            e.wake();
        }
    }

    // ---- files ----

    /// A fresh file id and where its upload is written while it arrives.
    pub fn new_upload(&self) -> (String, PathBuf) {
        let id = objects::new_id("file");
        let path = self.store.upload_path(&id);
        (id, path)
    }

    /// Checks an arrived upload as `loraplex train --data` would and keeps it.
    pub fn add_file(
        &self,
        id: String,
        upload: &Path,
        filename: String,
        purpose: &str,
    ) -> Result<FileObject, FineTuneError> {
        let checked = (|| {
            if purpose != "fine-tune" {
                return Err(invalid(
                    "purpose",
                    format!("purpose `{purpose}` is not supported here; use `fine-tune`"),
                ));
            }
            // Reported under the client's file name, never the server's path.
            let data = crate::train::data::load(upload).map_err(|e| {
                invalid("file", e.to_string().replace(&upload.display().to_string(), &filename))
            })?;
            if data.records.is_empty() {
                return Err(invalid("file", format!("`{filename}` holds no examples")));
            }
            Ok(())
        })();
        if let Err(e) = checked {
            let _ = std::fs::remove_file(upload);
            return Err(e);
        }
        let bytes = std::fs::metadata(upload)?.len();
        std::fs::rename(upload, self.store.content_path(&id))?;
        let file = FileObject {
            id,
            object: "file".into(),
            bytes,
            created_at: now(),
            filename,
            purpose: purpose.into(),
            status: "processed".into(),
            status_details: None,
        };
        self.store.save_file(&file)?;
        lock(&self.state).files.push(file.clone());
        Ok(file)
    }

    /// Files, newest first, optionally of one purpose.
    pub fn files(&self, purpose: Option<&str>) -> Vec<FileObject> {
        let st = lock(&self.state);
        st.files.iter().rev().filter(|f| purpose.is_none_or(|p| f.purpose == p)).cloned().collect()
    }

    pub fn file(&self, id: &str) -> Result<FileObject, FineTuneError> {
        let st = lock(&self.state);
        st.files
            .iter()
            .find(|f| f.id == id)
            .cloned()
            .ok_or_else(|| FineTuneError::NotFound { what: "file", id: id.into() })
    }

    pub fn file_content(&self, id: &str) -> Result<PathBuf, FineTuneError> {
        self.file(id).map(|f| self.store.content_path(&f.id))
    }

    /// Deletes a file no unfinished job reads.
    pub fn delete_file(&self, id: &str) -> Result<(), FineTuneError> {
        let mut st = lock(&self.state);
        let Some(i) = st.files.iter().position(|f| f.id == id) else {
            return Err(FineTuneError::NotFound { what: "file", id: id.into() });
        };
        let user = st.jobs.iter().find(|j| {
            !j.job.status.finished()
                && (j.job.training_file == id || j.job.validation_file.as_deref() == Some(id))
        });
        if let Some(j) = user {
            return Err(FineTuneError::Conflict(format!(
                "file `{id}` is used by job `{}`, which has not finished",
                j.job.id
            )));
        }
        self.store.delete_file(id)?;
        st.files.remove(i);
        Ok(())
    }

    // ---- jobs ----

    /// Validates and queues a job.
    pub fn create_job(&self, req: JobRequest) -> Result<Job, FineTuneError> {
        if let Err(why) = &self.trainable {
            return Err(invalid(
                "model",
                format!("this server cannot fine-tune `{}`: {why}", req.model),
            ));
        }
        if req.model != self.model_id {
            return Err(FineTuneError::NotFound { what: "base model", id: req.model });
        }
        check_lora(&self.model_cfg, &req.lora)?;
        check_metadata(req.metadata.as_ref())?;
        if let Some(s) = &req.suffix {
            let ok = !s.is_empty()
                && s.len() <= 40
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(invalid(
                    "suffix",
                    "`suffix` takes 1 to 40 letters, digits, `-` or `_`",
                ));
            }
        }
        let mut ranges = Vec::new();
        if let Some(n) = req.n_epochs {
            ranges.push(("n_epochs", (1..=50).contains(&n), "1 to 50".to_string(), n as f64));
        }
        if let Some(b) = req.batch_size {
            ranges.push(("batch_size", (1..=256).contains(&b), "1 to 256".into(), b as f64));
        }
        if let Some(m) = req.learning_rate_multiplier {
            // The optimizer steps in f32: the learning rate it gives must be a normal f32.
            let lr = (BASE_LR * m) as f32;
            ranges.push((
                "learning_rate_multiplier",
                m.is_finite() && m > 0.0 && m <= 100.0 && lr.is_normal(),
                format!("above 0 (a learning rate of {BASE_LR} × it must be a normal 32-bit float), at most 100"),
                m,
            ));
        }
        for (param, ok, range, v) in ranges {
            if !ok {
                return Err(invalid(param, format!("`{param}` must be {range}, got {v}")));
            }
        }
        let training = self.checked_file(&req.training_file, "training_file")?;
        if let Some(v) = &req.validation_file {
            self.checked_file(v, "validation_file")?;
        }
        let id = objects::new_id("ftjob");
        let hyper = Hyperparameters {
            n_epochs: req.n_epochs.unwrap_or(3),
            batch_size: req.batch_size.unwrap_or_else(|| (training.div_ceil(8)).clamp(1, 8) as u32),
            learning_rate_multiplier: req.learning_rate_multiplier.unwrap_or(1.0),
        };
        let job = Job {
            object: "fine_tuning.job".into(),
            model: req.model,
            created_at: now(),
            finished_at: None,
            fine_tuned_model: None,
            organization_id: "org-loraplex".into(),
            result_files: Vec::new(),
            status: JobStatus::Queued,
            validation_file: req.validation_file,
            training_file: req.training_file,
            method: serde_json::json!({"type": "supervised", "supervised": {"hyperparameters": hyper}}),
            hyperparameters: hyper,
            trained_tokens: None,
            error: None,
            user_provided_suffix: req.suffix,
            seed: req.seed.unwrap_or(42),
            estimated_finish: None,
            integrations: Vec::new(),
            metadata: req.metadata,
            lora: req.lora,
            id,
        };
        let events = vec![
            Event::new("info", format!("Validating training file: {}", job.training_file), None),
            Event::new("info", "Files validated, moving job to queued state", None),
        ];
        // The files' check and the job's creation are one step under the state lock, which
        // `delete_file` takes too: a file deleted meanwhile refuses the job here, and a job
        // that exists keeps its files from being deleted.
        let mut st = lock(&self.state);
        for (param, id) in [
            ("training_file", Some(&job.training_file)),
            ("validation_file", job.validation_file.as_ref()),
        ] {
            if let Some(id) = id.filter(|id| !st.files.iter().any(|f| &f.id == *id)) {
                return Err(invalid(param, format!("`{param}`: no file `{id}` (it was deleted)")));
            }
        }
        self.store.save_job(&job)?;
        for e in &events {
            self.store.append_event(&job.id, e)?;
        }
        st.jobs.push(JobRecord { job: job.clone(), events, checkpoints: Vec::new() });
        drop(st);
        self.waiting.store(true, Ordering::SeqCst);
        self.wake();
        Ok(job)
    }

    /// The number of examples in a stored file, checked again as training would read it.
    fn checked_file(&self, id: &str, param: &'static str) -> Result<usize, FineTuneError> {
        let path = self
            .file_content(id)
            .map_err(|_| invalid(param, format!("`{param}`: no file `{id}`")))?;
        let data = crate::train::data::load(&path).map_err(|e| {
            invalid(
                param,
                format!("`{param}`: {}", e.to_string().replace(&path.display().to_string(), id)),
            )
        })?;
        Ok(data.records.len())
    }

    /// Jobs, newest first.
    pub fn jobs(&self) -> Vec<Job> {
        lock(&self.state).jobs.iter().rev().map(|j| j.job.clone()).collect()
    }

    fn with_job<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut JobRecord) -> T,
    ) -> Result<T, FineTuneError> {
        let mut st = lock(&self.state);
        match st.jobs.iter_mut().find(|j| j.job.id == id) {
            Some(j) => Ok(f(j)),
            None => Err(FineTuneError::NotFound { what: "fine-tuning job", id: id.into() }),
        }
    }

    pub fn job(&self, id: &str) -> Result<Job, FineTuneError> {
        self.with_job(id, |j| j.job.clone())
    }

    /// Events, newest first.
    pub fn events(&self, id: &str) -> Result<Vec<Event>, FineTuneError> {
        self.with_job(id, |j| j.events.iter().rev().cloned().collect())
    }

    /// Checkpoints, newest first.
    pub fn checkpoints(&self, id: &str) -> Result<Vec<Checkpoint>, FineTuneError> {
        self.with_job(id, |j| j.checkpoints.iter().rev().cloned().collect())
    }

    /// Cancels an unfinished job; the engine thread drops its run and its checkpoints at its
    /// next slice, and no adapter of it stays registered.
    pub fn cancel(&self, id: &str) -> Result<Job, FineTuneError> {
        let job = self.with_job(id, |j| {
            if j.job.status.finished() {
                return Err(FineTuneError::Conflict(format!(
                    "job `{id}` has already {}",
                    serde_json::to_value(j.job.status).unwrap_or_default().as_str().unwrap_or("")
                )));
            }
            j.job.status = JobStatus::Cancelled;
            j.job.finished_at = Some(now());
            Ok(j.job.clone())
        })??;
        self.store.save_job(&job)?;
        self.event(id, Event::new("info", "Job cancelled", None));
        self.wake();
        Ok(job)
    }

    /// Records an event (best effort: a failed write is logged, the job goes on).
    fn event(&self, id: &str, ev: Event) {
        if let Err(e) = self.store.append_event(id, &ev) {
            tracing::warn!(job = id, error = %e, "fine-tuning event not saved");
        }
        let _ = self.with_job(id, |j| j.events.push(ev));
    }

    /// Updates and saves a job.
    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let job = self
            .with_job(id, |j| {
                f(&mut j.job);
                j.job.clone()
            })
            .ok()?;
        if let Err(e) = self.store.save_job(&job) {
            tracing::warn!(job = id, error = %e, "fine-tuning job not saved");
        }
        Some(job)
    }

    fn add_checkpoint(&self, id: &str, cp: Checkpoint) {
        let cps = self.with_job(id, |j| {
            j.checkpoints.push(cp);
            j.checkpoints.clone()
        });
        if let Ok(cps) = cps {
            if let Err(e) = self.store.save_checkpoints(id, &cps) {
                tracing::warn!(job = id, error = %e, "checkpoint list not saved");
            }
        }
    }

    /// SIGTERM: the running job checkpoints at the engine's next slice and no more slices run.
    /// Returns once that happened or `timeout` passed.
    pub fn stop(&self, timeout: std::time::Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake();
        let deadline = std::time::Instant::now() + timeout;
        while lock(&self.runner).is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.parked.store(true, Ordering::SeqCst);
    }
}

/// The name a job's adapter is served as: `ft-<suffix>-<12 hex digits of the job id>`
/// (OpenAI's `ft:<base>:<suffix>:<id>` holds `:`, which separates a name from its scale in
/// loraplex's `name:scale` mixes, and is not a folder name everywhere).
pub fn fine_tuned_name(job: &Job) -> String {
    let short: String = job.id.trim_start_matches("ftjob-").chars().take(12).collect();
    match &job.user_provided_suffix {
        Some(s) => format!("ft-{s}-{short}"),
        None => format!("ft-{short}"),
    }
}

/// Module names one job may target (every family has fewer than a dozen).
const MAX_TARGET_MODULES: usize = 64;

/// OpenAI's limits on `metadata`: at most 16 pairs, keys of at most 64 characters, string
/// values of at most 512.
fn check_metadata(metadata: Option<&serde_json::Value>) -> Result<(), FineTuneError> {
    let Some(m) = metadata.filter(|m| !m.is_null()) else { return Ok(()) };
    let Some(map) = m.as_object() else {
        return Err(invalid("metadata", "`metadata` must be an object of strings"));
    };
    if map.len() > 16 {
        return Err(invalid(
            "metadata",
            format!("`metadata` takes at most 16 pairs, got {}", map.len()),
        ));
    }
    for (k, v) in map {
        if k.chars().count() > 64 {
            let msg = format!(
                "`metadata` keys have at most 64 characters; one has {}",
                k.chars().count()
            );
            return Err(invalid("metadata", msg));
        }
        match v.as_str() {
            Some(s) if s.chars().count() <= 512 => {}
            Some(s) => {
                let msg = format!(
                    "`metadata.{}` has {} characters; the limit is 512",
                    k.escape_debug(),
                    s.chars().count()
                );
                return Err(invalid("metadata", msg));
            }
            None => {
                return Err(invalid(
                    "metadata",
                    format!("`metadata.{}` must be a string", k.escape_debug()),
                ))
            }
        }
    }
    Ok(())
}

fn check_lora(cfg: &DecoderConfig, l: &LoraSettings) -> Result<(), FineTuneError> {
    if !(1..=256).contains(&l.rank) {
        return Err(invalid("lora_rank", format!("`lora_rank` must be 1 to 256, got {}", l.rank)));
    }
    if !(l.alpha.is_finite() && l.alpha > 0.0 && l.alpha <= 10_000.0) {
        return Err(invalid(
            "lora_alpha",
            format!("`lora_alpha` must be above 0, got {}", l.alpha),
        ));
    }
    if !(0.0..1.0).contains(&l.dropout) {
        return Err(invalid(
            "lora_dropout",
            format!("`lora_dropout` must be in [0, 1), got {}", l.dropout),
        ));
    }
    if l.target_modules.is_empty() {
        return Err(invalid("target_modules", "`target_modules` is empty"));
    }
    if l.target_modules.len() > MAX_TARGET_MODULES {
        let msg = format!(
            "`target_modules` takes at most {MAX_TARGET_MODULES} names, got {}",
            l.target_modules.len()
        );
        return Err(invalid("target_modules", msg));
    }
    for (i, name) in l.target_modules.iter().enumerate() {
        if name.is_empty() || name.len() > 128 {
            return Err(invalid(
                "target_modules",
                format!("`target_modules[{i}]` must have 1 to 128 characters"),
            ));
        }
        if l.target_modules[..i].contains(name) {
            let msg = format!("`target_modules` names `{}` twice", name.escape_debug());
            return Err(invalid("target_modules", msg));
        }
    }
    let peft = crate::adapters::PeftConfig::from_json(
        &serde_json::json!({"peft_type": "LORA", "r": l.rank, "lora_alpha": l.alpha, "target_modules": l.target_modules})
            .to_string(),
    )
    .map_err(|e| invalid("target_modules", e.to_string()))?;
    crate::train::params::check_targets(cfg, &peft).map_err(|e| invalid("target_modules", e))
}
