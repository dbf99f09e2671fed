//! Thin handlers (the edge has checked the caller against the route table already): the JSON
//! body (`api::body`) → a `ValidRequest` (`api::validate`, off the async workers) → the engine
//! → the answer (`api::response`, `api::stream`). Also models, adapters, health, readiness,
//! metrics.

use super::body::json_body;
use super::context::ModelView;
use super::error::ApiError;
use super::observe::{RequestFacts, RequestId, StreamObs};
use super::openai::*;
use super::response::ResponseMeta;
use super::stream::{collect, sse_response};
use super::validate::{self, ValidRequest};
use super::{authorize, Access, AppState, Backend};
use actix_web::{web, HttpRequest, HttpResponse};

type Data = web::Data<AppState>;

fn view<'a>(b: &'a Backend, state: &'a AppState) -> ModelView<'a> {
    ModelView {
        id: &b.model_id,
        context_len: b.context_len,
        vocab: b.vocab,
        grammars: b.grammars.as_deref().map_err(String::as_str),
        tokenizer: &b.tokenizer,
        limits: &state.limits,
        registry: Some(&b.registry),
    }
}

/// Runs `validate` (tokenizing prompts, loading adapters: blocking work) on the blocking pool,
/// in the request's span.
pub async fn validated(
    state: &Data,
    validate: impl FnOnce(&ModelView<'_>) -> Result<ValidRequest, ApiError> + Send + 'static,
) -> Result<ValidRequest, ApiError> {
    let state = state.clone();
    let span = tracing::Span::current();
    web::block(move || {
        span.in_scope(|| {
            let b = state.backend()?;
            validate(&view(b, &state))
        })
    })
    .await
    .map_err(ApiError::internal)?
}

/// Submits the request's sequences and answers: one JSON body, or a stream.
pub async fn respond(
    req: &HttpRequest,
    state: &AppState,
    valid: ValidRequest,
) -> Result<HttpResponse, ApiError> {
    let b = state.backend()?;
    if let Some(f) = &b.engine.config().faults {
        let marked = |s: &crate::engine::Request| f.fault_for(&s.prompt_ids);
        if valid.sequences.iter().any(|s| marked(s) == Some(crate::engine::FaultKind::HandlerPanic))
        {
            panic!("injected handler panic (detail that must stay in the log)");
        }
    }
    note_adapters(req, &valid.response.adapters);
    let rxs = b.engine.submit_all(valid.sequences)?;
    let mut meta = ResponseMeta::new(valid.response);
    meta.obs = stream_obs(req, state, meta.shape.endpoint.label());
    if meta.shape.stream {
        if meta.shape.endpoint == super::response::Endpoint::Responses {
            let rx = rxs.into_iter().next().ok_or_else(|| ApiError::internal("no sequence"))?;
            return Ok(super::responses::sse(rx, meta));
        }
        return Ok(sse_response(rxs, meta, b.tokenizer.clone()));
    }
    let results = collect(rxs).await?;
    let (body, usage) = meta.body(results, &b.tokenizer);
    note_usage(req, &usage);
    Ok(HttpResponse::Ok().json(body))
}

pub async fn completions(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: CompletionRequest = json_body(&req, payload, &state.limits).await?;
    let valid = validated(&state, move |mv| validate::completion(&wire, mv)).await?;
    respond(&req, &state, valid).await
}

pub async fn chat_completions(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: ChatRequest = json_body(&req, payload, &state.limits).await?;
    let valid = validated(&state, move |mv| validate::chat(&wire, mv)).await?;
    respond(&req, &state, valid).await
}

/// Remembers the resolved adapters for the access log and counters.
fn note_adapters(req: &HttpRequest, applied: &[AppliedAdapter]) {
    use actix_web::HttpMessage;
    req.extensions_mut().insert(RequestFacts {
        adapters: applied.iter().map(|a| a.name.clone()).collect(),
        ..Default::default()
    });
}

fn note_usage(req: &HttpRequest, usage: &UsageOut) {
    use actix_web::HttpMessage;
    if let Some(f) = req.extensions_mut().get_mut::<RequestFacts>() {
        f.prompt_tokens = usage.prompt_tokens;
        f.completion_tokens = usage.completion_tokens;
    }
}

fn stream_obs(req: &HttpRequest, state: &AppState, endpoint: &'static str) -> Option<StreamObs> {
    use actix_web::HttpMessage;
    let ext = req.extensions();
    Some(StreamObs {
        metrics: state.metrics.clone(),
        endpoint,
        facts: ext.get::<RequestFacts>().cloned().unwrap_or_default(),
        started: ext.get::<std::time::Instant>().copied().unwrap_or_else(std::time::Instant::now),
        request_id: ext.get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default(),
    })
}

/// Prometheus text exposition; live gauges are sampled now.
pub async fn metrics(state: Data) -> Result<HttpResponse, ApiError> {
    let mut snap = crate::metrics::Snapshot::default();
    if let Some(b) = state.backend.get() {
        use std::sync::atomic::Ordering;
        let st = b.engine.stats();
        let kv = b.engine.kv();
        let (known, resident, failed) = b.registry.counts();
        snap = crate::metrics::Snapshot {
            running: st.running.load(Ordering::SeqCst),
            waiting: st.waiting.load(Ordering::SeqCst),
            kv_tokens: st.kv_tokens.load(Ordering::Relaxed),
            kv_capacity: kv.blocks * crate::model::kv_cache::BLOCK_TOKENS,
            kv_blocks_used: st.kv_blocks_used.load(Ordering::Relaxed),
            kv_blocks_cached: st.kv_blocks_cached.load(Ordering::Relaxed),
            kv_blocks_total: kv.blocks,
            kv_cache_bytes: kv.bytes,
            adapters_known: known,
            adapters_resident: resident,
            adapters_failed: failed,
            resident_bytes: b.registry.resident_bytes(),
            budget_bytes: b.registry.budget_bytes(),
            grammar_cache: b.grammars.as_ref().map(|g| g.cache_usage()).unwrap_or_default(),
            max_lora: b.registry.max_resident(),
            running_adapters: b.registry.resident_models(),
            prefix_cache: kv.prefix_cache,
            waiting_adapters: st.adapters_waiting.lock().map(|v| v.clone()).unwrap_or_default(),
        };
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render(&snap)))
}

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

