//! Request bodies at the HTTP edge: the JSON routes' `Content-Type` rule (415), the size limit
//! (413), the body timeout (408), parsing with the failing field named (400) — and a middleware
//! that keeps a connection whose body was left unread from being held open by its client.
//!
//! Why the middleware: when a handler answers before reading all of a *chunked* body and drops
//! it, actix keeps reading (and discarding) the rest to reuse the connection, with no time
//! limit, so a client trickling a never-ending body would hold its connection forever. While
//! the unread body is still referenced when the answer goes out, actix instead closes the
//! connection (after its 1 s disconnect grace). So every request's body is kept referenced by
//! its response body until that is sent; a fully read body costs nothing there.

use super::error::ApiError;
use crate::config::Limits;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpMessage, HttpRequest};
use futures_util::{Stream, StreamExt};
use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// The JSON body of a POST route as `T`: `Content-Type: application/json` (415 otherwise),
/// read within the body timeout (408) and the size limit (413), then parsed (400).
pub async fn json_body<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limits: &Limits,
) -> Result<T, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let mime = content_type
        .as_deref()
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or_default();
    if !mime.eq_ignore_ascii_case("application/json") {
        let got = content_type.map_or("none".to_string(), |c| format!("`{}`", c.escape_debug()));
        return Err(ApiError::unsupported_media_type(format!(
            "the body must be JSON with `Content-Type: application/json`; got {got}"
        )));
    }
    let timeout = limits.body_timeout;
    let body = tokio::time::timeout(timeout, read_body(req, payload, limits.max_body_bytes))
        .await
        .map_err(|_| {
            ApiError::timeout(format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ))
        })??;
    parse(&body)
}

/// A raw body of at most `limit` bytes (413): uploads that are not JSON.
pub async fn read_raw(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    read_body(req, payload, limit).await
}

/// Reads the body, refusing more than `limit` bytes (413) before buffering them.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let too_large =
        || ApiError::too_large(format!("the request body exceeds the limit of {limit} bytes"));
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The body as `T`; an error names the field it is about (`param`), e.g. `messages[0].content`.
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // Where the parser stopped: the keys and indices it could name, without the `?` it
        // writes for a position it cannot (a truncated body) or the `.` of the top level.
        let full = e.path().to_string();
        let path = full.split('?').next().unwrap_or_default().trim_end_matches('.').to_string();
        let inner = e.into_inner();
        match (path.is_empty(), inner.is_syntax() || inner.is_eof()) {
            (true, _) => ApiError::bad_request(format!("invalid JSON body: {inner}")),
            (false, true) => {
                ApiError::bad_request(format!("invalid JSON body (in `{path}`): {inner}"))
                    .with_param(path)
            }
            (false, false) => {
                ApiError::bad_request(format!("invalid `{path}`: {inner}")).with_param(path)
            }
        }
    })?;
    de.end().map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// The request's body, shared between the handler (which reads it) and the response (which
/// keeps it referenced until sent).
struct SharedPayload(Rc<RefCell<Payload>>);

impl Stream for SharedPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.borrow_mut().poll_next_unpin(cx)
    }
}

/// A response body that keeps the request's body referenced until it is dropped.
struct HoldsRequestBody {
    body: BoxBody,
    _request_body: Rc<RefCell<Payload>>,
}

impl MessageBody for HoldsRequestBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

/// Keeps each request's body referenced until its response is sent (see the module header).
pub async fn middleware(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let shared = Rc::new(RefCell::new(req.take_payload()));
    req.set_payload(Payload::Stream { payload: Box::pin(SharedPayload(shared.clone())) });
    let res = next.call(req).await?;
    Ok(res
        .map_into_boxed_body()
        .map_body(|_, body| HoldsRequestBody { body, _request_body: shared }))
}
