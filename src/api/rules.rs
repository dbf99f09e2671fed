//! The sampling fields beyond OpenAI's core, checked into the engine's types: `logit_bias`
//! (OpenAI), `min_p`, `repetition_penalty`, `min_tokens` and `stop_token_ids` (vLLM). Each is
//! per sequence; the formulas are in [`crate::model::sampling::LogitRules`].

use super::context::{fmt_num, ModelView};
use super::error::ApiError;
use super::openai::CommonParams;
use crate::model::sampling::LogitRules;
use serde_json::Value;

/// The smallest `repetition_penalty` (the largest factor it can apply to a logit is 100).
pub const MIN_REPETITION: f64 = 0.01;

/// What these fields give a sequence.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub rules: LogitRules,
    pub min_p: f32,
    pub stop_token_ids: Vec<u32>,
}

/// A token id the model has (`param` names the field for the error).
fn token_id(param: &str, what: &str, id: Option<u64>, mv: &ModelView<'_>) -> Result<u32, ApiError> {
    match id {
        Some(id) if (id as usize) < mv.vocab => Ok(id as u32),
        Some(id) => Err(ApiError::bad_request(format!(
            "`{param}` names token id {id}; the model's ids are 0 to {}",
            mv.vocab.saturating_sub(1)
        ))
        .with_param(param)),
        None => Err(ApiError::bad_request(format!(
            "`{param}` has `{}`, which is not a token id (a non-negative integer in plain decimal, no sign or leading zeros)",
            what.escape_debug()
        ))
        .with_param(param)),
    }
}

/// OpenAI's `logit_bias`: token-id keys (as strings), values from -100 to 100 added to the
/// logits.
fn logit_bias(v: Option<&Value>, mv: &ModelView<'_>) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let Some(map) = v.as_object() else {
        let msg = "`logit_bias` must be an object mapping token ids to numbers from -100 to 100";
        return Err(ApiError::bad_request(msg).with_param("logit_bias"));
    };
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        // Only the canonical decimal spelling: `"05"` or `"+5"` would be token 5 a second
        // time, and two entries for one token would add past the ±100 bound.
        let canonical =
            key == "0" || (!key.starts_with('0') && key.bytes().all(|b| b.is_ascii_digit()));
        let id = token_id("logit_bias", key, key.parse::<u64>().ok().filter(|_| canonical), mv)?;
        match value.as_f64() {
            Some(b) if (-100.0..=100.0).contains(&b) => out.push((id, b as f32)),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`logit_bias` values must be numbers from -100 to 100; token {key} has {value}"
                ))
                .with_param("logit_bias"))
            }
        }
    }
    Ok(out)
}

/// Checks the fields; `max_tokens` (when given) bounds `min_tokens`.
pub fn extra(
    c: &CommonParams,
    max_tokens: Option<usize>,
    mv: &ModelView<'_>,
) -> Result<Extra, ApiError> {
    let min_p = match c.min_p {
        None => 0.0,
        Some(p) if (0.0..=1.0).contains(&p) => p as f32,
        Some(p) => {
            let msg = format!("`min_p` must be between 0 and 1, got {}", fmt_num(p));
            return Err(ApiError::invalid_value("min_p", msg));
        }
    };
    // Logits are divided (or multiplied) by the penalty in f32: below 0.01 a positive logit
    // can leave the f32 range (1e-39 is a subnormal f32, and `30 / 1e-39` is infinite).
    let repetition = match c.repetition_penalty {
        None => 1.0,
        Some(r) if (MIN_REPETITION..=100.0).contains(&r) => r as f32,
        Some(r) => {
            let msg = format!(
                "`repetition_penalty` must be between {MIN_REPETITION} and 100 (1 = off), got {}",
                fmt_num(r)
            );
            return Err(ApiError::invalid_value("repetition_penalty", msg));
        }
    };
    let min_tokens = match c.min_tokens {
        None => 0,
        Some(m) if m >= 0 && max_tokens.is_none_or(|x| m as usize <= x) => m as usize,
        Some(m) => {
            let msg = format!("`min_tokens` must be between 0 and `max_tokens`, got {m}");
            return Err(ApiError::invalid_value("min_tokens", msg));
        }
    };
    let mut stop_token_ids = Vec::new();
    for (i, id) in c.stop_token_ids.iter().flatten().enumerate() {
        let what = id.to_string();
        let id = token_id(&format!("stop_token_ids[{i}]"), &what, id.as_u64(), mv)?;
        if !stop_token_ids.contains(&id) {
            stop_token_ids.push(id);
        }
    }
    if stop_token_ids.len() > mv.limits.max_stop.max(16) {
        let msg = format!("at most {} `stop_token_ids`", mv.limits.max_stop.max(16));
        return Err(ApiError::invalid_value("stop_token_ids", msg));
    }
    let rules = LogitRules {
        repetition,
        bias: logit_bias(c.logit_bias.as_ref(), mv)?,
        min_tokens,
        ..Default::default()
    };
    Ok(Extra { rules, min_p, stop_token_ids })
}