pub async fn ready(state: Data) -> Result<HttpResponse, ApiError> {
    let b = state.backend()?;
    if b.engine.stats().draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down").with_code("shutting_down"));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready", "model": b.model_id})))
}

/// The registry's adapters as this caller may see them: folder paths for the admin key only.
fn adapter_infos(
    req: &HttpRequest,
    state: &AppState,
    b: &Backend,
    name: Option<&str>,
) -> Vec<crate::adapters::registry::AdapterInfo> {
    let mut infos = match name {
        Some(n) => b.registry.info(n).into_iter().collect(),
        None => b.registry.list(),
    };
    if authorize(req, state, Access::Admin).is_err() {
        infos.iter_mut().for_each(|a| a.path = None);
    }
    infos
}

/// Every model served: the base, each adapter, each named mix (OpenAI's `Model` objects, with
/// `parent` and the `loraplex` extension).
fn model_list(req: &HttpRequest, state: &AppState, b: &Backend) -> Vec<serde_json::Value> {
    let base = serde_json::json!({"architecture": b.architecture, "context_length": b.context_len,
        "max_abs_scale": state.limits.max_abs_scale});
    let mut data = vec![
        serde_json::json!({"id": b.model_id, "object": "model", "created": 0, "owned_by": "loraplex", "loraplex": base}),
    ];
    for a in adapter_infos(req, state, b, None) {
        data.push(serde_json::json!({
            "id": a.name, "object": "model", "created": 0, "owned_by": "loraplex", "parent": b.model_id,
            "loraplex": a,
        }));
    }
    for m in b.registry.mix_list() {
        let state = if m.error.is_some() { "failed" } else { "available" };
        data.push(serde_json::json!({
            "id": m.name, "object": "model", "created": 0, "owned_by": "loraplex", "parent": b.model_id,
            "loraplex": {"kind": "mix", "state": state, "version": m.version, "source": m.source, "adapters": m.adapters, "error": m.error},
        }));
    }
    data
}

pub async fn models(req: HttpRequest, state: Data) -> Result<HttpResponse, ApiError> {
    let b = state.backend()?;
    let data = model_list(&req, &state, b);
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

/// `GET /v1/models/{id}`: one entry of the list (`client.models.retrieve`).
pub async fn model(
    req: HttpRequest,
    state: Data,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let b = state.backend()?;
    match model_list(&req, &state, b).into_iter().find(|m| m["id"] == id.as_str()) {
        Some(m) => Ok(HttpResponse::Ok().json(m)),
        None => Err(ApiError::not_found(format!("model `{}` does not exist", id.escape_debug()))
            .with_param("model")
            .with_code("model_not_found")),
    }
}

pub async fn list_adapters(req: HttpRequest, state: Data) -> Result<HttpResponse, ApiError> {
    let b = state.backend()?;
    let reg = &b.registry;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "list", "data": adapter_infos(&req, &state, b, None),
        "resident_bytes": reg.resident_bytes(), "budget_bytes": reg.budget_bytes(),
    })))
}

pub async fn get_adapter(
    req: HttpRequest,
    state: Data,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let b = state.backend()?;
    match adapter_infos(&req, &state, b, Some(&name)).pop() {
        Some(info) => Ok(HttpResponse::Ok().json(info)),
        None => Err(crate::adapters::registry::RegistryError::NotFound(name.into_inner()).into()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    name: String,
    /// Folder inside the adapters root; defaults to `name`.
    path: Option<String>,
}

pub async fn load_adapter(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: LoadBody = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    let registry = b.registry.clone();
    let path = wire.path.clone().unwrap_or_else(|| wire.name.clone());
    let name = wire.name.clone();
    web::block(move || registry.register(&name, &path)).await.map_err(ApiError::internal)??;
    let info = b
        .registry
        .info(&wire.name)
        .ok_or_else(|| ApiError::internal("adapter vanished after loading"))?;
    Ok(HttpResponse::Ok().json(info))
}

pub async fn unload_adapter(
    state: Data,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let b = state.backend()?;
    Ok(HttpResponse::Ok().json(b.registry.unload(&name)?))
}

pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!("no route for {} {}", req.method(), req.path()))
        .with_code("unknown_route"))
}
