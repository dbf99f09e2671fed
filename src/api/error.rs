//! The one error type of the HTTP edge, rendered in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`. Typed errors of the core convert here.

use crate::adapters::registry::RegistryError;
use crate::engine::{EngineError, SequenceError};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status);
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still be trickling in: the connection cannot be reused.
            res.force_close();
        }
        res.json(self.body())
    }
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body, also used as the final SSE event of a failed stream.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_default()
    }

    /// 400: the body is not a valid request (JSON, types, missing or unknown fields).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 422: a well-formed request with values we refuse (ranges, limits, lengths).
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", message)
            .with_param(param)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
            .with_code("invalid_api_key")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
            .with_code("admin_key_required")
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message)
            .with_code("request_too_large")
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            .with_code("server_overloaded")
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message)
    }

    /// 415: a JSON route called with another `Content-Type` (which is also what keeps a web
    /// page from driving the API with a preflight-free `text/plain` form post).
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", message)
            .with_code("unsupported_media_type")
    }

    /// 408: the body did not arrive in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", message)
            .with_code("request_timeout")
    }

    /// 409: the request conflicts with the state of what it names (a finished job, a file in
    /// use).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message).with_code("conflict")
    }

    /// 403 for a request the HTTP policy refuses (origin, host).
    pub fn refused(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message).with_code(code)
    }

    /// 500 with a message of ours that is safe to show (no internal detail).
    fn server(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message).with_code(code)
    }

    /// 500: the detail goes to the log, the client gets a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal server error")
    }
}

/// Middleware: a panic while handling a request answers that request with a 500 in OpenAI's
/// shape (the panic's message goes to the log, never into the body) instead of taking down
/// the HTTP worker and every connection it holds. The answer travels as the service's error:
/// the request itself is gone with the panic.
pub async fn catch_panics(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(next.call(req)).catch_unwind().await {
        Ok(res) => res,
        Err(payload) => {
            let detail = crate::engine::SequenceError::from_panic(payload);
            Err(ApiError::internal(format_args!("a request handler panicked: {detail}")).into())
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull { .. } => ApiError::overloaded(e.to_string()),
            EngineError::ShuttingDown => {
                ApiError::unavailable(e.to_string()).with_code("shutting_down")
            }
            EngineError::TooLarge { .. } => {
                ApiError::invalid_value("max_tokens", e.to_string()).with_code("kv_cache_exceeded")
            }
            EngineError::TooManySequences { .. } => {
                ApiError::invalid_value("n", e.to_string()).with_code("too_many_sequences")
            }
        }
    }
}

/// One sequence's failure, as its request (or its stream's last event) reports it.
impl From<SequenceError> for ApiError {
    fn from(e: SequenceError) -> Self {
        let msg = e.to_string();
        match e {
            SequenceError::NonFinite { with_adapters: true } => {
                ApiError::invalid_value("adapters", msg).with_code("non_finite_output")
            }
            SequenceError::NonFinite { with_adapters: false } => {
                ApiError::server(msg, "non_finite_output")
            }
            SequenceError::Token(detail) => {
                tracing::error!(%detail, "choosing a token failed");
                let msg = "choosing the next token failed: the request's sampling values led the sampler to numbers it cannot use (logged); other requests were not affected";
                ApiError::server(msg, "token_choice_failed")
            }
            // The request's own constraint (with its logit rules) left no way on.
            SequenceError::Grammar(_) => {
                ApiError::invalid_value("response_format", msg).with_code("grammar_failed")
            }
            SequenceError::Panic(detail) | SequenceError::Internal(detail) => {
                tracing::error!(%detail, "a sequence hit an engine bug");
                ApiError::server("the engine hit a bug while handling this sequence (logged); other requests were not affected", "engine_bug")
            }
            SequenceError::StepFailed(detail) => {
                tracing::error!(%detail, "a sequence failed a recomputed step");
                ApiError::server("a forward step failed twice with this sequence in it (logged); the other sequences were recomputed", "engine_step_failed")
            }
            SequenceError::Refused(inner) => inner.into(),
            SequenceError::Injected => ApiError::server(msg, "injected_fault"),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let msg = e.to_string();
        match e {
            RegistryError::NotFound(_) => {
                ApiError::not_found(msg).with_param("adapters").with_code("adapter_not_found")
            }
            RegistryError::InvalidName(_) | RegistryError::OutsideRoot(_) => {
                ApiError::invalid_value("adapters", msg).with_code("invalid_adapter_name")
            }
            RegistryError::LoadFailed { .. } => {
                ApiError::invalid_value("adapters", msg).with_code("adapter_load_failed")
            }
            RegistryError::TooLarge { .. } => {
                ApiError::invalid_value("adapters", msg).with_code("adapter_too_large")
            }
            RegistryError::BudgetExhausted { .. } => {
                ApiError::unavailable(msg).with_code("adapter_budget_exhausted")
            }
            RegistryError::VersionNotFound { .. } => ApiError::not_found(msg)
                .with_param("adapters")
                .with_code("adapter_version_not_found"),
        }
    }
}
