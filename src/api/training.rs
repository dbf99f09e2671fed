//! The training-client routes (admin; the online-training API, `online`): create a client for
//! a LoRA (fresh, or from a served adapter version), `forward_backward` with a named loss,
//! `optim_step`, `save` as a new adapter version, and `sample` on the current weights. Bodies
//! are parsed and checked here, once, into the typed values `online` computes with: every
//! number in the f32 it is computed in, every token id below the vocabulary, every array the
//! length of its sequence, each error naming its field.

use super::body::json_body;
use super::error::ApiError;
use super::AppState;
use crate::engine::{Request, TokenEvent};
use crate::online::{AdamParams, Datum, Loss, OnlineError, Start, TrainingClients};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

type Data = web::Data<AppState>;

/// Sequences per `forward_backward`, and tokens over all of them: one pass's activations and
/// gradients must fit beside serving.
const MAX_DATA: usize = 256;
const MAX_PASS_TOKENS: usize = 4096;
/// The least sampler log-probability accepted: `exp(log p − q)` must stay a finite f32.
const MIN_SAMPLER_LOGPROB: f32 = -80.0;
/// Samples per `sample` call.
const MAX_SAMPLES: usize = 64;

impl From<OnlineError> for ApiError {
    fn from(e: OnlineError) -> Self {
        let msg = e.to_string();
        match e {
            OnlineError::NotFound(_) => {
                ApiError::not_found(msg).with_code("training_client_not_found")
            }
            OnlineError::Invalid(_) => ApiError::bad_request(msg),
            OnlineError::Unavailable(_) => ApiError::unavailable(msg),
            OnlineError::Failed(_) => ApiError::internal(msg),
            OnlineError::Full(_) => ApiError::conflict(msg).with_code("too_many_training_clients"),
        }
    }
}

fn service(state: &AppState) -> Result<Arc<TrainingClients>, ApiError> {
    state
        .backend()?
        .training
        .clone()
        .ok_or_else(|| ApiError::unavailable("training clients are not enabled"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// Start from this served adapter (`name` or `name@N`): its config and weights.
    from_adapter: Option<String>,
    rank: Option<usize>,
    alpha: Option<f64>,
    target_modules: Option<Vec<String>>,
    seed: Option<u64>,
    /// The adapter name `save` writes versions of (default: the client's id).
    adapter: Option<String>,
}

pub async fn create(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tc = service(&state)?;
    let body: CreateBody = json_body(&req, payload, &state.limits).await?;
    if let Some(a) = &body.adapter {
        crate::adapters::registry::validate_name(a)
            .map_err(|e| ApiError::invalid_value("adapter", e.to_string()))?;
    }
    let registry = state.backend()?.registry.clone();
    let info = web::block(move || -> Result<_, ApiError> {
        let start = match &body.from_adapter {
            Some(r) => {
                if body.rank.is_some() || body.alpha.is_some() || body.target_modules.is_some() {
                    return Err(ApiError::invalid_value(
                        "from_adapter",
                        "`from_adapter` takes the adapter's own rank, alpha and targets; leave those out",
                    ));
                }
                let adapter = registry.acquire(r)?;
                let (_, path) = registry.version_file(r, crate::adapters::loader::CONFIG_FILE)?;
                let text = std::fs::read_to_string(path).map_err(ApiError::internal)?;
                let config = crate::adapters::PeftConfig::from_json(&text)
                    .map_err(|e| ApiError::invalid_value("from_adapter", e.to_string()))?;
                Start::From { adapter, config }
            }
            None => {
                let rank = body.rank.unwrap_or(16);
                if !(1..=256).contains(&rank) {
                    return Err(ApiError::invalid_value("rank", format!("`rank` must be 1 to 256, got {rank}")));
                }
                let alpha = body.alpha.unwrap_or(2.0 * rank as f64);
                if !(alpha as f32).is_finite() || alpha <= 0.0 {
                    return Err(ApiError::invalid_value("alpha", "`alpha` must be a positive 32-bit float"));
                }
                let targets = body.target_modules.clone().unwrap_or_else(|| {
                    ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec()
                });
                let config = crate::adapters::PeftConfig::from_json(
                    &json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
                            "lora_alpha": alpha, "target_modules": targets, "bias": "none"})
                    .to_string(),
                )
                .map_err(|e| ApiError::invalid_value("target_modules", e.to_string()))?;
                Start::Fresh { config, seed: body.seed.unwrap_or(0) }
            }
        };
        tc.create(start, body.adapter.clone()).map_err(|e| match e {
            OnlineError::Invalid(m) => ApiError::invalid_value("target_modules", m),
            e => e.into(),
        })
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(HttpResponse::Ok().json(info))
}

pub async fn list(state: Data) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": service(&state)?.list()})))
}

pub async fn get(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(service(&state)?.info(&id)?))
}

