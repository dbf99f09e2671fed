//! Thin handlers: authorize → read and parse the body → validate → resolve adapters → submit
//! to the engine → JSON or SSE. Admin routes: models, adapters, health, readiness.

use super::body::json_body;
use super::error::ApiError;
use super::observe::{RequestFacts, RequestId, StreamObs};
use super::openai::*;
use super::stream::{collect, sse_response, ChoiceExt, ChoiceResult, Endpoint, ResponseMeta};
use super::validate::{self, max_tokens_for, Draft, ModelView};
use super::{authorize, AppState, Backend, Scope};
use crate::adapters::{AdapterMix, MixEntry};
use crate::engine::TokenEvent;
use actix_web::{web, HttpRequest, HttpResponse};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

type Data = web::Data<AppState>;

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Looks up (and loads, off the async workers) every adapter of the request.
async fn resolve_mix(
    b: &Backend,
    refs: &[(String, f64)],
) -> Result<(AdapterMix, Vec<AppliedAdapter>), ApiError> {
    let mut entries = Vec::with_capacity(refs.len());
    let mut applied = Vec::with_capacity(refs.len());
    for (i, (name, scale)) in refs.iter().enumerate() {
        let registry = b.registry.clone();
        let n = name.clone();
        let adapter =
            web::block(move || registry.acquire(&n)).await.map_err(ApiError::internal)??;
        // Each term's coefficient `scale · alpha / r` is computed in f32.
        if let Some(max) = adapter
            .modules
            .iter()
            .flatten()
            .map(|w| w.scaling.abs())
            .reduce(f64::max)
            .filter(|m| !((m * scale) as f32).is_finite())
        {
            let msg = format!(
                "scale {} × the scaling {} of adapter `{name}` overflows 32-bit floats",
                validate::fmt_num(*scale),
                validate::fmt_num(max)
            );
            return Err(ApiError::invalid_value(&format!("adapters[{i}].scale"), msg)
                .with_code("scale_overflow"));
        }
        applied.push(AppliedAdapter {
            name: name.clone(),
            version: adapter.version,
            scale: *scale,
        });
        entries.push(MixEntry { adapter, scale: *scale });
    }
    Ok((AdapterMix::new(entries), applied))
}

/// Submits every (prompt × n) sequence, all or none (the `n` choices of a prompt arrive
/// together and prefill it once).
fn submit_all(
    b: &Backend,
    d: &Draft,
    mix: &AdapterMix,
    mv: &ModelView<'_>,
) -> Result<Vec<UnboundedReceiver<TokenEvent>>, ApiError> {
    let mut reqs = Vec::with_capacity(d.prompts.len() * d.n);
    for ids in &d.prompts {
        for k in 0..d.n {
            let mut r = d.template.clone();
            r.prompt_ids = ids.clone();
            r.mix = mix.clone();
            r.max_tokens = max_tokens_for(d, ids.len(), mv);
            r.sampling.seed = r.sampling.seed.wrapping_add(k as u64);
            reqs.push(r);
        }
    }
    Ok(b.engine.submit_all(reqs)?)
}

fn view<'a>(b: &'a Backend, state: &'a AppState) -> ModelView<'a> {
    ModelView {
        id: &b.model_id,
        context_len: b.context_len,
        tokenizer: &b.tokenizer,
        limits: &state.limits,
        registry: Some(&b.registry),
    }
}

/// Resolves the mix, submits every sequence, and describes the response to come.
async fn start(
    req: &HttpRequest,
    state: &AppState,
    b: &Backend,
    draft: &Draft,
    endpoint: Endpoint,
    model: Option<String>,
) -> Result<(Vec<UnboundedReceiver<TokenEvent>>, ResponseMeta), ApiError> {
    let (mix, applied) = resolve_mix(b, &draft.adapters).await?;
    note_adapters(req, &applied);
    let rxs = submit_all(b, draft, &mix, &view(b, state))?;
    let mut meta =
        ResponseMeta::new(endpoint, model.unwrap_or_else(|| b.model_id.clone()), applied);
    meta.logprobs = draft.template.logprobs.is_some();
    meta.prompt_tokens = draft.prompts.iter().map(Vec::len).sum();
    let label = if endpoint == Endpoint::Chat { "chat_completions" } else { "completions" };
    meta.obs = stream_obs(req, state, label);
    Ok((rxs, meta))
}

