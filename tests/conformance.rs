//! Every body and stream event of every route loraplex shares with OpenAI validates against
//! OpenAI's published OpenAPI spec (`../shared/reference/openai-openapi/openapi.json`), error
//! bodies included: `tests/e2e/conformance.py` drives the release binary with plain HTTP
//! (chat plain / tools / parse / logprobs / stream, completions with echo + logprobs and
//! streamed, models list and retrieve, responses text / tools / stream / cut, files,
//! fine-tuning jobs with their events and checkpoints, and each error class) and validates
//! with jsonschema. The test fails on any deviation, naming the route, the schema and the
//! field; and on any route the route table marks as OpenAI's that the script did not call.

mod common;

use common::server::Server;
use common::{copy_adapter, shared_dir};
use loraplex::api::routes::{Wire, ROUTES};
use std::path::Path;
use std::process::Command;

#[test]
fn every_shared_route_answers_as_openais_spec_says() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["qa-r8", "all-r16"] {
        copy_adapter(&shared_dir().join("adapters").join(name), &dir.path().join(name));
    }
    let (user, admin) = ("user-key-0123456789", "admin-key-9876543210");
    let server = Server::start(dir.path(), &["--api-key", user, "--admin-key", admin]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/conformance.py");
    let spec = shared_dir().join("reference/openai-openapi/openapi.json");
    let out = Command::new("python3")
        .arg(&script)
        .arg(server.url())
        .arg(&spec)
        .args([user, admin])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failures = got["failures"].as_array().unwrap();
    let report: Vec<String> = failures
        .iter()
        .map(|f| format!("{} [{}] {}: {}", f["route"], f["schema"], f["field"], f["message"]))
        .collect();
    assert!(report.is_empty(), "{} deviations:\n{}", report.len(), report.join("\n"));
    for t in got["tolerated"].as_array().unwrap() {
        eprintln!("tolerated: {} {} ({})", t["route"], t["field"], t["why"]);
    }
    let called: Vec<&str> =
        got["calls"].as_array().unwrap().iter().filter_map(|c| c.as_str()).collect();
    for r in ROUTES.iter().filter(|r| r.wire == Wire::OpenAi) {
        let route = format!("{} {}", r.method, r.path);
        assert!(called.contains(&route.as_str()), "the conformance run never called {route}");
    }
}
