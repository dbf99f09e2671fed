//! Adapter weights over HTTP (admin): `PUT /v1/adapters/{name}` takes a PEFT adapter as one
//! safetensors body — `adapter_model.safetensors` with its `adapter_config.json` as the
//! `adapter_config` entry of the header's `__metadata__` — checks it as a folder is checked,
//! writes it into the adapters folder and serves it at once as a new version;
//! `GET /v1/adapters/{name}/files/{file}` (`name@N` for an earlier resident version) gives back
//! either file byte for byte. What a version is and where its files live is the registry's.

use super::error::ApiError;
use super::AppState;
use crate::adapters::loader::{CONFIG_FILE, WEIGHTS_FILE};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

type Data = web::Data<AppState>;

/// The metadata key that carries `adapter_config.json` in an uploaded safetensors body.
pub const CONFIG_KEY: &str = "adapter_config";

pub async fn upload(
    req: HttpRequest,
    state: Data,
    name: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let mime = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if mime != "application/octet-stream" {
        return Err(ApiError::unsupported_media_type(
            "the body must be a safetensors file with `Content-Type: application/octet-stream`",
        ));
    }
    let limit = state.limits.max_upload_bytes;
    let timeout = state.limits.upload_timeout;
    let body = tokio::time::timeout(timeout, super::body::read_raw(&req, payload, limit))
        .await
        .map_err(|_| {
        ApiError::timeout(format!("the upload did not arrive within {} s", timeout.as_secs()))
    })??;
    let config = config_of(&body)?;
    let registry = state.backend()?.registry.clone();
    let name = name.into_inner();
    let reg = registry.clone();
    let n = name.clone();
    web::block(move || reg.install(&n, config.as_bytes(), &body))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::from(e).with_param("body").with_code("invalid_adapter"))?;
    let info =
        registry.info(&name).ok_or_else(|| ApiError::internal("adapter vanished after loading"))?;
    Ok(HttpResponse::Ok().json(info))
}

/// `adapter_config.json` from the body's safetensors header, refused by name when the body is
/// not a safetensors file or carries no config.
fn config_of(body: &[u8]) -> Result<String, ApiError> {
    let bad = |m: String| ApiError::invalid_value("body", m).with_code("invalid_adapter");
    let (_, meta) = safetensors::SafeTensors::read_metadata(body)
        .map_err(|e| bad(format!("the body is not a safetensors file: {e}")))?;
    let config =
        meta.metadata().as_ref().and_then(|m| m.get(CONFIG_KEY)).cloned().ok_or_else(|| {
            bad(format!(
                "the safetensors header's `__metadata__` has no `{CONFIG_KEY}` entry (the \
                 adapter's `adapter_config.json` as a string)"
            ))
        })?;
    Ok(config)
}

pub async fn download(
    state: Data,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (r, file) = path.into_inner();
    let content_type = match file.as_str() {
        CONFIG_FILE => "application/json",
        WEIGHTS_FILE => "application/octet-stream",
        _ => {
            return Err(ApiError::not_found(format!(
                "an adapter has the files `{CONFIG_FILE}` and `{WEIGHTS_FILE}`, not `{}`",
                file.escape_debug()
            ))
            .with_code("unknown_file"))
        }
    };
    let registry = state.backend()?.registry.clone();
    let (version, bytes) = web::block(move || {
        let (version, p) = registry.version_file(&r, &file)?;
        std::fs::read(&p).map(|b| (version, b)).map_err(|e| ApiError::internal(e.to_string()))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e: ApiError| e)?;
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("x-loraplex-adapter-version", version.to_string()))
        .body(bytes))
}
