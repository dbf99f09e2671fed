//! OpenAI's fine-tuning surface (admin key): `/v1/files` (multipart upload with `purpose`
//! `fine-tune`, list, get, delete, content) and `/v1/fine_tuning/jobs` (create, list, get,
//! cancel, events, checkpoints). Bodies are parsed here into typed requests; the work is
//! [`crate::finetune`]'s. LoRA settings are our documented extension inside
//! `method.supervised.hyperparameters` (`lora_rank`, `lora_alpha`, `lora_dropout`,
//! `target_modules`, `use_dora`).

use super::body::json_body;
use super::error::ApiError;
use super::AppState;
use crate::finetune::objects::{page, LoraSettings};
use crate::finetune::{FineTuneError, FineTuning, JobRequest};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;
use std::io::Write;
use std::sync::Arc;

type Data = web::Data<AppState>;

impl From<FineTuneError> for ApiError {
    fn from(e: FineTuneError) -> Self {
        match e {
            FineTuneError::NotFound { what: "base model", .. } => {
                ApiError::not_found(e.to_string()).with_param("model").with_code("model_not_found")
            }
            FineTuneError::NotFound { .. } => ApiError::not_found(e.to_string()),
            FineTuneError::Invalid { param, message } => match param {
                Some(p) => ApiError::invalid_value(p, message),
                None => ApiError::bad_request(message),
            },
            FineTuneError::Conflict(m) => ApiError::conflict(m),
            FineTuneError::Io(e) => ApiError::internal(e),
        }
    }
}

fn service(state: &AppState) -> Result<Arc<FineTuning>, ApiError> {
    let b = state.backend()?;
    b.fine_tuning.clone().ok_or_else(|| ApiError::unavailable("fine-tuning is not enabled"))
}

#[derive(Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
    purpose: Option<String>,
}

impl ListQuery {
    fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(20),
            Some(n @ 1..=10_000) => Ok(n),
            Some(n) => Err(ApiError::invalid_value(
                "limit",
                format!("`limit` must be 1 to 10000, got {n}"),
            )),
        }
    }
}

// ---- files ----

/// `POST /v1/files`: `multipart/form-data` with `file` and `purpose`.
pub async fn upload(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ft = service(&state)?;
    let limit = state.limits.max_upload_bytes;
    let timeout = state.limits.upload_timeout;
    let (id, path) = ft.new_upload();
    // Removes the partial file however this handler ends: an error, the timeout, or the
    // client going away (actix then drops this future at its current await).
    let partial = PartialUpload(path.clone());
    let read = tokio::time::timeout(timeout, read_upload(&req, payload, &path, limit)).await;
    let (filename, purpose) = match read {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(ApiError::timeout(format!(
                "the upload did not arrive within {} s",
                timeout.as_secs()
            )))
        }
    };
    let file = web::block(move || {
        let kept = ft.add_file(id, &path, filename, &purpose);
        drop(partial);
        kept
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(HttpResponse::Ok().json(file))
}

/// An upload's file while it arrives: removed when dropped (a kept upload has been renamed
/// away by then, so nothing is left to remove).
struct PartialUpload(std::path::PathBuf);

impl Drop for PartialUpload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams the `file` part to `path` (at most `limit` bytes); returns its name and `purpose`.
async fn read_upload(
    req: &HttpRequest,
    payload: web::Payload,
    path: &std::path::Path,
    limit: usize,
) -> Result<(String, String), ApiError> {
    let bad = |m: String| ApiError::bad_request(m);
    let mut form = actix_multipart::Multipart::new(req.headers(), payload);
    let (mut filename, mut purpose) = (None, None);
    while let Some(field) = form.next().await {
        let mut field =
            field.map_err(|e| bad(format!("the body is not a valid multipart form: {e}")))?;
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                let fname = field
                    .content_disposition()
                    .and_then(|cd| cd.get_filename())
                    .unwrap_or("upload.jsonl")
                    .to_string();
                let mut out = std::fs::File::create(path).map_err(ApiError::internal)?;
                let mut written = 0usize;
                while let Some(chunk) = field.next().await {
                    let chunk = chunk.map_err(|e| bad(format!("reading `file`: {e}")))?;
                    written += chunk.len();
                    if written > limit {
                        return Err(ApiError::too_large(format!(
                            "the file exceeds the upload limit of {limit} bytes (--max-upload-bytes)"
                        )));
                    }
                    out.write_all(&chunk).map_err(ApiError::internal)?;
                }
                filename = Some(fname);
            }
            "purpose" => {
                let mut text = Vec::new();
                while let Some(chunk) = field.next().await {
                    let chunk = chunk.map_err(|e| bad(format!("reading `purpose`: {e}")))?;
                    text.extend_from_slice(&chunk);
                    if text.len() > 64 {
                        return Err(ApiError::invalid_value("purpose", "`purpose` is too long"));
                    }
                }
                purpose = Some(String::from_utf8_lossy(&text).trim().to_string());
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown form field `{}` (expected `file` and `purpose`)",
                    other.escape_debug()
                ))
                .with_param(other.to_string()))
            }
        }
    }
    let filename =
        filename.ok_or_else(|| ApiError::invalid_value("file", "the form has no `file`"))?;
    let purpose =
        purpose.ok_or_else(|| ApiError::invalid_value("purpose", "the form has no `purpose`"))?;
    Ok((filename, purpose))
}

