//! Wire requests → a [`ValidRequest`]: every sequence the engine runs (prompts × `n`, each
//! with its adapter mix, limits and sampling) and the shape of the answer, checked once, in the
//! types the engine computes with. Everything a client can get wrong is answered here with a
//! 400 (not a request), 404 (no such adapter or model) or 422 (a value we refuse), naming the
//! `param`. Adapters are resolved through the registry the [`ModelView`] passes in (loading
//! one is blocking work: the handler runs validation off the async workers).

use super::context::{fmt_num, ModelView};
use super::error::ApiError;
use super::openai::{
    AdapterRef, AppliedAdapter, ChatRequest, CommonParams, CompletionRequest, PromptInput,
    StringOrList,
};
use super::response::{Endpoint, ResponseShape};
use crate::engine::Request;
use crate::model::lora::{AdapterMix, MixEntry};
use crate::model::sampling::{LogitRules, SamplingParams};
use serde_json::{Map, Value};

/// Fields that clients send and that change nothing here.
const IGNORED_FIELDS: [&str; 4] = ["metadata", "store", "service_tier", "prediction"];

/// A request checked and typed once: every sequence the engine runs (prompt-major: prompt 0's
/// `n` choices first) and how to answer.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub sequences: Vec<Request>,
    pub response: ResponseShape,
}

/// A request checked up to its prompts; [`finish`] resolves its adapters and builds the
/// sequences.
#[derive(Debug, Clone)]
struct Draft {
    /// Token ids of each prompt.
    pub prompts: Vec<Vec<u32>>,
    /// The prompt texts (for `echo`).
    pub prompt_texts: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Requested adapters, in order, with their scales (`model: <adapter>` first).
    pub adapters: Vec<(String, f64)>,
    /// Template for every sequence (prompt and mix filled in later).
    pub template: Request,
    /// `max_tokens` was given (otherwise it is derived per prompt).
    pub max_tokens: Option<usize>,
    pub echo: bool,
    /// `echo` with `logprobs`: the prompt's tokens lead the legacy `logprobs`.
    pub echo_logprobs: bool,
    /// vLLM's `prompt_logprobs` was given.
    pub vllm_prompt_logprobs: bool,
    /// `response_format` / `structured_outputs`, not compiled yet (with tools it joins the
    /// call grammar), and the field it came from.
    pub format: Option<(crate::structured::ConstraintSpec, String)>,
}

/// The smallest non-zero `temperature`: below it, dividing logits by the temperature leaves
/// the range of the 32-bit floats the sampler computes in (0 is greedy).
pub const MIN_TEMPERATURE: f64 = 1e-5;

fn check_extra(extra: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in extra {
        let harmless = IGNORED_FIELDS.contains(&k.as_str())
            || v.is_null()
            || (k == "best_of" && v.as_i64() == Some(1));
        if k.starts_with("guided_") && !v.is_null() {
            let msg = format!("`{k}` was removed in vLLM 0.12; use `structured_outputs` (`json`, `regex`, `choice`, `grammar`) or `response_format`");
            return Err(ApiError::bad_request(msg).with_param(k.clone()));
        }
        if !harmless {
            return Err(ApiError::bad_request(format!("unknown or unsupported field `{k}`"))
                .with_param(k.clone()));
        }
    }
    Ok(())
}

fn in_range(param: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f64, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
        Some(x) => Err(ApiError::invalid_value(
            param,
            format!(
                "`{param}` must be between {} and {}, got {}",
                fmt_num(lo),
                fmt_num(hi),
                fmt_num(x)
            ),
        )),
    }
}

/// `temperature`: 0 (greedy) or within [`MIN_TEMPERATURE`, 2].
fn temperature(v: Option<f64>) -> Result<f64, ApiError> {
    let t = in_range("temperature", v, 0.0, 2.0, 1.0)?;
    if t > 0.0 && t < MIN_TEMPERATURE {
        let msg = format!(
            "`temperature` must be 0 (greedy) or at least {}, got {}",
            fmt_num(MIN_TEMPERATURE),
            fmt_num(t)
        );
        return Err(ApiError::invalid_value("temperature", msg));
    }
    Ok(t)
}

/// `top_p` in (0, 1], as the 32-bit float the sampler compares with: a value that rounds to 0
/// there would keep no token at all.
fn top_p(v: Option<f64>) -> Result<f64, ApiError> {
    let p = in_range("top_p", v, 0.0, 1.0, 1.0)?;
    if p as f32 <= 0.0 {
        return Err(ApiError::invalid_value(
            "top_p",
            format!(
                "`top_p` must be above 0 (as a 32-bit float) and at most 1, got {}",
                fmt_num(p)
            ),
        ));
    }
    Ok(p)
}

