//! The route table: every endpoint declared once, as data — its method and path, who may call
//! it, whether a browser page of another origin may, its label in metrics and the access log,
//! its wire format, and its handler. The server registers exactly these routes, and the edge's
//! policy (`api::guard`: auth and origins) and observation (`api::observe`: metrics, access
//! log) read them from here, so a route cannot exist without them. Adding an endpoint is one
//! entry below and one handler.

use super::{adapter_files, fine_tuning, handlers, merges, responses, training, ui, vllm};
use actix_web::http::Method;
use actix_web::web;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, readiness, the playground's static files).
    Public,
    /// The inference key (when one is set).
    Inference,
    /// The admin key (when one is set): routes that change the server.
    Admin,
}

/// Whether a browser page of another origin may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossOrigin {
    /// The origins of `cors_origins`.
    Configured,
    /// Never, whatever `cors_origins` says.
    Never,
}

/// What a route's bodies follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// A route loraplex shares with OpenAI: every body and stream event validates against
    /// OpenAI's published spec (`tests/conformance.rs`), with our extension fields beside.
    OpenAi,
    /// vLLM's shape for a vLLM endpoint.
    Vllm,
    /// loraplex's own JSON.
    Own,
    /// Prometheus text exposition.
    Prometheus,
    /// The playground's page and files.
    Page,
}

/// One endpoint.
pub struct Route {
    pub method: Method,
    /// actix's pattern: `{name}` matches one path segment.
    pub path: &'static str,
    pub access: Access,
    pub cross_origin: CrossOrigin,
    /// The `endpoint` label of `loraplex_requests_total` and the access log.
    pub label: &'static str,
    pub wire: Wire,
    /// The handler, attached to the route actix builds for `method`.
    pub to: fn(actix_web::Route) -> actix_web::Route,
}

macro_rules! route {
    ($method:ident $path:literal, $access:ident, $cors:ident, $label:literal, $wire:ident, $h:path) => {
        Route {
            method: Method::$method,
            path: $path,
            access: Access::$access,
            cross_origin: CrossOrigin::$cors,
            label: $label,
            wire: Wire::$wire,
            to: |r| r.to($h),
        }
    };
}