pub async fn completions(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Scope::Inference)?;
    let wire: CompletionRequest = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    let mv = view(b, &state);
    let draft = validate::completion(&wire, &mv)?;
    let (rxs, meta) =
        start(&req, &state, b, &draft, Endpoint::Completion, wire.common.model.clone()).await?;
    if draft.stream {
        return Ok(sse_response(rxs, meta, b.tokenizer.clone(), draft.include_usage, draft.n));
    }
    let results = collect(rxs).await?;
    let mut usage = UsageOut { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };
    let choices: Vec<CompletionChoice> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            let prompt_index = index / draft.n;
            if index % draft.n == 0 {
                usage.prompt_tokens += r.usage.prompt_tokens;
            }
            usage.completion_tokens += r.usage.completion_tokens;
            let prefix = if draft.echo { draft.prompt_texts[prompt_index].as_str() } else { "" };
            CompletionChoice {
                index,
                text: format!("{prefix}{}", r.text),
                logprobs: draft.template.logprobs.map(|_| r.completion_logprobs(&b.tokenizer)),
                finish_reason: Some(r.finish_str()),
            }
        })
        .collect();
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    note_usage(&req, &usage);
    Ok(HttpResponse::Ok().json(meta.envelope("text_completion", choices, Some(usage))))
}

pub async fn chat_completions(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Scope::Inference)?;
    let wire: ChatRequest = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    let mv = view(b, &state);
    let draft = validate::chat(&wire, &mv)?;
    let (rxs, meta) =
        start(&req, &state, b, &draft, Endpoint::Chat, wire.common.model.clone()).await?;
    if draft.stream {
        return Ok(sse_response(rxs, meta, b.tokenizer.clone(), draft.include_usage, draft.n));
    }
    let results: Vec<ChoiceResult> = collect(rxs).await?;
    let prompt_tokens = results.first().map_or(0, |r| r.usage.prompt_tokens);
    let completion_tokens: usize = results.iter().map(|r| r.usage.completion_tokens).sum();
    let choices: Vec<ChatChoice> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| ChatChoice {
            index,
            logprobs: draft.template.logprobs.map(|_| r.chat_logprobs(&b.tokenizer)),
            finish_reason: Some(r.finish_str()),
            message: ChatMessageOut { role: "assistant", content: r.text },
        })
        .collect();
    let usage = UsageOut {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    };
    note_usage(&req, &usage);
    Ok(HttpResponse::Ok().json(meta.envelope("chat.completion", choices, Some(usage))))
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
pub async fn metrics(req: HttpRequest, state: Data) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Scope::Inference)?;
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
    if authorize(req, state, Scope::Admin).is_err() {
        infos.iter_mut().for_each(|a| a.path = None);
    }
    infos
}

pub async fn models(req: HttpRequest, state: Data) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Scope::Inference)?;
    let b = state.backend()?;
    let base = serde_json::json!({"architecture": b.architecture, "context_length": b.context_len});
    let mut data = vec![
        serde_json::json!({"id": b.model_id, "object": "model", "created": 0, "owned_by": "loraplex", "loraplex": base}),
    ];
    for a in adapter_infos(&req, &state, b, None) {
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
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

pub async fn list_adapters(req: HttpRequest, state: Data) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Scope::Inference)?;
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
    authorize(&req, &state, Scope::Inference)?;
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
    authorize(&req, &state, Scope::Admin)?;
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
    req: HttpRequest,
    state: Data,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Scope::Admin)?;
    let b = state.backend()?;
    Ok(HttpResponse::Ok().json(b.registry.unload(&name)?))
}

pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!("no route for {} {}", req.method(), req.path()))
        .with_code("unknown_route"))
}
