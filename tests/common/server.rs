//! A real `loraplex serve` process for end-to-end tests, and a minimal blocking HTTP client.

use super::real_model_path;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test: `LORAPLEX_BIN`, else the release build if it exists, else the test build.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("LORAPLEX_BIN") {
        return PathBuf::from(p);
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/loraplex");
    if release.exists() {
        release
    } else {
        PathBuf::from(env!("CARGO_BIN_EXE_loraplex"))
    }
}

pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(adapters: &Path, extra: &[&str]) -> Server {
        Self::start_with_log(adapters, extra, None, &[])
    }

    /// Like `start`, with the server's log (stderr) written to `log` and extra environment.
    pub fn start_with_log(
        adapters: &Path,
        extra: &[&str],
        log: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new(binary());
        cmd.args([
            "serve",
            "--model",
            real_model_path().to_str().unwrap(),
            "--adapters",
            adapters.to_str().unwrap(),
        ])
        .args(["--port", &port.to_string(), "--rescan-interval-ms", "100"])
        .args(extra)
        .env("LORAPLEX_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).unwrap());
        }
        let child = cmd.spawn().unwrap();
        let s = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if get(s.port, "/ready").0 == 200 {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server did not become ready");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal blocking HTTP/1.1 client (the tests must not depend on the server's own stack).
pub fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (status, dechunk(&body))
}

/// Undoes `Transfer-Encoding: chunked` well enough for JSON and SSE bodies.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { return body.to_string() };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    if out.is_empty() {
        body.to_string()
    } else {
        out
    }
}

pub fn get(port: u16, path: &str) -> (u16, String) {
    http(port, "GET", path, None)
}

pub fn complete(port: u16, body: Value) -> (u16, Value) {
    let (s, b) = http(port, "POST", "/v1/completions", Some(&body));
    (s, serde_json::from_str(&b).unwrap_or(Value::Null))
}

pub fn generate_json(args: &[&str]) -> Value {
    let out = Command::new(binary())
        .args(["generate", "--model", real_model_path().to_str().unwrap(), "--json"])
        .args(args)
        .env("LORAPLEX_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