pub async fn delete(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    service(&state)?.delete(&id)?;
    Ok(HttpResponse::Ok()
        .json(json!({"id": id.into_inner(), "object": "training.client", "deleted": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatumBody {
    tokens: Vec<u32>,
    /// Cross-entropy weight of each token (entry `i`: predicting token `i`).
    weights: Option<Vec<f64>>,
    /// Importance sampling: each token's advantage and the sampler's log-probability.
    advantages: Option<Vec<f64>>,
    logprobs: Option<Vec<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PassBody {
    data: Vec<DatumBody>,
    loss: Loss,
}

/// `values` as the f32s the pass computes with: one per token, finite, the first 0.
fn per_token(
    values: &[f64],
    n: usize,
    param: &str,
    first_zero: bool,
) -> Result<Vec<f32>, ApiError> {
    if values.len() != n {
        return Err(ApiError::invalid_value(
            param,
            format!(
                "`{param}` has {} entries; its sequence has {n} tokens (one per token)",
                values.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for (i, &v) in values.iter().enumerate() {
        if !(v as f32).is_finite() {
            return Err(ApiError::invalid_value(
                &format!("{param}[{i}]"),
                format!("must be a finite 32-bit float, got {v}"),
            ));
        }
        out.push(v as f32);
    }
    if first_zero && out[0] != 0.0 {
        return Err(ApiError::invalid_value(
            &format!("{param}[0]"),
            "must be 0: nothing predicts a sequence's first token (entry i is about token i)",
        ));
    }
    Ok(out)
}

fn datum(
    d: &DatumBody,
    k: usize,
    loss: Loss,
    vocab: usize,
    context: usize,
) -> Result<Datum, ApiError> {
    let p = |f: &str| format!("data[{k}].{f}");
    let n = d.tokens.len();
    if n < 2 || n > context {
        return Err(ApiError::invalid_value(
            &p("tokens"),
            format!("a sequence needs 2 to {context} tokens (the model's context), got {n}"),
        ));
    }
    if let Some((i, t)) = d.tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(ApiError::invalid_value(
            &format!("{}[{i}]", p("tokens")),
            format!("token id {t} is not below the vocabulary size {vocab}"),
        ));
    }
    fn need<'a>(
        v: &'a Option<Vec<f64>>,
        param: String,
        f: &str,
        loss: Loss,
    ) -> Result<&'a [f64], ApiError> {
        v.as_deref().ok_or_else(|| {
            ApiError::invalid_value(
                &param,
                format!("`{f}` is required with `loss: {}`", loss_name(loss)),
            )
        })
    }
    let (weights, sampler) = match loss {
        Loss::CrossEntropy => {
            for (f, v) in [("advantages", &d.advantages), ("logprobs", &d.logprobs)] {
                if v.is_some() {
                    return Err(ApiError::invalid_value(
                        &p(f),
                        format!("`{f}` belongs to `importance_sampling`"),
                    ));
                }
            }
            (
                per_token(
                    need(&d.weights, p("weights"), "weights", loss)?,
                    n,
                    &p("weights"),
                    true,
                )?,
                Vec::new(),
            )
        }
        Loss::ImportanceSampling => {
            if d.weights.is_some() {
                return Err(ApiError::invalid_value(
                    &p("weights"),
                    "`weights` belongs to `cross_entropy`; give `advantages`",
                ));
            }
            let a = per_token(
                need(&d.advantages, p("advantages"), "advantages", loss)?,
                n,
                &p("advantages"),
                true,
            )?;
            let q = per_token(
                need(&d.logprobs, p("logprobs"), "logprobs", loss)?,
                n,
                &p("logprobs"),
                false,
            )?;
            if let Some(i) = (1..n).find(|&i| a[i] != 0.0 && q[i] > 0.0) {
                return Err(ApiError::invalid_value(
                    &format!("{}[{i}]", p("logprobs")),
                    "a log-probability is at most 0",
                ));
            }
            if let Some(i) = (1..n).find(|&i| a[i] != 0.0 && q[i] < MIN_SAMPLER_LOGPROB) {
                return Err(ApiError::invalid_value(
                    &format!("{}[{i}]", p("logprobs")),
                    format!(
                        "a sampled token's log-probability is at least {MIN_SAMPLER_LOGPROB} \
                         (below it the importance ratio overflows)"
                    ),
                ));
            }
            (a, q)
        }
    };
    Ok(Datum { tokens: d.tokens.clone(), weights, sampler_logprobs: sampler })
}

fn loss_name(l: Loss) -> &'static str {
    match l {
        Loss::CrossEntropy => "cross_entropy",
        Loss::ImportanceSampling => "importance_sampling",
    }
}

pub async fn forward_backward(
    req: HttpRequest,
    state: Data,
    id: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tc = service(&state)?;
    let body: PassBody = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    if body.data.is_empty() || body.data.len() > MAX_DATA {
        return Err(ApiError::invalid_value(
            "data",
            format!("`data` holds 1 to {MAX_DATA} sequences, got {}", body.data.len()),
        ));
    }
    let total: usize = body.data.iter().map(|d| d.tokens.len()).sum();
    if total > MAX_PASS_TOKENS {
        return Err(ApiError::invalid_value("data", format!("{total} tokens in one pass; at most {MAX_PASS_TOKENS} (split the batch over several calls)")));
    }
    let data = body
        .data
        .iter()
        .enumerate()
        .map(|(k, d)| datum(d, k, body.loss, b.vocab, b.context_len))
        .collect::<Result<Vec<_>, _>>()?;
    let out = tc.forward_backward(&id, data, body.loss).await?;
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepBody {
    learning_rate: f64,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
    weight_decay: Option<f64>,
    max_grad_norm: Option<f64>,
}

pub async fn optim_step(
    req: HttpRequest,
    state: Data,
    id: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tc = service(&state)?;
    let b: StepBody = json_body(&req, payload, &state.limits).await?;
    let range = |name: &str, v: f64, ok: bool| {
        if ok && (v as f32).is_finite() {
            Ok(v)
        } else {
            Err(ApiError::invalid_value(name, format!("`{name}` is out of range: {v}")))
        }
    };
    let lr =
        range("learning_rate", b.learning_rate, b.learning_rate > 0.0 && b.learning_rate <= 1.0)?;
    let beta1 = b.beta1.unwrap_or(0.9);
    let beta2 = b.beta2.unwrap_or(0.95);
    let eps = b.eps.unwrap_or(1e-12);
    let wd = b.weight_decay.unwrap_or(0.0);
    let clip = b.max_grad_norm.unwrap_or(0.0);
    let adam = AdamParams {
        learning_rate: lr,
        beta1: range("beta1", beta1, (0.0..1.0).contains(&beta1))?,
        beta2: range("beta2", beta2, (0.0..1.0).contains(&beta2))?,
        eps: range("eps", eps, eps > 0.0)?,
        weight_decay: range("weight_decay", wd, (0.0..=1.0).contains(&wd))?,
        max_grad_norm: range("max_grad_norm", clip, clip >= 0.0)?,
    };
    Ok(HttpResponse::Ok().json(tc.optim_step(&id, adam).await?))
}

pub async fn save(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tc = service(&state)?;
    // The weights are built on the engine thread at a client's first use; a snapshot makes
    // sure they are before the files are written.
    tc.snapshot(&id).await?;
    let (name, version) = web::block(move || tc.save(&id)).await.map_err(ApiError::internal)??;
    Ok(HttpResponse::Ok()
        .json(json!({"name": name, "version": version, "model": format!("{name}@{version}")})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleBody {
    prompt: Option<String>,
    prompt_tokens: Option<Vec<u32>>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    n: Option<usize>,
    seed: Option<u64>,
    /// Sample a served version (`name` or `name@N`) instead of the client's current weights.
    adapter: Option<String>,
}

/// `n` completions on the client's current weights (nothing saved) or on a served version
/// (`adapter`), each token with its log-probability under the model's distribution.
pub async fn sample(
    req: HttpRequest,
    state: Data,
    id: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tc = service(&state)?;
    let body: SampleBody = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    let prompt = match (&body.prompt, &body.prompt_tokens) {
        (Some(t), None) => {
            b.tokenizer.encode(t).map_err(|e| ApiError::invalid_value("prompt", e.to_string()))?
        }
        (None, Some(ids)) => ids.clone(),
        _ => {
            return Err(ApiError::invalid_value(
                "prompt",
                "give one of `prompt` and `prompt_tokens`",
            ))
        }
    };
    if prompt.is_empty() || prompt.iter().any(|&t| t as usize >= b.vocab) {
        return Err(ApiError::invalid_value(
            "prompt_tokens",
            format!("1 or more token ids below {}", b.vocab),
        ));
    }
    let max_tokens = body.max_tokens.unwrap_or(16);
    if max_tokens == 0 || prompt.len() + max_tokens > b.context_len {
        return Err(ApiError::invalid_value(
            "max_tokens",
            format!("the prompt and `max_tokens` must fit the context of {}", b.context_len),
        ));
    }
    let n = body.n.unwrap_or(1);
    if n == 0 || n > MAX_SAMPLES {
        return Err(ApiError::invalid_value("n", format!("`n` must be 1 to {MAX_SAMPLES}")));
    }
    let work = n * (prompt.len() + max_tokens);
    if work > state.limits.max_request_tokens {
        return Err(ApiError::invalid_value(
            "n",
            format!(
                "{work} tokens of work (n × (prompt + max_tokens)); the limit is {}",
                state.limits.max_request_tokens
            ),
        ));
    }
    let temperature = body.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_value("temperature", "`temperature` must be 0 to 2"));
    }
    let adapter = match body.adapter.clone() {
        Some(r) => {
            tc.info(&id)?;
            let registry = b.registry.clone();
            web::block(move || registry.acquire(&r)).await.map_err(ApiError::internal)??
        }
        None => tc.snapshot(&id).await?,
    };
    let served =
        body.adapter.as_ref().map(|_| json!({"name": adapter.name, "version": adapter.version}));
    let mix = crate::model::lora::AdapterMix::single(adapter, 1.0);
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut r = Request::greedy(prompt.clone(), mix.clone(), max_tokens);
        r.sampling.temperature = temperature;
        r.sampling.seed = body.seed.unwrap_or(0).wrapping_add(i as u64);
        r.logprobs = Some(0);
        streams.push(b.engine.submit(r).map_err(|e| ApiError::unavailable(e.to_string()))?);
    }
    let mut samples = Vec::with_capacity(n);
    for mut rx in streams {
        let (mut tokens, mut logprobs, mut text, mut finish) =
            (vec![], vec![], String::new(), "length");
        while let Some(ev) = rx.recv().await {
            match ev {
                TokenEvent::Token { id, text: t, logprob, .. } => {
                    tokens.push(id);
                    logprobs.push(logprob);
                    text.push_str(&t);
                }
                TokenEvent::Done { reason, .. } => {
                    finish =
                        if reason == crate::engine::FinishReason::Stop { "stop" } else { "length" };
                }
                TokenEvent::Error(e) => return Err(ApiError::internal(e.to_string())),
                TokenEvent::Prompt(_) => {}
            }
        }
        samples.push(
            json!({"tokens": tokens, "logprobs": logprobs, "text": text, "finish_reason": finish}),
        );
    }
    Ok(HttpResponse::Ok()
        .json(json!({"prompt_tokens": prompt, "samples": samples, "adapter": served})))
}