/// Every endpoint of the server.
#[rustfmt::skip]
pub static ROUTES: &[Route] = &[
    route!(GET "/health", Public, Configured, "health", Own, handlers::health),
    route!(GET "/ready", Public, Configured, "ready", Own, handlers::ready),
    route!(GET "/metrics", Inference, Configured, "metrics", Prometheus, handlers::metrics),
    route!(GET "/v1/models", Inference, Configured, "models", OpenAi, handlers::models),
    route!(GET "/v1/models/{id}", Inference, Configured, "model", OpenAi, handlers::model),
    route!(POST "/v1/completions", Inference, Configured, "completions", OpenAi, handlers::completions),
    route!(POST "/v1/chat/completions", Inference, Configured, "chat_completions", OpenAi, handlers::chat_completions),
    route!(POST "/v1/responses", Inference, Configured, "responses", OpenAi, responses::create),
    route!(GET "/v1/adapters", Inference, Configured, "adapters", Own, handlers::list_adapters),
    route!(POST "/v1/adapters", Admin, Never, "adapter_register", Own, handlers::load_adapter),
    route!(POST "/v1/adapters/merge", Admin, Never, "adapter_merge", Own, merges::merge),
    route!(POST "/v1/adapters/{name}/compress", Admin, Never, "adapter_compress", Own, merges::compress),
    route!(GET "/v1/adapters/{name}", Inference, Configured, "adapter", Own, handlers::get_adapter),
    route!(DELETE "/v1/adapters/{name}", Admin, Never, "adapter_unload", Own, handlers::unload_adapter),
    route!(PUT "/v1/adapters/{name}", Admin, Never, "adapter_upload", Own, adapter_files::upload),
    route!(GET "/v1/adapters/{name}/files/{file}", Admin, Never, "adapter_download", Own, adapter_files::download),
    route!(POST "/tokenize", Inference, Configured, "tokenize", Vllm, vllm::tokenize),
    route!(POST "/detokenize", Inference, Configured, "detokenize", Vllm, vllm::detokenize),
    route!(POST "/v1/load_lora_adapter", Admin, Never, "load_lora_adapter", Vllm, vllm::load_lora_adapter),
    route!(POST "/v1/unload_lora_adapter", Admin, Never, "unload_lora_adapter", Vllm, vllm::unload_lora_adapter),
    route!(GET "/", Public, Never, "ui", Page, ui::root),
    route!(GET "/ui", Public, Never, "ui", Page, ui::index),
    route!(GET "/ui/app.js", Public, Never, "ui", Page, ui::app_js),
    route!(GET "/ui/app.css", Public, Never, "ui", Page, ui::app_css),
    route!(POST "/v1/mixes", Admin, Never, "mixes", Own, ui::save_mix),
    route!(POST "/v1/files", Admin, Never, "files", OpenAi, fine_tuning::upload),
    route!(GET "/v1/files", Admin, Never, "files", OpenAi, fine_tuning::list_files),
    route!(GET "/v1/files/{id}", Admin, Never, "file", OpenAi, fine_tuning::get_file),
    route!(DELETE "/v1/files/{id}", Admin, Never, "file", OpenAi, fine_tuning::delete_file),
    route!(GET "/v1/files/{id}/content", Admin, Never, "file_content", OpenAi, fine_tuning::file_content),
    route!(POST "/v1/fine_tuning/jobs", Admin, Never, "fine_tuning_jobs", OpenAi, fine_tuning::create_job),
    route!(GET "/v1/fine_tuning/jobs", Admin, Never, "fine_tuning_jobs", OpenAi, fine_tuning::list_jobs),
    route!(GET "/v1/fine_tuning/jobs/{id}", Admin, Never, "fine_tuning_job", OpenAi, fine_tuning::get_job),
    route!(POST "/v1/fine_tuning/jobs/{id}/cancel", Admin, Never, "fine_tuning_cancel", OpenAi, fine_tuning::cancel_job),
    route!(GET "/v1/fine_tuning/jobs/{id}/events", Admin, Never, "fine_tuning_events", OpenAi, fine_tuning::job_events),
    route!(GET "/v1/fine_tuning/jobs/{id}/checkpoints", Admin, Never, "fine_tuning_checkpoints", OpenAi, fine_tuning::job_checkpoints),
    route!(POST "/v1/training/clients", Admin, Never, "training_clients", Own, training::create),
    route!(GET "/v1/training/clients", Admin, Never, "training_clients", Own, training::list),
    route!(GET "/v1/training/clients/{id}", Admin, Never, "training_client", Own, training::get),
    route!(DELETE "/v1/training/clients/{id}", Admin, Never, "training_client", Own, training::delete),
    route!(POST "/v1/training/clients/{id}/forward_backward", Admin, Never, "training_forward_backward", Own, training::forward_backward),
    route!(POST "/v1/training/clients/{id}/optim_step", Admin, Never, "training_optim_step", Own, training::optim_step),
    route!(POST "/v1/training/clients/{id}/save", Admin, Never, "training_save", Own, training::save),
    route!(POST "/v1/training/clients/{id}/sample", Admin, Never, "training_sample", Own, training::sample),
];

/// The label of requests that match no route.
pub const UNMATCHED: &str = "unmatched";

impl Route {
    /// Whether this route serves `method` at `path` (exact segments, `{x}` any one segment).
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method != method {
            return false;
        }
        let mut want = self.path.split('/');
        let mut got = path.split('/');
        loop {
            match (want.next(), got.next()) {
                (None, None) => return true,
                (Some(w), Some(g)) if w.starts_with('{') && w.ends_with('}') && !g.is_empty() => {}
                (Some(w), Some(g)) if w == g => {}
                _ => return false,
            }
        }
    }
}

/// The route serving `method` at `path`.
pub fn find(method: &Method, path: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.matches(method, path))
}

/// Registers every route of the table, and the OpenAI-shaped 404 for the rest.
pub fn register(cfg: &mut web::ServiceConfig) {
    for r in ROUTES {
        cfg.route(r.path, (r.to)(web::route().method(r.method.clone())));
    }
    cfg.default_service(web::to(handlers::not_found));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_by_segment_and_every_route_is_found_as_itself() {
        let get = Method::GET;
        assert_eq!(find(&get, "/v1/models/qa-r8").map(|r| r.label), Some("model"));
        assert_eq!(find(&get, "/v1/models").map(|r| r.label), Some("models"));
        assert!(find(&get, "/v1/models/").is_none() && find(&get, "/v1/models/a/b").is_none());
        assert!(find(&Method::PUT, "/v1/models").is_none());
        for r in ROUTES {
            let path = r.path.replace("{id}", "x1").replace("{name}", "n1");
            let found = find(&r.method, &path).map(|f| (f.method.clone(), f.path));
            assert_eq!(found, Some((r.method.clone(), r.path)), "{} {}", r.method, r.path);
        }
        // Routes that change the server are never reachable cross-origin.
        for r in ROUTES.iter().filter(|r| r.access == Access::Admin) {
            assert_eq!(r.cross_origin, CrossOrigin::Never, "{} {}", r.method, r.path);
        }
    }
}
