//! The HTTP edge's own rules on a real `loraplex serve`, over raw sockets: a body that trickles
//! in or never ends is cut at the body timeout (408, connection closed); JSON routes need
//! `Content-Type: application/json` (415); cross-origin requests and preflights are refused
//! unless their origin is configured, and admin routes never answer them; a keyless loopback
//! server answers only localhost names and IP addresses in `Host` (DNS rebinding).

mod common;

use common::server::Server;
use common::{copy_adapter, shared_dir};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn server(extra: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    copy_adapter(&shared_dir().join("adapters/qa-r8"), &dir.path().join("qa-r8"));
    (Server::start(dir.path(), extra), dir)
}

/// A response: status, lower-cased head, body.
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
    }
}

fn read_reply(mut s: TcpStream) -> Reply {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Reply { status, head: head.to_ascii_lowercase(), body: body.to_string() }
}

/// Sends `method path` with `headers` and `body`, and `Connection: close`.
fn send(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    read_reply(s)
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const COMPLETION: &str = r#"{"prompt": "Hello", "max_tokens": 2, "temperature": 0}"#;

fn assert_refused(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{} {}", r.head, r.body);
    let e = r.json();
    assert_eq!(e["error"]["code"], code, "{}", r.body);
    assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.body);
}

/// Sends a request head, then `piece` every 300 ms from another thread until the server
/// answers; returns the reply and how long it took.
fn trickle(port: u16, head: &str, piece: &'static [u8]) -> (Reply, Duration) {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut w = s.try_clone().unwrap();
    let started = Instant::now();
    w.write_all(head.as_bytes()).unwrap();
    std::thread::spawn(move || {
        for _ in 0..60 {
            std::thread::sleep(Duration::from_millis(300));
            if w.write_all(piece).is_err() {
                return;
            }
        }
    });
    let reply = read_reply(s);
    (reply, started.elapsed())
}

#[test]
fn slow_and_endless_bodies_are_cut_at_the_body_timeout() {
    let (srv, _dir) = server(&["--body-timeout-secs", "1"]);
    let port = srv.port;
    let slow = format!("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{{");
    let endless = format!("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n");
    for (what, head, piece) in [
        ("a body of one byte per 300 ms", slow, &b" "[..]),
        ("a chunked body that never ends", endless, &b"1\r\n \r\n"[..]),
    ] {
        let (r, took) = trickle(port, &head, piece);
        assert_refused(&r, 408, "request_timeout");
        // Cut at the 1 s timeout (not when the client gives up after 18 s), and the
        // connection closed (`read_to_end` returned).
        assert!(took < Duration::from_secs(5), "{what}: answered after {took:?}");
        assert_eq!(r.header("connection").as_deref(), Some("close"), "{what}: {}", r.head);
    }
    assert_eq!(
        send(port, "POST", "/v1/completions", &[JSON], COMPLETION).status,
        200,
        "still serving"
    );
}

