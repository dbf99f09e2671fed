//! The playground page in headless Chromium (tests/e2e/playground_browser.py, WebDriver through
//! chromedriver) against the release binary on the real model: a shared link with a
//! two-adapter mix and `run` generates at once exactly what `/v1/completions` returns for that
//! mix (per-token log-probabilities on hover); moving a slider with the keyboard changes the
//! URL and the output (again what the API returns for the new mix); a side-by-side link with
//! three mixes gives three outputs, each the API's; "save as named mix" makes a model of its
//! own; a fine-tuning job shows its loss curve and a link into the mixer; a broken adapter
//! folder is listed with its error; the page stays within its origin and a few tens of kilobytes, and fits a narrow
//! window. Screenshots land in target/playground-screenshots (docs/screenshots holds copies).

mod common;

use common::server::*;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

#[test]
fn the_playground_mixes_compares_and_shows_the_registry_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["qa-r8", "all-r16", "rslora-r4"] {
        copy_adapter(&shared_dir().join("adapters").join(name), &dir.path().join(name));
    }
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": "sixteen"}"#)
        .unwrap();
    std::fs::copy(
        shared_dir().join("adapters/qa-r8/adapter_model.safetensors"),
        broken.join("adapter_model.safetensors"),
    )
    .unwrap();
    let server = Server::start(dir.path(), &[]);
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/playground-screenshots");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/playground_browser.py");
    let base = format!("http://127.0.0.1:{}", server.port);
    let out = Command::new("python3").arg(&script).arg(&base).arg(&shots).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed (scripts/test-deps.sh installs Debian's chromium and chromium-driver): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();

    let link = &got["link"];
    assert!(!link["page"].as_str().unwrap().is_empty());
    assert_eq!(link["page"], link["api"], "the link's output is the API's for that mix");
    for title in got["token_titles"].as_array().unwrap() {
        assert!(title.as_str().unwrap().starts_with("logprob -"), "{title}");
    }

    let slider = &got["slider"];
    assert_eq!(slider["url_mix"], "qa-r8:1.7,all-r16:0.3", "20 × ArrowRight of 0.05 from 0.7");
    assert_eq!(slider["valuetext"], "scale 1.7");
    assert_eq!(slider["page"], slider["api"]);
    assert_ne!(slider["page"], slider["before"], "the output follows the slider");

    let cols = got["side_by_side"].as_array().unwrap();
    assert_eq!(cols.len(), 3);
    for c in cols {
        assert_eq!(c["page"], c["api"]);
    }
    assert_ne!(cols[0]["page"], cols[2]["page"], "an adapter changes the base's text");

    let saved = &got["saved_mix"];
    assert_eq!(saved["kind"], "mix", "{saved}");
    let members: Vec<(String, f64)> = saved["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["scale"].as_f64().unwrap()))
        .collect();
    assert_eq!(members, [("all-r16".to_string(), 1.0), ("rslora-r4".to_string(), -0.5)]);
    assert_eq!(got["saved_mix_offered"], true, "the new mix is offered in the mixer");

    let job = &got["job_panel"];
    assert!(job["text"].as_str().unwrap().contains("succeeded"), "{job}");
    assert!(job["href"].as_str().unwrap().starts_with("/ui?mix=ft-ui-"), "{job}");
    assert_eq!(job["curve"], true, "the loss curve is drawn");

    assert_eq!(got["broken_state"], "failed");
    assert!(got["broken_error"].as_str().unwrap().contains("sixteen"), "{}", got["broken_error"]);
    let figures = got["engine_figures"].as_array().unwrap();
    for f in ["running", "waiting", "KV pool", "prefix-cache hit rate", "tokens/s"] {
        assert!(figures.contains(&f.into()), "{f}: {figures:?}");
    }

    assert_eq!(got["chat"]["page"], got["chat"]["api"], "chat mode");

    let requests = got["requests"].as_array().unwrap();
    assert!(requests.len() > 5);
    for r in requests {
        assert!(r["name"].as_str().unwrap().starts_with(&base), "left the origin: {r}");
    }
    let bytes = got["page_bytes"].as_u64().unwrap();
    assert!(bytes < 64 * 1024, "the page (HTML, CSS, JS) transferred {bytes} bytes");
    assert_eq!(got["narrow_overflow"], false, "the page scrolls sideways in a narrow window");
    for shot in [
        "playground-mixer",
        "playground-side-by-side",
        "playground-operations",
        "playground-narrow",
    ] {
        let png = std::fs::read(shots.join(format!("{shot}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{shot}");
    }
}

#[test]
fn the_page_is_served_from_the_binary_with_a_same_origin_policy_and_mixes_save() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (status, body) = get(server.port, "/ui");
    assert_eq!(status, 200);
    assert!(body.contains("data-testid=\"prompt\""));
    for path in ["/ui/app.js", "/ui/app.css"] {
        assert_eq!(get(server.port, path).0, 200, "{path}");
    }
    let raw = raw_get(server.port, "/?mix=qa-r8:1");
    assert!(raw.starts_with("HTTP/1.1 302"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("location: /ui?mix=qa-r8:1"), "{raw}");
    // `POST /v1/mixes`: bad input named, nothing written.
    copy_adapter(&shared_dir().join("adapters/qa-r8"), &dir.path().join("qa-r8"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let save = |body: Value| http(server.port, "POST", "/v1/mixes", Some(&body));
    let refused = |body: Value, param: &str| {
        let (status, text) = save(body);
        assert_eq!(status, 422, "{text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["error"]["param"], param, "{text}");
    };
    refused(
        serde_json::json!({"name": "m", "adapters": [{"name": "nope", "scale": 1}]}),
        "adapters[0].name",
    );
    refused(
        serde_json::json!({"name": "m", "adapters": [{"name": "qa-r8", "scale": 1e39}]}),
        "adapters[0].scale",
    );
    refused(
        serde_json::json!({"name": "qa-r8", "adapters": [{"name": "qa-r8", "scale": 1}]}),
        "name",
    );
    refused(
        serde_json::json!({"name": "../m", "adapters": [{"name": "qa-r8", "scale": 1}]}),
        "name",
    );
    refused(serde_json::json!({"name": "m", "adapters": []}), "adapters");
    assert!(!dir.path().join("mixes.toml").exists());
    let (status, text) =
        save(serde_json::json!({"name": "half", "adapters": [{"name": "qa-r8", "scale": 0.5}]}));
    assert_eq!(status, 200, "{text}");
    let (status, text) = complete(
        server.port,
        serde_json::json!({"model": "half", "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(text["adapters"][0]["scale"], 0.5, "{text}");

    let raw = raw_get(server.port, "/ui");
    let csp = raw.lines().find(|l| l.to_ascii_lowercase().starts_with("content-security-policy"));
    assert!(
        csp.is_some_and(|l| l.contains("connect-src 'self'") && l.contains("default-src 'none'")),
        "{raw}"
    );
}

fn raw_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
