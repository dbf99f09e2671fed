//! The playground page (`/ui`; `/` redirects there) and the one route it adds, `POST
//! /v1/mixes` (admin: save a mix under a name). The page is three framework-free files from
//! `ui/`, compiled into the binary: no build step, nothing fetched at run time, and a
//! Content-Security-Policy that lets it talk only to its own origin.

use super::body::json_body;
use super::error::ApiError;
use super::AppState;
use crate::adapters::mixes::MixMember;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

const INDEX: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// Everything the page loads comes from this origin; nothing else is reachable from it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn page(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

pub async fn root(req: HttpRequest) -> HttpResponse {
    let query = req.query_string();
    let to = if query.is_empty() { "/ui".to_string() } else { format!("/ui?{query}") };
    HttpResponse::Found().insert_header((header::LOCATION, to)).finish()
}

pub async fn index() -> HttpResponse {
    page("text/html; charset=utf-8", INDEX)
}

pub async fn app_js() -> HttpResponse {
    page("text/javascript; charset=utf-8", APP_JS)
}

pub async fn app_css() -> HttpResponse {
    page("text/css; charset=utf-8", APP_CSS)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Member {
    name: String,
    scale: f64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveMix {
    name: String,
    adapters: Vec<Member>,
}

/// `POST /v1/mixes` `{"name", "adapters": [{"name", "scale"}]}`: written into the adapters
/// folder's `mixes.toml` and served at once as a model of its own.
pub async fn save_mix(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: SaveMix = json_body(&req, payload, &state.limits).await?;
    let b = state.backend()?;
    if wire.adapters.is_empty() {
        return Err(ApiError::invalid_value("adapters", "a mix needs at least one adapter"));
    }
    let limit = state.limits.max_abs_scale;
    let mut members = Vec::with_capacity(wire.adapters.len());
    for (i, m) in wire.adapters.into_iter().enumerate() {
        let param = format!("adapters[{i}].scale");
        // Checked as the engine computes it: a finite f32 within the server's limit.
        if !(m.scale as f32).is_finite() || m.scale.abs() > limit {
            return Err(ApiError::invalid_value(
                &param,
                format!("scale of `{}` must be finite with |scale| ≤ {limit}", m.name),
            ));
        }
        // `name@N` pins a version: the name must exist now; the version is checked per request.
        let base =
            crate::adapters::registry::split_ref(&m.name).map_or(m.name.as_str(), |(n, _)| n);
        if b.registry.info(base).is_none() {
            return Err(ApiError::invalid_value(
                &format!("adapters[{i}].name"),
                format!("no adapter `{}`", m.name),
            ));
        }
        members.push(MixMember { name: m.name, scale: m.scale });
    }
    if b.registry.info(&wire.name).is_some() {
        return Err(ApiError::invalid_value(
            "name",
            format!("`{}` is an adapter's name", wire.name),
        ));
    }
    let registry = b.registry.clone();
    let name = wire.name.clone();
    web::block(move || registry.mixes().save(&name, &members).map(|_| registry.rescan()))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::invalid_value("name", e.to_string()))?;
    let info = b
        .registry
        .mix(&wire.name)
        .ok_or_else(|| ApiError::internal("the mix vanished after saving"))?;
    Ok(HttpResponse::Ok().json(info))
}

type Data = web::Data<AppState>;