pub async fn list_files(state: Data, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let ft = service(&state)?;
    let files = ft.files(q.purpose.as_deref());
    Ok(HttpResponse::Ok().json(page(files, |f| &f.id, q.after.as_deref(), q.limit()?)))
}

pub async fn get_file(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(service(&state)?.file(&id)?))
}

pub async fn delete_file(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    service(&state)?.delete_file(&id)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"id": *id, "object": "file", "deleted": true})))
}

pub async fn file_content(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let path = service(&state)?.file_content(&id)?;
    let bytes = web::block(move || std::fs::read(path)).await.map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(bytes.map_err(ApiError::internal)?))
}

// ---- jobs ----

/// `"auto"` or a value.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum AutoOr<T> {
    Value(T),
    Auto(Auto),
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Auto {
    Auto,
}

impl<T> AutoOr<T> {
    fn value(self) -> Option<T> {
        match self {
            AutoOr::Value(v) => Some(v),
            AutoOr::Auto(Auto::Auto) => None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Hyper {
    n_epochs: Option<AutoOr<u32>>,
    batch_size: Option<AutoOr<u32>>,
    learning_rate_multiplier: Option<AutoOr<f64>>,
    lora_rank: Option<usize>,
    lora_alpha: Option<f64>,
    lora_dropout: Option<f32>,
    target_modules: Option<Vec<String>>,
    use_dora: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Supervised {
    hyperparameters: Option<Hyper>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Method {
    #[serde(rename = "type")]
    kind: String,
    supervised: Option<Supervised>,
    #[allow(dead_code)]
    dpo: Option<serde_json::Value>,
    #[allow(dead_code)]
    reinforcement: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    suffix: Option<String>,
    seed: Option<u64>,
    method: Option<Method>,
    /// OpenAI's older place for the hyperparameters (still accepted by its API).
    hyperparameters: Option<Hyper>,
    metadata: Option<serde_json::Value>,
    integrations: Option<Vec<serde_json::Value>>,
}

impl CreateJob {
    fn into_request(self) -> Result<JobRequest, ApiError> {
        if self.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(ApiError::invalid_value(
                "integrations",
                "`integrations` (Weights & Biases) are not supported; follow the job's events",
            ));
        }
        let from_method = match self.method {
            Some(m) if m.kind != "supervised" => {
                return Err(ApiError::invalid_value(
                    "method.type",
                    format!("`method.type` `{}` is not supported; use `supervised`", m.kind),
                ))
            }
            Some(m) => m.supervised.and_then(|s| s.hyperparameters),
            None => None,
        };
        if from_method.is_some() && self.hyperparameters.is_some() {
            return Err(ApiError::invalid_value(
                "hyperparameters",
                "give the hyperparameters in `method.supervised.hyperparameters` or in `hyperparameters`, not both",
            ));
        }
        let h = from_method.or(self.hyperparameters).unwrap_or_default();
        let lora = LoraSettings {
            rank: h.lora_rank.unwrap_or(16),
            alpha: h.lora_alpha.unwrap_or(32.0),
            dropout: h.lora_dropout.unwrap_or(0.05),
            target_modules: h.target_modules.unwrap_or_else(|| {
                ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec()
            }),
            use_dora: h.use_dora.unwrap_or(false),
        };
        Ok(JobRequest {
            model: self.model,
            training_file: self.training_file,
            validation_file: self.validation_file,
            suffix: self.suffix,
            seed: self.seed,
            n_epochs: h.n_epochs.and_then(AutoOr::value),
            batch_size: h.batch_size.and_then(AutoOr::value),
            learning_rate_multiplier: h.learning_rate_multiplier.and_then(AutoOr::value),
            lora,
            metadata: self.metadata,
        })
    }
}

pub async fn create_job(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ft = service(&state)?;
    let body: CreateJob = json_body(&req, payload, &state.limits).await?;
    let request = body.into_request()?;
    let job = web::block(move || ft.create_job(request)).await.map_err(ApiError::internal)??;
    Ok(HttpResponse::Ok().json(job))
}

pub async fn list_jobs(state: Data, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let ft = service(&state)?;
    Ok(HttpResponse::Ok().json(page(ft.jobs(), |j| &j.id, q.after.as_deref(), q.limit()?)))
}

pub async fn get_job(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(service(&state)?.job(&id)?))
}

pub async fn cancel_job(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(service(&state)?.cancel(&id)?))
}

pub async fn job_events(
    state: Data,
    id: web::Path<String>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let events = service(&state)?.events(&id)?;
    Ok(HttpResponse::Ok().json(page(events, |e| &e.id, q.after.as_deref(), q.limit()?)))
}

pub async fn job_checkpoints(
    state: Data,
    id: web::Path<String>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let cps = service(&state)?.checkpoints(&id)?;
    Ok(HttpResponse::Ok().json(page(cps, |c| &c.id, q.after.as_deref(), q.limit()?)))
}