fn adapter_refs(common: &CommonParams, mv: &ModelView<'_>) -> Result<Vec<(String, f64)>, ApiError> {
    let limits = mv.limits;
    let mut out: Vec<(String, f64)> = Vec::new();
    if let Some(m) = common.model.as_deref().filter(|m| *m != mv.id) {
        crate::adapters::registry::split_ref(m).map_err(|e| {
            ApiError::not_found(format!("model `{}` does not exist: {e}", m.escape_debug()))
                .with_param("model")
                .with_code("model_not_found")
        })?;
        // An adapter folder of that name wins: a mix never shadows an adapter.
        match mv.registry.and_then(|r| r.mix(m)) {
            Some(mix) => {
                if let Some(e) = mix.error {
                    return Err(ApiError::invalid_value(
                        "model",
                        format!("mix `{m}` is unavailable: {e}"),
                    )
                    .with_code("mix_unavailable"));
                }
                for member in mix.adapters {
                    if member.scale.abs() > limits.max_abs_scale {
                        let msg = format!(
                            "mix `{m}` gives `{}` scale {}, beyond ±{}",
                            member.name,
                            fmt_num(member.scale),
                            fmt_num(limits.max_abs_scale)
                        );
                        return Err(
                            ApiError::invalid_value("model", msg).with_code("mix_unavailable")
                        );
                    }
                    out.push((member.name, member.scale));
                }
            }
            None => out.push((m.to_string(), 1.0)),
        }
    }
    for (i, AdapterRef { name, scale }) in common.adapters.iter().flatten().enumerate() {
        let param = format!("adapters[{i}]");
        crate::adapters::registry::split_ref(name).map_err(|e| {
            ApiError::invalid_value(&param, e.to_string()).with_code("invalid_adapter_name")
        })?;
        let scale = scale.unwrap_or(1.0);
        if !scale.is_finite() || scale.abs() > limits.max_abs_scale {
            let msg = format!(
                "adapter scale must be finite and within ±{}, got {}",
                fmt_num(limits.max_abs_scale),
                fmt_num(scale)
            );
            return Err(ApiError::invalid_value(&format!("{param}.scale"), msg));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(ApiError::invalid_value(
                &param,
                format!("adapter `{name}` appears twice in the request"),
            )
            .with_code("duplicate_adapter"));
        }
        out.push((name.clone(), scale));
    }
    if out.len() > limits.max_adapters_per_request {
        return Err(ApiError::invalid_value(
            "adapters",
            format!(
                "at most {} adapters per request, got {}",
                limits.max_adapters_per_request,
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// The sampling/stopping part shared by both endpoints.
fn common_draft(
    c: &CommonParams,
    mv: &ModelView<'_>,
    max_tokens: Option<i64>,
) -> Result<Draft, ApiError> {
    let l = mv.limits;
    let temperature = temperature(c.temperature)?;
    let top_p = top_p(c.top_p)?;
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid_value(
                "top_k",
                format!("`top_k` must be -1 (off) or at least 1, got {k}"),
            ))
        }
    };
    let presence = in_range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)? as f32;
    let frequency = in_range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)? as f32;
    let n = match c.n {
        None => 1,
        Some(n) if n >= 1 && n as usize <= l.max_n => n as usize,
        Some(n) => {
            return Err(ApiError::invalid_value(
                "n",
                format!("`n` must be between 1 and {}, got {n}", l.max_n),
            ))
        }
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m >= 1 => Some(m as usize),
        Some(m) => {
            return Err(ApiError::invalid_value(
                "max_tokens",
                format!("`max_tokens` must be at least 1, got {m}"),
            ))
        }
    };
    let stop = match &c.stop {
        None => vec![],
        Some(StringOrList::One(s)) => vec![s.clone()],
        Some(StringOrList::Many(v)) => v.clone(),
    };
    if stop.len() > l.max_stop {
        return Err(ApiError::invalid_value(
            "stop",
            format!("at most {} stop sequences, got {}", l.max_stop, stop.len()),
        ));
    }
    if let Some(s) = stop.iter().find(|s| s.is_empty() || s.chars().count() > l.max_stop_len) {
        return Err(ApiError::invalid_value(
            "stop",
            format!(
                "stop sequences must have 1 to {} characters, got {}",
                l.max_stop_len,
                s.chars().count()
            ),
        ));
    }
    let seed = match c.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    let extra = super::rules::extra(c, max_tokens, mv)?;
    let prompt_logprobs = match c.prompt_logprobs {
        None => None,
        Some(k) if k >= 0 && k as usize <= l.max_logprobs => Some(k as usize),
        Some(k) => {
            let msg =
                format!("`prompt_logprobs` must be between 0 and {}, got {k}", l.max_logprobs);
            return Err(ApiError::invalid_value("prompt_logprobs", msg));
        }
    };
    let format =
        super::structured::spec(c.response_format.as_ref(), c.structured_outputs.as_ref())?;
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_value(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    Ok(Draft {
        prompts: vec![],
        prompt_texts: vec![],
        n,
        stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        adapters: adapter_refs(c, mv)?,
        template: Request {
            prompt_ids: vec![],
            mix: Default::default(),
            max_tokens: 1,
            sampling: SamplingParams { temperature, top_p, top_k, min_p: extra.min_p, seed },
            rules: LogitRules { presence, frequency, ..extra.rules },
            stop,
            stop_token_ids: extra.stop_token_ids,
            constraint: None,
            logprobs: None,
            prompt_logprobs,
            stop_at_eos: !c.ignore_eos.unwrap_or(false),
            model: c.model.as_deref().filter(|m| *m != mv.id).map(std::sync::Arc::from),
            span: tracing::Span::current(),
        },
        max_tokens,
        echo: false,
        echo_logprobs: false,
        vllm_prompt_logprobs: prompt_logprobs.is_some(),
        format,
    })
}

/// Tokenizes `texts` and checks their lengths against the limits and `max_tokens`.
fn add_prompts(
    d: &mut Draft,
    texts: Vec<String>,
    mv: &ModelView<'_>,
    param: &str,
) -> Result<(), ApiError> {
    let mut all = Vec::with_capacity(texts.len());
    for text in &texts {
        all.push(mv.tokenizer.encode(text).map_err(ApiError::internal)?);
    }
    check_prompts(d, texts, all, mv, param)
}

/// Checks tokenized prompts against the limits and `max_tokens`, and keeps them.
fn check_prompts(
    d: &mut Draft,
    texts: Vec<String>,
    all: Vec<Vec<u32>>,
    mv: &ModelView<'_>,
    param: &str,
) -> Result<(), ApiError> {
    let max_total = mv.limits.max_total_tokens.map_or(mv.context_len, |t| t.min(mv.context_len));
    let max_prompt = mv.limits.max_prompt_tokens.min(max_total.saturating_sub(1));
    for ids in all {
        if ids.is_empty() {
            return Err(
                ApiError::invalid_value(param, "the prompt is empty").with_code("empty_prompt")
            );
        }
        if ids.len() > max_prompt {
            return Err(ApiError::invalid_value(
                param,
                format!("the prompt has {} tokens; the limit is {max_prompt}", ids.len()),
            )
            .with_code("context_length_exceeded"));
        }
        if let Some(m) = d.max_tokens {
            if ids.len() + m > max_total {
                return Err(ApiError::invalid_value("max_tokens", format!("prompt ({} tokens) + max_tokens ({m}) exceeds the limit of {max_total} tokens", ids.len())).with_code("context_length_exceeded"));
            }
        }
        d.prompts.push(ids);
    }
    d.prompt_texts = texts;
    Ok(())
}

/// The `max_tokens` of one prompt's sequences.
fn max_tokens_for(d: &Draft, prompt_len: usize, mv: &ModelView<'_>) -> usize {
    let max_total = mv.limits.max_total_tokens.map_or(mv.context_len, |t| t.min(mv.context_len));
    d.max_tokens.unwrap_or_else(|| mv.limits.default_max_tokens.min(max_total - prompt_len)).max(1)
}

/// The request's work budget: every sequence's prompt and `max_tokens` (prompts × `n`), which
/// bounds what one body can ask the engine to compute.
fn check_work(d: &Draft, mv: &ModelView<'_>) -> Result<(), ApiError> {
    let per_choice: usize =
        d.prompts.iter().map(|p| p.len() + max_tokens_for(d, p.len(), mv)).sum();
    let work = per_choice.saturating_mul(d.n);
    let limit = mv.limits.max_request_tokens;
    if work > limit {
        let msg = format!("the request asks for {work} tokens of work (prompt + max_tokens for each of {} prompts × n = {}); the limit is {limit}", d.prompts.len(), d.n);
        return Err(ApiError::invalid_value(if d.n > 1 { "n" } else { "max_tokens" }, msg)
            .with_code("request_too_large"));
    }
    Ok(())
}

pub fn completion(req: &CompletionRequest, mv: &ModelView<'_>) -> Result<ValidRequest, ApiError> {
    check_extra(&req.extra)?;
    let mut d = common_draft(&req.common, mv, req.common.max_tokens)?;
    d.template.logprobs = match req.logprobs {
        None => None,
        Some(k) if k >= 0 && k as usize <= mv.limits.max_logprobs => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid_value(
                "logprobs",
                format!("`logprobs` must be between 0 and {}, got {k}", mv.limits.max_logprobs),
            ))
        }
    };
    d.echo = req.echo.unwrap_or(false);
    // `echo` with `logprobs` (what lm-evaluation-harness sends for log-likelihoods): the
    // prompt's log-probabilities, computed in the same prefill.
    if let (true, Some(k)) = (d.echo, d.template.logprobs) {
        d.echo_logprobs = true;
        d.template.prompt_logprobs = Some(d.template.prompt_logprobs.unwrap_or(0).max(k));
    }
    let token_lists = match &req.prompt {
        Some(PromptInput::Tokens(ids)) => Some(vec![ids.clone()]),
        Some(PromptInput::TokenLists(lists)) => Some(lists.clone()),
        _ => None,
    };
    let texts = match &req.prompt {
        None => return Err(ApiError::bad_request("missing field `prompt`").with_param("prompt")),
        Some(PromptInput::One(s)) => vec![s.clone()],
        Some(PromptInput::Many(v)) if v.is_empty() => {
            return Err(ApiError::invalid_value("prompt", "`prompt` is an empty list"))
        }
        Some(PromptInput::Many(v)) => v.clone(),
        Some(PromptInput::Tokens(_) | PromptInput::TokenLists(_)) => Vec::new(),
    };
    if let Some((spec, param)) = &d.format {
        d.template.constraint = Some(super::structured::compile(spec, param, mv)?);
    }
    match token_lists {
        Some(lists) => {
            // Token ids as given (no tokenizer round trip): checked against the vocabulary,
            // their text decoded for `echo`.
            let mut texts = Vec::with_capacity(lists.len());
            for (i, ids) in lists.iter().enumerate() {
                if let Some((j, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= mv.vocab)
                {
                    let param = match req.prompt {
                        Some(PromptInput::Tokens(_)) => format!("prompt[{j}]"),
                        _ => format!("prompt[{i}][{j}]"),
                    };
                    return Err(ApiError::invalid_value(
                        &param,
                        format!("token id {t} is not below the vocabulary size {}", mv.vocab),
                    ));
                }
                texts.push(mv.tokenizer.decode(ids).map_err(ApiError::internal)?);
            }
            if lists.is_empty() {
                return Err(ApiError::invalid_value("prompt", "`prompt` is an empty list"));
            }
            check_prompts(&mut d, texts, lists, mv, "prompt")?;
        }
        None => add_prompts(&mut d, texts, mv, "prompt")?,
    }
    finish(d, mv, Endpoint::Completion, req.common.model.as_deref())
}

