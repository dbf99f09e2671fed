//! End to end against the real binary (release build when present) on the real model: the
//! official `openai` Python client, batch invariance under concurrency, hot loading of adapter
//! folders, and graceful shutdown.

mod common;

use common::server::*;
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_openai_python_client_gets_what_generate_computes() {
    let dir = tempfile::tempdir().unwrap();
    serve_options(dir.path());
    let server = Server::start(dir.path(), &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai_client.py");
    let out = Command::new("python3").arg(&script).arg(server.url()).output().unwrap();
    assert!(
        out.status.success(),
        "openai client failed (is the `openai` package installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ad = |n: &str| format!("{}:{}", dir.path().join(n).display(), "1");
    let p = "The capital of France is";
    let g = generate_json(&["--prompt", p, "--max-tokens", "16"]);
    assert_eq!(got["completion"], g["text"]);
    let g = generate_json(&["--prompt", p, "--max-tokens", "16", "--adapter", &ad("qa-r8")]);
    assert_eq!(got["completion_model_adapter"], g["text"]);
    assert_eq!(got["completion_stream"], g["text"], "streamed text equals the whole text");
    let mix = [
        "--adapter",
        &format!("{}:0.7", dir.path().join("qa-r8").display()),
        "--adapter",
        &format!("{}:0.3", dir.path().join("all-r16").display()),
    ];
    let g = generate_json(&[&["--prompt", p, "--max-tokens", "16"][..], &mix[..]].concat());
    assert_eq!(got["completion_mix"], g["text"]);
    assert_eq!(
        got["completion_mix_adapters"],
        json!([{"name": "qa-r8", "version": 1, "scale": 0.7}, {"name": "all-r16", "version": 1, "scale": 0.3}])
    );
    let g = generate_json(&["--prompt", p, "--max-tokens", "4"]);
    let lps = got["completion_logprobs"]["token_logprobs"].as_array().unwrap();
    for (a, b) in lps.iter().zip(g["logprobs"].as_array().unwrap()) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5);
    }
    assert_eq!(got["completion_logprobs"]["top_len"], json!([5, 5, 5, 5]));
    let g = generate_json(&[
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-tokens",
        "24",
        "--adapter",
        &ad("rslora-r4"),
    ]);
    assert_eq!(got["chat"], g["text"]);
    assert_eq!(got["chat_stream"], g["text"]);
    assert_eq!(
        got["chat_stream_usage"].as_u64().unwrap() as usize,
        g["ids"].as_array().unwrap().len()
    );
    assert!(got["chat_logprobs_top"].as_array().unwrap().iter().all(|n| n == 3));
    assert_eq!(got["unknown_adapter_status"], 404);
    assert_eq!(
        got["models"],
        json!(["SmolLM2-135M-Instruct.Q4_1", "all-r16", "qa-r8", "rslora-r4"])
    );
}

/// 16 concurrent requests with 16 different adapter mixes give the same greedy tokens as each
/// request sent alone.
#[test]
fn sixteen_concurrent_mixes_equal_each_request_alone() {
    let dir = tempfile::tempdir().unwrap();
    serve_options(dir.path());
    let server = Server::start(dir.path(), &[]);
    let names = ["qa-r8", "all-r16", "rslora-r4"];
    let bodies: Vec<Value> = (0..16)
        .map(|i| {
            let mut adapters = Vec::new();
            for (j, n) in names.iter().enumerate() {
                if (i >> j) & 1 == 1 {
                    adapters.push(json!({"name": n, "scale": 0.25 + 0.25 * ((i + j) % 4) as f64}));
                }
            }
            if i >= 8 && !adapters.iter().any(|a| a["name"] == names[i % 3]) {
                adapters.push(json!({"name": names[i % 3], "scale": -0.5}));
            }
            let prompts = ["The capital of France is", "Once upon a time", "My favourite food is", "def fibonacci(n):"];
            json!({"prompt": prompts[i % 4], "max_tokens": 16, "temperature": 0, "logprobs": 0, "adapters": adapters})
        })
        .collect();
    let alone: Vec<Value> = bodies.iter().map(|b| complete(server.port, b.clone()).1).collect();
    let port = server.port;
    let handles: Vec<_> =
        bodies.iter().cloned().map(|b| std::thread::spawn(move || complete(port, b))).collect();
    let together: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, ((s, t), a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(*s, 200, "{t}");
        assert_eq!(
            t["choices"][0]["logprobs"]["tokens"], a["choices"][0]["logprobs"]["tokens"],
            "request {i} ({})",
            bodies[i]["adapters"]
        );
        assert_eq!(t["choices"][0]["text"], a["choices"][0]["text"]);
    }
}

