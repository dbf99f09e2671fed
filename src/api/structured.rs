//! `response_format` (OpenAI) and `structured_outputs` (vLLM) → one [`ConstraintSpec`],
//! compiled once per distinct text ([`crate::structured::Grammars`] caches it). A schema that
//! does not compile, or a keyword llguidance does not implement, is a 400 naming the field and
//! llguidance's reason; fields we do not implement are refused by name, never ignored.

use super::context::ModelView;
use super::error::ApiError;
use crate::structured::limits::LimitError;
use crate::structured::{ConstraintSpec, Grammar, StructuredError};
use serde_json::{Map, Value};
use std::sync::Arc;

/// vLLM's `structured_outputs` keys, each one a kind of constraint.
const VLLM_KINDS: [&str; 5] = ["json", "regex", "choice", "grammar", "json_object"];

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).with_param(param)
}

fn object<'v>(param: &str, v: &'v Value) -> Result<&'v Map<String, Value>, ApiError> {
    v.as_object().ok_or_else(|| bad(param, format!("`{param}` must be an object")))
}

/// Refuses keys of `obj` outside `known`, by name.
fn only(param: &str, obj: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(
            &format!("{param}.{k}"),
            format!("`{param}.{k}` is not supported (accepted: {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// A JSON schema as text: an object (or `true`/`false`), or a string holding one.
fn schema_text(param: &str, v: &Value) -> Result<String, ApiError> {
    let parsed;
    let v = match v {
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| bad(param, format!("`{param}` is not valid JSON: {e}")))?;
            &parsed
        }
        v => v,
    };
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v.to_string()),
        _ => Err(bad(param, format!("`{param}` must be a JSON schema (an object)"))),
    }
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` with
/// `{name, description, schema, strict}`.
fn response_format(v: &Value) -> Result<Option<(ConstraintSpec, String)>, ApiError> {
    let p = "response_format";
    let obj = object(p, v)?;
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => {
            only(p, obj, &["type"])?;
            Ok(None)
        }
        Some("json_object") => {
            only(p, obj, &["type"])?;
            Ok(Some((ConstraintSpec::JsonObject, p.into())))
        }
        Some("json_schema") => {
            only(p, obj, &["type", "json_schema"])?;
            let p = "response_format.json_schema";
            let js = obj.get("json_schema").ok_or_else(|| bad(p, format!("`{p}` is missing")))?;
            let js = object(p, js)?;
            only(p, js, &["name", "description", "schema", "strict"])?;
            if js.get("strict").is_some_and(|s| !s.is_boolean() && !s.is_null()) {
                return Err(bad(&format!("{p}.strict"), format!("`{p}.strict` must be a boolean")));
            }
            let param = format!("{p}.schema");
            // OpenAI's default for a missing schema is any JSON object.
            let spec = match js.get("schema") {
                None => ConstraintSpec::JsonObject,
                Some(s) => ConstraintSpec::JsonSchema(schema_text(&param, s)?),
            };
            Ok(Some((spec, param)))
        }
        Some(other) => Err(bad(
            "response_format.type",
            format!(
                "`response_format.type` `{}` is not supported (text, json_object, json_schema)",
                other.escape_debug()
            ),
        )),
        None => Err(bad("response_format.type", "`response_format.type` is missing")),
    }
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar`
/// (llguidance's Lark) or `json_object: true`.
fn vllm(v: &Value) -> Result<Option<(ConstraintSpec, String)>, ApiError> {
    let p = "structured_outputs";
    let obj = object(p, v)?;
    only(p, obj, &VLLM_KINDS)?;
    let given: Vec<(&String, &Value)> = obj.iter().filter(|(_, v)| !v.is_null()).collect();
    let [(kind, v)] = given[..] else {
        return match given.len() {
            0 => Ok(None),
            _ => Err(bad(p, format!("`{p}` takes one of {}, not several", VLLM_KINDS.join(", ")))),
        };
    };
    let param = format!("{p}.{kind}");
    let text = |v: &Value| {
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| bad(&param, format!("`{param}` must be a non-empty string")))
    };
    let spec = match kind.as_str() {
        "json" => ConstraintSpec::JsonSchema(schema_text(&param, v)?),
        "regex" => ConstraintSpec::Regex(text(v)?),
        "grammar" => ConstraintSpec::Lark(text(v)?),
        "json_object" if v.as_bool() == Some(true) => ConstraintSpec::JsonObject,
        "json_object" => return Ok(None),
        _ => {
            let options: Vec<String> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o.as_str().map(str::to_string))
                .collect();
            if options.is_empty() || v.as_array().is_none_or(|a| a.len() != options.len()) {
                return Err(bad(&param, format!("`{param}` must be a non-empty list of strings")));
            }
            ConstraintSpec::Choice(options)
        }
    };
    Ok(Some((spec, param)))
}

/// The request's constraint and the field it came from; `None` when it has none.
pub fn spec(
    response_format_field: Option<&Value>,
    structured_outputs: Option<&Value>,
) -> Result<Option<(ConstraintSpec, String)>, ApiError> {
    let a = response_format_field.filter(|v| !v.is_null()).map(response_format).transpose()?;
    let b = structured_outputs.filter(|v| !v.is_null()).map(vllm).transpose()?;
    match (a.flatten(), b.flatten()) {
        (None, None) => Ok(None),
        (Some(x), None) | (None, Some(x)) => Ok(Some(x)),
        (Some(_), Some(_)) => {
            let msg = "give `response_format` or `structured_outputs`, not both";
            Err(bad("structured_outputs", msg))
        }
    }
}

/// Compiles `spec`; `param` names the field an error points at.
pub fn compile(
    spec: &ConstraintSpec,
    param: &str,
    mv: &ModelView<'_>,
) -> Result<Arc<Grammar>, ApiError> {
    let grammars = available(param, mv)?;
    grammars.compile(spec).map_err(|e| refusal(e, param))
}

/// Compiles a constraint made from parts the caller checked against
/// [`crate::structured::limits`] already (a request's tools).
pub fn compile_checked(
    spec: &ConstraintSpec,
    param: &str,
    mv: &ModelView<'_>,
) -> Result<Arc<Grammar>, ApiError> {
    let grammars = available(param, mv)?;
    grammars.compile_checked(spec).map_err(|e| refusal(e, param))
}

fn available<'a>(
    param: &str,
    mv: &ModelView<'a>,
) -> Result<&'a crate::structured::Grammars, ApiError> {
    mv.grammars.map_err(|e| {
        ApiError::bad_request(format!("structured outputs are unavailable here: {e}"))
            .with_param(param)
            .with_code("structured_outputs_unavailable")
    })
}

/// A bound exceeded, as the 400 that names it.
pub fn limit_refusal(e: &LimitError, param: &str) -> ApiError {
    bad(param, format!("`{param}`: {e}")).with_code("grammar_too_large")
}

fn refusal(e: StructuredError, param: &str) -> ApiError {
    match e {
        StructuredError::Compile(msg) => {
            bad(param, format!("`{param}` cannot be compiled: {msg}")).with_code("invalid_schema")
        }
        StructuredError::Limit(l) => limit_refusal(&l, param),
        e @ StructuredError::Timeout { .. } => {
            bad(param, format!("`{param}` cannot be compiled: {e}"))
                .with_code("grammar_compile_timeout")
        }
        e @ StructuredError::Busy => {
            ApiError::unavailable(e.to_string()).with_code("grammar_compiler_busy")
        }
        e @ StructuredError::Tokenizer(_) => bad(param, e.to_string()),
    }
}
