//! The HTTP edge (actix-web): OpenAI-style routes, auth, and the shared application state.
//! `configure` is used by `serve` and by the tests' in-process service alike.

pub mod adapter_files;
pub mod body;
pub mod chat;
pub mod context;
pub mod error;
pub mod fine_tuning;
pub mod guard;
pub mod handlers;
pub mod merges;
pub mod observe;
pub mod openai;
pub mod response;
pub mod responses;
pub mod routes;
pub mod rules;
pub mod stream;
pub mod structured;
pub mod training;
pub mod ui;
pub mod validate;
pub mod vllm;

use crate::adapters::registry::Registry;
use crate::config::Limits;
use crate::engine::Engine;
use crate::model::tokenizer::TextTokenizer;
use actix_web::web;
use error::ApiError;
use std::sync::{Arc, OnceLock};
use subtle::ConstantTimeEq;

/// Everything that exists once the model is loaded.
pub struct Backend {
    pub engine: Engine,
    pub tokenizer: Arc<TextTokenizer>,
    pub registry: Arc<Registry>,
    pub model_id: String,
    /// The base model's family (`llama`, `qwen2`, …), as `/v1/models` reports it.
    pub architecture: String,
    pub context_len: usize,
    /// The model's logits width (token ids below it are valid).
    pub vocab: usize,
    /// Structured outputs: the tokenizer as llguidance sees it and the compiled grammars, or
    /// why they are unavailable.
    pub grammars: Result<Arc<crate::structured::Grammars>, String>,
    /// The fine-tuning API (files and jobs), when the state folder opened.
    pub fine_tuning: Option<Arc<crate::finetune::FineTuning>>,
    /// Training clients (the online-training API), when the state folder opened.
    pub training: Option<Arc<crate::online::TrainingClients>>,
}

/// Shared by all HTTP workers. `backend` is empty until the model has loaded (`/ready` 503).
pub struct AppState {
    pub backend: Arc<OnceLock<Backend>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    /// Browser origins and host names (CORS, DNS rebinding).
    pub http: guard::HttpPolicy,
}

impl AppState {
    /// The state of a server with this configuration (the backend fills in once loaded).
    pub fn new(
        cfg: &crate::config::ServeConfig,
        backend: Arc<OnceLock<Backend>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            backend,
            metrics,
            limits: cfg.limits.clone(),
            api_key: cfg.api_key.clone(),
            admin_key: cfg.admin_key.clone(),
            http: cfg.http_policy(),
        }
    }

    pub fn backend(&self) -> Result<&Backend, ApiError> {
        self.backend.get().ok_or_else(|| {
            ApiError::unavailable("the model is still loading").with_code("not_ready")
        })
    }
}

/// Registers every route on `cfg`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("")
            .wrap(actix_web::middleware::from_fn(error::catch_panics))
            .wrap(actix_web::middleware::from_fn(body::middleware))
            .wrap(actix_web::middleware::from_fn(guard::middleware))
            .wrap(actix_web::middleware::from_fn(observe::middleware))
            .configure(routes::register),
    );
}

pub use routes::Access;

fn key_matches(presented: &str, key: &Option<String>) -> bool {
    key.as_ref().is_some_and(|k| bool::from(presented.as_bytes().ct_eq(k.as_bytes())))
}

/// Checks the bearer token for `scope`; keys are compared in constant time and never logged.
pub fn authorize(
    req: &actix_web::HttpRequest,
    state: &AppState,
    access: Access,
) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let is_admin = presented.is_some_and(|p| key_matches(p, &state.admin_key));
    let is_user = presented.is_some_and(|p| key_matches(p, &state.api_key));
    match access {
        Access::Public => Ok(()),
        Access::Admin if state.admin_key.is_some() => {
            if is_admin {
                Ok(())
            } else if is_user {
                Err(ApiError::forbidden("this endpoint needs the admin key"))
            } else {
                Err(ApiError::unauthorized("missing or invalid admin key"))
            }
        }
        _ if state.api_key.is_none() || is_user || is_admin => Ok(()),
        _ => Err(ApiError::unauthorized(
            "missing or invalid API key (send `Authorization: Bearer <key>`)",
        )),
    }
}