#[test]
fn json_routes_need_a_json_content_type() {
    let (srv, _dir) = server(&[]);
    let port = srv.port;
    for (what, headers) in [
        ("text/plain", vec![("Content-Type", "text/plain")]),
        ("a form", vec![("Content-Type", "application/x-www-form-urlencoded")]),
        ("none", vec![]),
    ] {
        let r = send(port, "POST", "/v1/completions", &headers, COMPLETION);
        assert_refused(&r, 415, "unsupported_media_type");
        let r = send(port, "POST", "/v1/adapters", &headers, r#"{"name": "x", "path": "qa-r8"}"#);
        assert_eq!(r.status, 415, "admin route with {what}: {}", r.body);
    }
    let r = send(
        port,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json; charset=utf-8")],
        COMPLETION,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A browser's CORS preflight for `method path` from `origin`.
fn preflight(port: u16, origin: (&str, &str), method: &str, path: &str) -> Reply {
    send(
        port,
        "OPTIONS",
        path,
        &[
            origin,
            ("Access-Control-Request-Method", method),
            ("Access-Control-Request-Headers", "content-type, authorization"),
        ],
        "",
    )
}

#[test]
fn cross_origin_calls_need_a_configured_origin_and_admin_routes_never_answer_them() {
    let (srv, _dir) = server(&[]);
    let port = srv.port;
    let evil = ("Origin", "http://evil.example");
    // By default no origin is allowed: the preflight is refused, and so is a request a page
    // sends without one (the browser would otherwise deliver it and only hide the answer).
    let r = preflight(port, evil, "POST", "/v1/completions");
    assert_refused(&r, 403, "cross_origin_refused");
    assert!(r.header("access-control-allow-origin").is_none());
    assert_refused(
        &send(port, "POST", "/v1/completions", &[JSON, evil], COMPLETION),
        403,
        "cross_origin_refused",
    );
    // The server's own origin (a page it serves) is not cross-origin.
    let own = format!("http://127.0.0.1:{port}");
    assert_eq!(
        send(port, "POST", "/v1/completions", &[JSON, ("Origin", &own)], COMPLETION).status,
        200
    );
    // DNS rebinding: a name that resolves to 127.0.0.1 on the attacker's say-so is not served.
    assert_refused(
        &send(port, "GET", "/v1/models", &[("Host", "rebind.evil.example:8000")], ""),
        403,
        "host_not_allowed",
    );
    assert_eq!(
        send(port, "GET", "/v1/models", &[("Host", &format!("localhost:{port}"))], "").status,
        200
    );
    drop(srv);

    let (srv, _dir) = server(&["--cors-origins", "http://app.example"]);
    let port = srv.port;
    let app = ("Origin", "http://app.example");
    let r = preflight(port, app, "POST", "/v1/completions");
    assert_eq!(r.status, 204, "{}", r.head);
    assert_eq!(r.header("access-control-allow-origin").as_deref(), Some("http://app.example"));
    assert!(r
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("authorization") && h.contains("content-type")));
    let r = send(port, "POST", "/v1/completions", &[JSON, app], COMPLETION);
    assert_eq!(
        (r.status, r.header("access-control-allow-origin").as_deref()),
        (200, Some("http://app.example")),
        "{}",
        r.body
    );
    assert_refused(&preflight(port, evil, "POST", "/v1/completions"), 403, "cross_origin_refused");
    // Admin routes: never, whatever origins are configured.
    assert_refused(&preflight(port, app, "POST", "/v1/adapters"), 403, "cross_origin_refused");
    assert_refused(
        &preflight(port, app, "DELETE", "/v1/adapters/qa-r8"),
        403,
        "cross_origin_refused",
    );
    assert_refused(
        &send(port, "DELETE", "/v1/adapters/qa-r8", &[app], ""),
        403,
        "cross_origin_refused",
    );
    assert_refused(
        &send(port, "POST", "/v1/adapters", &[JSON, app], r#"{"name": "x", "path": "qa-r8"}"#),
        403,
        "cross_origin_refused",
    );
    drop(srv);

    // With an API key the rebinding page has nothing to gain: any host is answered (here 401).
    let (srv, _dir) = server(&["--api-key", "k-123"]);
    assert_eq!(
        send(srv.port, "GET", "/v1/models", &[("Host", "rebind.evil.example:8000")], "").status,
        401
    );
}

/// A concrete path for a route's pattern.
fn concrete(pattern: &str) -> String {
    pattern.replace("{id}", "nothing-here").replace("{name}", "qa-r8")
}

/// Derived from the route table, so a new route is covered without editing this test: with
/// `--cors-origins '*'`, a route the table marks `Never` (every admin route is) refuses a
/// cross-origin preflight and a cross-origin request; every other route answers the preflight.
#[test]
fn no_route_the_table_keeps_same_origin_is_ever_served_cross_origin() {
    use loraplex::api::routes::{Access, CrossOrigin, ROUTES};
    let (srv, _dir) = server(&["--cors-origins", "*"]);
    let port = srv.port;
    let page = ("Origin", "http://any.example");
    for r in ROUTES {
        let (method, path) = (r.method.as_str(), concrete(r.path));
        let pre = preflight(port, page, method, &path);
        match r.cross_origin {
            CrossOrigin::Never => {
                assert_refused(&pre, 403, "cross_origin_refused");
                let sent = send(port, method, &path, &[JSON, page], "{}");
                assert_refused(&sent, 403, "cross_origin_refused");
            }
            CrossOrigin::Configured => {
                assert_eq!(pre.status, 204, "{method} {path}: {}", pre.head);
                assert!(r.access != Access::Admin, "{method} {path} is admin yet configured");
            }
        }
    }
}

/// Derived from the route table: after one call of every route (whatever it answers), each
/// route's label is in `loraplex_requests_total` and in an access-log line.
#[test]
fn every_route_in_the_table_is_counted_and_logged() {
    use loraplex::api::routes::ROUTES;
    let dir = tempfile::tempdir().unwrap();
    copy_adapter(&shared_dir().join("adapters/qa-r8"), &dir.path().join("qa-r8"));
    let log = dir.path().join("server.log");
    let srv = Server::start_with_log(
        dir.path(),
        &[],
        Some(&log),
        &[("LORAPLEX_LOG", "info"), ("LORAPLEX_LOG_FORMAT", "json")],
    );
    let port = srv.port;
    for r in ROUTES {
        let path = concrete(r.path);
        // A body no route accepts as it is: validation answers, and that is enough here.
        let reply = send(port, r.method.as_str(), &path, &[JSON], "{}");
        assert!(reply.status != 0, "{} {path}: no answer", r.method);
    }
    let metrics = send(port, "GET", "/metrics", &[], "").body;
    std::thread::sleep(Duration::from_millis(300));
    let logged = std::fs::read_to_string(&log).unwrap();
    for r in ROUTES {
        let series = format!("endpoint=\"{}\"", r.label);
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("loraplex_requests_total") && l.contains(&series)),
            "{} {}: no `{series}` in loraplex_requests_total",
            r.method,
            r.path
        );
        let line = format!("\"endpoint\":\"{}\"", r.label);
        assert!(logged.contains(&line), "{} {}: no access-log line with {line}", r.method, r.path);
    }
}
