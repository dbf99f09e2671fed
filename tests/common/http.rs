//! The in-process HTTP harness (actix's test service over the real default model): a served
//! state with its own adapters folder, and helpers to call it and check OpenAI error bodies.

use super::serve_options;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::{http::StatusCode, test, web, App};
use loraplex::api::{self, AppState};
use loraplex::config::{ServeConfig, ServeOptions};
use serde_json::Value;
use std::sync::{Arc, OnceLock};

pub struct Ctx {
    pub state: web::Data<AppState>,
    pub dir: tempfile::TempDir,
}

pub fn ctx_with(edit: impl FnOnce(&mut ServeOptions)) -> Ctx {
    ctx_with_config(edit, |_| {})
}

/// [`ctx_with`], with a last edit of the validated configuration (what no option sets, such as
/// the engine's test-only fault injection).
pub fn ctx_with_config(
    edit: impl FnOnce(&mut ServeOptions),
    edit_cfg: impl FnOnce(&mut ServeConfig),
) -> Ctx {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = serve_options(dir.path());
    edit(&mut opts);
    let mut cfg = ServeConfig::try_from(opts).unwrap();
    edit_cfg(&mut cfg);
    let backend = Arc::new(OnceLock::new());
    let metrics = loraplex::serve::new_metrics(&cfg).unwrap();
    let _ = backend.set(loraplex::serve::load_backend(&cfg, Some(metrics.clone())).unwrap());
    let state = web::Data::new(AppState::new(&cfg, backend, metrics));
    Ctx { state, dir }
}

pub fn ctx() -> Ctx {
    ctx_with(|_| {})
}

pub async fn app(
    ctx: &Ctx,
) -> impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error> {
    test::init_service(App::new().app_data(ctx.state.clone()).configure(api::configure)).await
}

pub async fn call(
    app: &impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
    req: test::TestRequest,
) -> (StatusCode, Value) {
    // A service error (a caught panic) is answered from the error, as the server does.
    let (status, body) = match test::try_call_service(app, req.to_request()).await {
        Ok(resp) => (resp.status(), test::read_body(resp).await),
        Err(e) => {
            let resp = e.error_response();
            let status = resp.status();
            (status, actix_web::body::to_bytes(resp.into_body()).await.unwrap_or_default())
        }
    };
    (
        status,
        serde_json::from_slice(&body)
            .unwrap_or(Value::String(String::from_utf8_lossy(&body).into_owned())),
    )
}

pub fn post(path: &str, body: Value) -> test::TestRequest {
    test::TestRequest::post().uri(path).set_json(body)
}

/// A POST with a raw body sent as JSON.
pub fn post_raw(path: &str, body: impl Into<Vec<u8>>) -> test::TestRequest {
    test::TestRequest::post()
        .uri(path)
        .insert_header(("content-type", "application/json"))
        .set_payload(body.into())
}

/// The OpenAI error shape with the expected status and type.
pub fn assert_error(status: StatusCode, body: &Value, want: StatusCode, kind: &str) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(e["type"], kind, "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
}
