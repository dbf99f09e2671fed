//! vLLM's endpoints beside OpenAI's, in vLLM's shapes, so that scripts written for vLLM work
//! unchanged: `/tokenize` and `/detokenize` (a prompt or chat messages ↔ token ids), and the
//! admin-keyed `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (plain-text success
//! bodies and vLLM's status codes; errors in the OpenAI shape).

use super::body::json_body;
use super::chat::messages as chat_messages;
use super::error::ApiError;
use super::openai::WireMessage;
use super::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

type Data = web::Data<AppState>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    #[allow(dead_code)]
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<WireMessage>>,
    /// Default: a prompt gets the special tokens a completion adds (BOS where the model wants
    /// one); messages get the ids the chat endpoint computes.
    add_special_tokens: Option<bool>,
    /// Must be true (or absent) with messages: the chat endpoint always adds it.
    add_generation_prompt: Option<bool>,
    #[serde(default)]
    return_token_strs: bool,
}

pub async fn tokenize(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: TokenizeBody = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    let tok = b.tokenizer.clone();
    let add_special = wire.add_special_tokens.unwrap_or(true);
    let messages = match (&wire.prompt, &wire.messages) {
        (Some(_), None) => None,
        (None, Some(m)) => {
            if wire.add_generation_prompt == Some(false) {
                let msg = "`add_generation_prompt: false` is not supported; the chat template always ends with the assistant header here";
                return Err(ApiError::bad_request(msg).with_param("add_generation_prompt"));
            }
            Some(chat_messages(m)?)
        }
        _ => {
            let msg = "give exactly one of `prompt` and `messages`";
            return Err(ApiError::bad_request(msg).with_param("prompt"));
        }
    };
    let prompt = wire.prompt.clone().unwrap_or_default();
    let ids = web::block(move || match messages {
        // As the chat endpoint tokenizes them: content is text, markup is control tokens.
        Some(m) => tok
            .encode_chat(&m, &[], true)
            .map(|p| p.ids)
            .map_err(|e| ApiError::invalid_value("messages", e.to_string())),
        None => tok.encode_with(&prompt, add_special).map_err(ApiError::internal),
    })
    .await
    .map_err(ApiError::internal)??;
    let token_strs: Option<Vec<String>> = wire
        .return_token_strs
        .then(|| ids.iter().map(|&i| b.tokenizer.id_to_token(i).unwrap_or_default()).collect());
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "count": ids.len(),
        "max_model_len": b.context_len,
        "tokens": ids,
        "token_strs": token_strs,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    #[allow(dead_code)]
    model: Option<String>,
    tokens: Vec<i64>,
}

pub async fn detokenize(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: DetokenizeBody = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    let mut ids = Vec::with_capacity(wire.tokens.len());
    for (i, &t) in wire.tokens.iter().enumerate() {
        if t < 0 || t as usize >= b.vocab {
            let msg = format!("token id {t} is outside the vocabulary (0 to {})", b.vocab - 1);
            return Err(ApiError::bad_request(msg).with_param(format!("tokens[{i}]")));
        }
        ids.push(t as u32);
    }
    let text = b.tokenizer.decode_all(&ids).map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "prompt": text })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadLora {
    lora_name: String,
    lora_path: String,
    #[serde(default)]
    load_inplace: bool,
}

/// `lora_path` as a folder inside the adapters root: relative to it, or absolute and under it.
fn inside_root(root: &std::path::Path, path: &str) -> Result<String, ApiError> {
    let p = std::path::Path::new(path);
    if !p.is_absolute() {
        return Ok(path.to_string());
    }
    let outside = || {
        let msg = format!(
            "`lora_path` `{}` is not inside the adapters folder `{}` (adapters are served from there only)",
            path.escape_debug(),
            root.display()
        );
        ApiError::bad_request(msg).with_param("lora_path").with_code("outside_adapters_root")
    };
    let (root, p) =
        (root.canonicalize().map_err(|_| outside())?, p.canonicalize().map_err(|_| outside())?);
    let rel = p.strip_prefix(&root).map_err(|_| outside())?;
    rel.to_str().map(str::to_string).ok_or_else(outside)
}

pub async fn load_lora_adapter(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: LoadLora = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    let registry = b.registry.clone();
    let loaded = registry
        .info(&wire.lora_name)
        .is_some_and(|i| i.state == crate::adapters::registry::AdapterState::Loaded);
    if loaded && !wire.load_inplace {
        let msg = format!("The lora adapter '{}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.", wire.lora_name.escape_debug());
        return Err(ApiError::bad_request(msg).with_param("lora_name"));
    }
    let rel = inside_root(registry.root(), &wire.lora_path)?;
    let name = wire.lora_name.clone();
    web::block(move || registry.register(&name, &rel)).await.map_err(ApiError::internal)??;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(format!("Success: LoRA adapter '{}' added successfully.", wire.lora_name)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadLora {
    lora_name: String,
    #[allow(dead_code)]
    lora_int_id: Option<i64>,
}

pub async fn unload_lora_adapter(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: UnloadLora = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    b.registry.withdraw(&wire.lora_name).map_err(|e| match e {
        crate::adapters::registry::RegistryError::NotFound(n) => {
            ApiError::not_found(format!("The lora adapter '{}' cannot be found.", n.escape_debug()))
                .with_param("lora_name")
                .with_code("adapter_not_found")
        }
        e => e.into(),
    })?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(format!("Success: LoRA adapter '{}' removed successfully.", wire.lora_name)))
}