#[test]
fn adapter_folders_hot_load_reload_and_unload() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let body = json!({"model": "newbie", "prompt": "Once", "max_tokens": 1, "temperature": 0});
    assert_eq!(complete(server.port, body.clone()).0, 404);
    // Copy (not rename) a folder in, file by file, as a user would.
    copy_adapter(&shared_dir().join("adapters/qa-r8"), &dir.path().join("newbie"));
    let copied = Instant::now();
    let mut first_ok = None;
    while copied.elapsed() < Duration::from_secs(20) {
        let (s, v) = complete(server.port, body.clone());
        if s == 200 {
            assert_eq!(v["adapters"][0]["version"], 1);
            first_ok = Some(copied.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let delay = first_ok.expect("a copied adapter became servable");
    println!("hot-load delay from copy to first successful request: {} ms", delay.as_millis());
    // Replacing the files bumps the version.
    std::thread::sleep(Duration::from_millis(20)); // distinct mtimes on coarse filesystems
    copy_adapter(&shared_dir().join("adapters/rslora-r4"), &dir.path().join("newbie"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, v) = complete(server.port, body.clone());
        if s == 200 && v["adapters"][0]["version"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no new version after replacing the files: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Deleting it while a long request runs: new requests get 404, the running one finishes.
    let port = server.port;
    let long = std::thread::spawn(move || {
        complete(
            port,
            json!({"model": "newbie", "prompt": "Once", "max_tokens": 120, "temperature": 0}),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_dir_all(dir.path().join("newbie")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while complete(server.port, body.clone()).0 != 404 {
        assert!(Instant::now() < deadline, "a deleted adapter is still served");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, v) = long.join().unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 120);
    assert_eq!(v["adapters"][0]["version"], 2);
}

#[test]
fn sigterm_drains_running_requests_and_refuses_new_ones_and_a_restart_serves_the_same_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    for name in ["qa-r8", "all-r16"] {
        copy_adapter(&shared_dir().join("adapters").join(name), &dir.path().join(name));
    }
    let log = logs.path().join("server.log");
    let mut server = Server::start_with_log(dir.path(), &[], Some(&log), &[]);
    // Without keys it binds to loopback and says so.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("loopback"), "{text}");
    let port = server.port;
    let mixes = [
        json!([]),
        json!([{"name": "qa-r8"}]),
        json!([{"name": "all-r16", "scale": 0.5}]),
        json!([{"name": "qa-r8"}, {"name": "all-r16"}]),
    ];
    let running: Vec<_> = mixes
        .iter()
        .cloned()
        .map(|m| std::thread::spawn(move || complete(port, json!({"prompt": "Once", "max_tokens": 80, "temperature": 0, "ignore_eos": true, "adapters": m}))))
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(100));
    let (s, v) = complete(port, json!({"prompt": "Once", "max_tokens": 2}));
    assert!(s == 503 || s == 0, "new request during drain: {s} {v}");
    for r in running {
        let (s, v) = r.join().unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 80, "a running request was cut short: {v}");
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");

    let again = Server::start(dir.path(), &[]);
    let (s, list) = get(again.port, "/v1/adapters");
    assert_eq!(s, 200);
    for name in ["qa-r8", "all-r16"] {
        assert!(list.contains(&format!("\"{name}\"")), "{list}");
        let (s, v) =
            complete(again.port, json!({"prompt": "Once", "max_tokens": 4, "model": name}));
        assert_eq!(s, 200, "{name} after restart: {v}");
    }
}

#[test]
fn api_keys_are_enforced_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    copy_adapter(&shared_dir().join("adapters/qa-r8"), &dir.path().join("qa-r8"));
    let log = logs.path().join("server.log");
    let (user, admin) = ("sk-user-4f9a1c", "sk-admin-77b2e0");
    // Keys from the environment (not on the command line, where `ps` would show them).
    let env =
        [("LORAPLEX_API_KEY", user), ("LORAPLEX_ADMIN_KEY", admin), ("LORAPLEX_LOG", "debug")];
    let server = Server::start_with_log(dir.path(), &[], Some(&log), &env);
    let with = |key: &str, method: &str, path: &str, body: Option<&Value>| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        use std::io::{Read, Write};
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0)
    };
    let req = json!({"prompt": "Hi", "max_tokens": 2, "model": "qa-r8"});
    assert_eq!(complete(server.port, req.clone()).0, 401, "no key");
    assert_eq!(with("wrong", "POST", "/v1/completions", Some(&req)), 401);
    assert_eq!(with(user, "POST", "/v1/completions", Some(&req)), 200);
    assert_eq!(
        with(user, "DELETE", "/v1/adapters/qa-r8", None),
        403,
        "admin call with the inference key"
    );
    assert_eq!(with(admin, "DELETE", "/v1/adapters/qa-r8", None), 200);
    let mut server = server;
    assert!(Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    server.child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("loraplex::access")
            && text.contains("status=401")
            && text.contains("status=200"),
        "the log has the requests: {text}"
    );
    assert!(!text.contains(user) && !text.contains(admin), "a key reached the log");
}

#[test]
fn a_cancelled_stream_logs_the_tokens_it_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    copy_adapter(&shared_dir().join("adapters/qa-r8"), &dir.path().join("qa-r8"));
    let log = logs.path().join("server.log");
    let server = Server::start_with_log(dir.path(), &[], Some(&log), &[("LORAPLEX_LOG", "info")]);
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let body = json!({"model": "qa-r8", "prompt": "Write a long story about a lighthouse.", "max_tokens": 400, "stream": true, "ignore_eos": true}).to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    // Read four token chunks, then hang up.
    let (mut seen, mut buf) = (String::new(), [0u8; 4096]);
    while seen.matches("data: ").count() < 4 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("loraplex::access") && l.contains("outcome=\"cancelled\""))
        {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no access line for the cancelled stream: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let field = |name: &str| {
        line.split(&format!("{name}="))
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<usize>().ok())
    };
    assert!(field("prompt_tokens").is_some_and(|n| n > 5), "{line}");
    assert!(field("completion_tokens").is_some_and(|n| (4..400).contains(&n)), "{line}");
}
