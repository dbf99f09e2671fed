//! Per-request observability at the HTTP edge: a request id (taken from `x-request-id` or
//! generated, echoed back), a tracing span, an access-log line, the end-to-end latency
//! histogram and the per-adapter request counters. Streams report when they end (or are cut).

use super::AppState;
use crate::metrics::{Metrics, Outcome};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// The request's id, in request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What a handler learned about the request, for the access log and counters.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// Adapter names of the mix (resolved, or as requested when resolution failed).
    pub adapters: Vec<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The route's label from the route table (`unmatched` for a path no route serves).
pub fn endpoint_label(method: &actix_web::http::Method, path: &str) -> &'static str {
    super::routes::find(method, path).map_or(super::routes::UNMATCHED, |r| r.label)
}

fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{:016x}", rand::random::<u64>()))
}

/// Records a finished request: counters, latency, access log.
pub fn record(
    metrics: &Metrics,
    endpoint: &str,
    facts: &RequestFacts,
    outcome: Outcome,
    started: Instant,
    request_id: &str,
    status: u16,
) {
    if !metrics.enabled {
        return;
    }
    let secs = started.elapsed().as_secs_f64();
    metrics.request_duration.with_label_values(&[endpoint]).observe(secs);
    metrics.count_request(endpoint, &facts.adapters, outcome);
    tracing::info!(
        target: "loraplex::access",
        request_id, endpoint, status, outcome = outcome.as_str(), adapters = %facts.adapters.join(","),
        prompt_tokens = facts.prompt_tokens, completion_tokens = facts.completion_tokens, latency_ms = (secs * 1e3) as u64,
        "request"
    );
}

/// What a streaming response needs to record itself when it ends.
#[derive(Clone)]
pub struct StreamObs {
    pub metrics: Arc<Metrics>,
    pub endpoint: &'static str,
    pub facts: RequestFacts,
    pub started: Instant,
    pub request_id: String,
}

impl std::fmt::Debug for StreamObs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamObs")
            .field("endpoint", &self.endpoint)
            .field("request_id", &self.request_id)
            .finish()
    }
}

/// Records the stream on drop: by the status of its error event if a sequence failed, `ok`
/// if it reached its end, else `cancelled`; with the tokens streamed until then.
pub struct StreamGuard {
    pub obs: Option<StreamObs>,
    pub completed: bool,
    /// A sequence failed: the status its final error event carries.
    pub error_status: Option<u16>,
    /// (prompt, completion) tokens so far.
    pub usage: (usize, usize),
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(mut o) = self.obs.take() {
            let outcome = match (self.error_status, self.completed) {
                (Some(status), _) => Outcome::from_status(status),
                (None, true) => Outcome::Ok,
                (None, false) => Outcome::Cancelled,
            };
            (o.facts.prompt_tokens, o.facts.completion_tokens) = self.usage;
            record(&o.metrics, o.endpoint, &o.facts, outcome, o.started, &o.request_id, 200);
        }
    }
}

pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let rid = request_id(&req);
    req.extensions_mut().insert(RequestId(rid.clone()));
    req.extensions_mut().insert(std::time::Instant::now());
    let started = Instant::now();
    let path = req.path().to_string();
    let endpoint = endpoint_label(req.method(), &path);
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let span = tracing::info_span!("request", request_id = %rid, path = %path);
    let mut res = match next.call(req).instrument(span).await {
        Ok(res) => res,
        // A failure answered from its error (a caught panic): counted and logged all the same.
        Err(e) => {
            if let Some(state) = state {
                let facts = RequestFacts::default();
                let status = e.as_response_error().status_code().as_u16();
                let outcome = Outcome::from_status(status);
                record(&state.metrics, endpoint, &facts, outcome, started, &rid, status);
            }
            return Err(e);
        }
    };
    if let Ok(v) = HeaderValue::from_str(&rid) {
        res.headers_mut().insert(HeaderName::from_static("x-request-id"), v);
    }
    let streaming = res
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    // Every route is counted and logged here, except streams, which record themselves when
    // they end (their status line is sent long before).
    if let (Some(state), false) = (state, streaming) {
        // An inference request without facts failed before resolving its mix: `unknown`.
        let inference = matches!(endpoint, "completions" | "chat_completions" | "responses");
        let facts =
            res.request().extensions().get::<RequestFacts>().cloned().unwrap_or_else(|| {
                let adapters = if inference { vec!["unknown".into()] } else { Vec::new() };
                RequestFacts { adapters, ..Default::default() }
            });
        let status = res.status().as_u16();
        record(
            &state.metrics,
            endpoint,
            &facts,
            Outcome::from_status(status),
            started,
            &rid,
            status,
        );
    }
    Ok(res)
}
