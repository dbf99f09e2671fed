//! The HTTP policy every request passes before a handler: which `Host` names a keyless
//! loopback server answers (against DNS rebinding), who may call the route (its access in
//! [`super::routes`]: the inference or admin key), and which browser origins may call it (CORS:
//! none unless configured, and never for the routes the table marks so: every admin route).
//!
//! Why refuse rather than only omit CORS headers: a browser still *sends* a cross-origin
//! "simple" request (a `text/plain` or form POST needs no preflight) and only hides the answer,
//! so without this any web page a user opens could drive a keyless server on 127.0.0.1. JSON
//! routes also require `Content-Type: application/json` (the handlers check it), which no
//! simple request can carry. Written here rather than with `actix-cors` because the refusals
//! must be OpenAI-shaped errors and admin routes need a stricter rule than the rest.

use super::error::ApiError;
use super::AppState;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};

/// Request headers a browser may send cross-origin (those the OpenAI SDKs send).
const ALLOWED_HEADERS: &str =
    "authorization, content-type, x-request-id, openai-organization, openai-project";

/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The policy, built once from the serve configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpPolicy {
    /// Origins (`scheme://host[:port]`, or `*`) allowed to call the non-admin routes from a
    /// browser on another origin. Empty: none.
    pub cors_origins: Vec<String>,
    /// `Some`: the `Host` names answered besides IP literals, `localhost` and `*.localhost`
    /// (a loopback server without an API key); `None`: any host.
    pub allowed_hosts: Option<Vec<String>>,
}

impl HttpPolicy {
    fn origin_allowed(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    fn host_allowed(&self, host: &str) -> bool {
        let Some(extra) = &self.allowed_hosts else { return true };
        let name = host_name(host).to_ascii_lowercase();
        // A rebinding page can only make the browser send a *domain name* it controls; an IP
        // literal or a `.localhost` name (resolved by the browser itself) cannot be its.
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || extra.iter().any(|h| h.eq_ignore_ascii_case(&name))
    }
}

/// The name part of a `Host` header value (`[::1]:8000` → `::1`, `example.com:80` → `example.com`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether `origin` (`scheme://authority`) is the server's own, as the request's `Host` says.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
    host.is_some_and(|h| h.eq_ignore_ascii_case(authority))
}

fn header_str(req: &ServiceRequest, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn refuse(req: ServiceRequest, e: ApiError) -> ServiceResponse<BoxBody> {
    use actix_web::ResponseError;
    req.into_response(e.error_response())
}

pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let policy = req.app_data::<web::Data<AppState>>().map(|s| s.http.clone()).unwrap_or_default();
    let host = header_str(&req, header::HOST).map(str::to_string);
    if let Some(h) = host.as_deref().filter(|h| !policy.host_allowed(h)) {
        let msg = format!("host `{}` is not served: a server on loopback without an API key answers only localhost names and IP addresses (add it to `allowed_hosts`)", h.escape_debug());
        return Ok(refuse(req, ApiError::refused(msg, "host_not_allowed")));
    }
    // Who may call the route, from the route table (preflights carry no credentials).
    if req.method() != Method::OPTIONS {
        if let (Some(route), Some(state)) =
            (super::routes::find(req.method(), req.path()), req.app_data::<web::Data<AppState>>())
        {
            if let Err(e) = super::authorize(req.request(), state, route.access) {
                return Ok(refuse(req, e));
            }
        }
    }
    let cross = header_str(&req, header::ORIGIN)
        .filter(|o| !same_origin(o, host.as_deref()))
        .map(str::to_string);
    let preflight = req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let Some(origin) = cross else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let method = match preflight {
        true => header_str(&req, header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .unwrap_or(Method::GET),
        false => req.method().clone(),
    };
    let never = super::routes::find(&method, req.path())
        .is_some_and(|r| r.cross_origin == super::routes::CrossOrigin::Never);
    if never {
        let msg = format!(
            "`{method} {}` is never served to a browser page from another origin",
            req.path()
        );
        return Ok(refuse(req, ApiError::refused(msg, "cross_origin_refused")));
    }
    if !policy.origin_allowed(&origin) {
        let msg = format!("cross-origin requests from `{}` are not allowed (configure `cors_origins` to allow an origin)", origin.escape_debug());
        return Ok(refuse(req, ApiError::refused(msg, "cross_origin_refused")));
    }
    let allow_origin = HeaderValue::from_str(&origin).map_err(actix_web::error::ErrorBadRequest)?;
    if preflight {
        let res = HttpResponse::NoContent()
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin))
            .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"))
            .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOWED_HEADERS))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE))
            .insert_header((header::VARY, "Origin"))
            .finish();
        return Ok(req.into_response(res));
    }
    let mut res = next.call(req).await?.map_into_boxed_body();
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("x-request-id"));
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_origins_are_compared_as_browsers_send_them() {
        assert_eq!(host_name("[::1]:8000"), "::1");
        assert_eq!(host_name("example.com:80"), "example.com");
        assert_eq!(host_name("localhost"), "localhost");
        let p = HttpPolicy {
            cors_origins: vec!["https://app.example".into()],
            allowed_hosts: Some(vec!["my-box".into()]),
        };
        for ok in [
            "127.0.0.1:8000",
            "[::1]:8000",
            "localhost:8000",
            "api.localhost",
            "my-box:8000",
            "10.1.2.3",
        ] {
            assert!(p.host_allowed(ok), "{ok}");
        }
        for bad in ["evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"] {
            assert!(!p.host_allowed(bad), "{bad}");
        }
        assert!(
            HttpPolicy::default().host_allowed("evil.example"),
            "no host check unless asked for"
        );
        assert!(
            p.origin_allowed("https://APP.example")
                && !p.origin_allowed("https://app.example.evil")
        );
        assert!(same_origin("http://127.0.0.1:8000", Some("127.0.0.1:8000")));
        assert!(
            !same_origin("http://127.0.0.1:8001", Some("127.0.0.1:8000"))
                && !same_origin("null", Some("x"))
        );
    }
}