pub fn chat(req: &ChatRequest, mv: &ModelView<'_>) -> Result<ValidRequest, ApiError> {
    check_extra(&req.extra)?;
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let mut d = common_draft(&req.common, mv, max_tokens)?;
    let top = match req.top_logprobs {
        None => 0,
        Some(k) if k >= 0 && k as usize <= mv.limits.max_logprobs => k as usize,
        Some(k) => {
            return Err(ApiError::invalid_value(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {}, got {k}", mv.limits.max_logprobs),
            ))
        }
    };
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ApiError::invalid_value(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    d.template.logprobs = (req.logprobs == Some(true)).then_some(top);
    let Some(wire) = &req.messages else {
        return Err(ApiError::bad_request("missing field `messages`").with_param("messages"));
    };
    if wire.is_empty() {
        return Err(ApiError::invalid_value("messages", "`messages` is empty"));
    }
    if d.stream && d.vllm_prompt_logprobs {
        let msg = "`prompt_logprobs` is answered on non-streamed chat completions (and on streamed completions)";
        return Err(ApiError::invalid_value("prompt_logprobs", msg));
    }
    // With tools the call grammar governs, and the format is the text answer's (OpenAI's
    // rule): `auto` admits a call or text in the format, `required` or a named tool a call.
    let tools = super::chat::tools(req, d.format.as_ref(), mv)?;
    let prompt = super::chat::prompt(wire, tools.as_ref(), mv)?;
    d.template.constraint = match (tools.as_ref().and_then(|t| t.grammar.clone()), &d.format) {
        (Some(grammar), _) => Some(grammar),
        (None, Some((spec, param))) => Some(super::structured::compile(spec, param, mv)?),
        (None, None) => None,
    };
    check_prompts(&mut d, vec![prompt.text], vec![prompt.ids], mv, "messages")?;
    let mut valid = finish(d, mv, Endpoint::Chat, req.common.model.as_deref())?;
    valid.response.tools = tools.and_then(|t| t.parse);
    Ok(valid)
}

/// The checked draft as the engine's sequences (its adapters resolved) and the answer's shape.
fn finish(
    d: Draft,
    mv: &ModelView<'_>,
    endpoint: Endpoint,
    model: Option<&str>,
) -> Result<ValidRequest, ApiError> {
    check_work(&d, mv)?;
    if d.template.constraint.is_some() && d.template.rules.min_tokens > 0 {
        let msg = "`min_tokens` cannot be combined with structured outputs or forced tool calls: the grammar decides where the text ends";
        return Err(ApiError::invalid_value("min_tokens", msg));
    }
    let (mix, adapters) = resolve(&d.adapters, mv)?;
    let mut sequences = Vec::with_capacity(d.prompts.len() * d.n);
    for ids in &d.prompts {
        for k in 0..d.n {
            let mut r = d.template.clone();
            r.prompt_ids = ids.clone();
            r.mix = mix.clone();
            r.max_tokens = max_tokens_for(&d, ids.len(), mv);
            r.sampling.seed = r.sampling.seed.wrapping_add(k as u64);
            sequences.push(r);
        }
    }
    let response = ResponseShape {
        endpoint,
        model: model.unwrap_or(mv.id).to_string(),
        adapters,
        stream: d.stream,
        include_usage: d.include_usage,
        n: d.n,
        prompt_lens: d.prompts.iter().map(Vec::len).collect(),
        logprobs: d.template.logprobs.is_some(),
        echo_logprobs: d.echo_logprobs,
        prompt_logprobs: d.vllm_prompt_logprobs,
        prompt_ids: match d.template.prompt_logprobs {
            Some(_) => d.prompts.clone(),
            None => Vec::new(),
        },
        echo: d.echo.then_some(d.prompt_texts),
        echoed: None,
        tools: None,
    };
    Ok(ValidRequest { sequences, response })
}

/// Finds (loading when needed) every adapter of the request in the registry, and checks each
/// term's coefficient `scale · alpha / r` as the f32 it is computed in.
fn resolve(
    refs: &[(String, f64)],
    mv: &ModelView<'_>,
) -> Result<(AdapterMix, Vec<AppliedAdapter>), ApiError> {
    if refs.is_empty() {
        return Ok(Default::default());
    }
    let Some(registry) = mv.registry else {
        let msg = "this tool serves no adapters";
        return Err(ApiError::not_found(msg).with_param("adapters").with_code("adapter_not_found"));
    };
    let mut entries = Vec::with_capacity(refs.len());
    let mut applied = Vec::with_capacity(refs.len());
    for (i, (name, scale)) in refs.iter().enumerate() {
        let adapter = registry.acquire(name)?;
        if let Some(max) = adapter.max_scaling().filter(|m| !((m * scale) as f32).is_finite()) {
            let msg = format!(
                "scale {} × the scaling {} of adapter `{name}` overflows 32-bit floats",
                fmt_num(*scale),
                fmt_num(max)
            );
            return Err(ApiError::invalid_value(&format!("adapters[{i}].scale"), msg)
                .with_code("scale_overflow"));
        }
        applied.push(AppliedAdapter {
            // `qa@3` is reported as `qa` with its version, as every other entry.
            name: adapter.name.clone(),
            version: adapter.version,
            scale: *scale,
        });
        entries.push(MixEntry { adapter, scale: *scale });
    }
    let mix = AdapterMix::new(entries);
    if let Some(why) = mix.vocab_conflict() {
        return Err(ApiError::invalid_value("adapters", why).with_code("conflicting_adapters"));
    }
    Ok((mix, applied))
}
