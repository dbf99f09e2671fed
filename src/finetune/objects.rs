//! The fine-tuning API's objects in OpenAI's shapes (`file`, `fine_tuning.job`,
//! `fine_tuning.job.event`, `fine_tuning.job.checkpoint`), as stored in the state folder and
//! returned by the HTTP edge. Extension fields of ours are named `lora` and documented.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `prefix-` and 24 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    /// Deprecated in OpenAI's API; present only when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_details: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn finished(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// The resolved hyperparameters (OpenAI's three; `"auto"` is resolved when the job is made).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hyperparameters {
    pub n_epochs: u32,
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
}

/// Our extension: the LoRA the job trains.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub target_modules: Vec<String>,
    /// DoRA (PEFT's `use_dora`); absent in jobs stored before it existed.
    #[serde(default)]
    pub use_dora: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub object: String,
    pub model: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub fine_tuned_model: Option<String>,
    pub organization_id: String,
    pub result_files: Vec<String>,
    pub status: JobStatus,
    pub validation_file: Option<String>,
    pub training_file: String,
    pub hyperparameters: Hyperparameters,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobError>,
    pub user_provided_suffix: Option<String>,
    pub seed: u64,
    pub estimated_finish: Option<u64>,
    pub integrations: Vec<Value>,
    pub method: Value,
    pub metadata: Option<Value>,
    /// Extension: the LoRA settings.
    pub lora: LoraSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Event {
    pub fn new(level: &str, message: impl Into<String>, data: Option<Value>) -> Event {
        Event {
            id: new_id("ftevent"),
            object: "fine_tuning.job.event".into(),
            created_at: now(),
            level: level.into(),
            message: message.into(),
            kind: if data.is_some() { "metrics" } else { "message" }.into(),
            data,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    /// The adapter this checkpoint is served as.
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub step_number: usize,
    pub metrics: Value,
}

/// One page of a list, newest first, after the item `after` (OpenAI's cursor).
pub fn page<T: Serialize>(
    items: Vec<T>,
    id: impl Fn(&T) -> &str,
    after: Option<&str>,
    limit: usize,
) -> Value {
    let start = after.and_then(|a| items.iter().position(|t| id(t) == a)).map_or(0, |i| i + 1);
    let rest = items.len().saturating_sub(start);
    let data: Vec<&T> = items.iter().skip(start).take(limit).collect();
    let first = data.first().map(|t| id(t));
    let last = data.last().map(|t| id(t));
    serde_json::json!({"object": "list", "data": data, "first_id": first, "last_id": last,
        "has_more": rest > limit})
}
