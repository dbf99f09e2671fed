//! No structured-output request can take the server down: the shapes that overflowed the
//! compiler's stack (a chain of Lark rules, a chain of `$defs`, a flat schema of thousands of
//! optional properties) and a generator of deeper and wider ones are each answered 200 or a
//! 4xx naming the bound, through every route that takes a grammar, while a stream runs beside
//! them and finishes; a compile past its time budget is a 400 and delays no one else; the
//! compiled-grammar cache stays within its byte budget across 300 distinct large schemas.

mod common;

use common::real_model_path;
use common::server::{get, http, Server};
use loraplex::structured::{limits::max, ConstraintSpec, GrammarOptions, Grammars};
use serde_json::{json, Map, Value};
use std::time::Duration;

fn lark_chain(n: usize) -> String {
    let mut s = String::from("start: r0\n");
    for i in 0..n {
        s.push_str(&format!("r{i}: \"a\" r{}\n", i + 1));
    }
    s.push_str(&format!("r{n}: \"b\"\n"));
    s
}

fn defs_chain(n: usize) -> Value {
    let mut defs = Map::new();
    for i in 0..n {
        let next = json!({"$ref": format!("#/$defs/d{}", i + 1)});
        defs.insert(format!("d{i}"), json!({"type": "object", "properties": {"x": next}}));
    }
    defs.insert(format!("d{n}"), json!({"type": "string"}));
    json!({"$ref": "#/$defs/d0", "$defs": defs})
}

fn flat_optional(n: usize, prefix: &str) -> Value {
    let props: Map<String, Value> =
        (0..n).map(|i| (format!("{prefix}{i}"), json!({"type": "integer"}))).collect();
    json!({"type": "object", "properties": props})
}

fn nested_arrays(depth: usize) -> Value {
    let mut s = json!({"type": "string"});
    for _ in 0..depth {
        s = json!({"type": "array", "items": s});
    }
    s
}

fn wide_any_of(n: usize) -> Value {
    json!({"anyOf": (0..n).map(|i| json!({"const": format!("v{i}")})).collect::<Vec<_>>()})
}

fn lark_parens(n: usize) -> String {
    format!("start: {}\"a\"{}\n", "(".repeat(n), ")".repeat(n))
}

/// The body of a request that carries `what` through `route`.
enum Shape {
    Lark(String),
    Schema(Value),
    Tools(usize, Value),
}

fn body(route: &str, shape: &Shape) -> Value {
    let schema_format =
        |s: &Value| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s}});
    match (route, shape) {
        ("/v1/completions", Shape::Lark(g)) => {
            json!({"prompt": "x", "max_tokens": 2, "structured_outputs": {"grammar": g}})
        }
        ("/v1/completions", Shape::Schema(s)) => {
            json!({"prompt": "x", "max_tokens": 2, "structured_outputs": {"json": s}})
        }
        ("/v1/chat/completions", Shape::Schema(s)) => {
            json!({"messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2, "response_format": schema_format(s)})
        }
        ("/v1/chat/completions", Shape::Tools(n, s)) => {
            let tools: Vec<Value> = (0..*n)
                .map(|i| json!({"type": "function", "function": {"name": format!("f{i}"), "parameters": s}}))
                .collect();
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "tools": tools,
                "tool_choice": "required"})
        }
        ("/v1/responses", Shape::Schema(s)) => json!({"input": "x", "max_output_tokens": 2,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": s}}}),
        _ => unreachable!(),
    }
}

/// Opens a completion stream of `max_tokens` tokens and reads it to its end on a thread.
fn stream_beside(port: u16, max_tokens: usize) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let body = json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": true,
            "temperature": 0, "ignore_eos": true});
        http(port, "POST", "/v1/completions", Some(&body)).1
    })
}

fn assert_stream_finished(text: &str) {
    assert!(
        text.contains("\"finish_reason\":\"length\"") && text.contains("data: [DONE]"),
        "{text}"
    );
}

fn assert_4xx_names_something(route: &str, what: &str, status: u16, body: &str) {
    assert!(matches!(status, 200 | 400 | 422), "{route} {what}: {status} {body}");
    if status != 200 {
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(v["error"]["param"].is_string(), "{route} {what}: no param in {body}");
        assert!(!msg.contains('\n') && msg.len() < 600, "{route} {what}: message {msg:?}");
        assert!(!msg.contains("backtrace") && !msg.contains("panic"), "{route} {what}: {msg}");
    }
}

#[test]
fn hostile_grammars_are_answered_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[]);
    let streaming = stream_beside(s.port, 400);
    let mut cases: Vec<(String, &str, Shape)> = vec![
        // The three shapes that aborted the process.
        ("1,000 chained Lark rules".into(), "/v1/completions", Shape::Lark(lark_chain(1000))),
        ("2,000 chained $defs".into(), "/v1/chat/completions", Shape::Schema(defs_chain(2000))),
        (
            "2,000 chained $defs (Responses)".into(),
            "/v1/responses",
            Shape::Schema(defs_chain(2000)),
        ),
        (
            "8,000 optional properties".into(),
            "/v1/chat/completions",
            Shape::Schema(flat_optional(8000, "p")),
        ),
    ];
    // Deeper and wider, on both sides of each bound.
    for n in [300, 3000, 6000] {
        cases.push((
            format!("{n} chained Lark rules"),
            "/v1/completions",
            Shape::Lark(lark_chain(n)),
        ));
    }
    for n in [500, max::DEFINITIONS - 1, max::DEFINITIONS + 1, 8_000] {
        cases.push((format!("{n} chained $defs"), "/v1/completions", Shape::Schema(defs_chain(n))));
    }
    for n in [max::PROPERTIES, max::PROPERTIES + 1] {
        cases.push((
            format!("{n} optional properties"),
            "/v1/responses",
            Shape::Schema(flat_optional(n, "q")),
        ));
    }
    for d in [30, max::SCHEMA_DEPTH, 120] {
        cases.push((
            format!("arrays nested {d} deep"),
            "/v1/chat/completions",
            Shape::Schema(nested_arrays(d)),
        ));
    }
    cases.push(("anyOf of 9,000".into(), "/v1/completions", Shape::Schema(wide_any_of(9000))));
    cases.push((
        "Lark parentheses 20,000 deep".into(),
        "/v1/completions",
        Shape::Lark(lark_parens(20_000)),
    ));
    cases.push((
        "128 tools of 39 properties".into(),
        "/v1/chat/completions",
        Shape::Tools(128, flat_optional(39, "t")),
    ));
    cases.push((
        "129 tools".into(),
        "/v1/chat/completions",
        Shape::Tools(129, flat_optional(1, "t")),
    ));
    cases.push((
        "20 tools of 300 chained $defs".into(),
        "/v1/chat/completions",
        Shape::Tools(20, defs_chain(300)),
    ));
    let mut refused = 0;
    for (what, route, shape) in &cases {
        let b = body(route, shape);
        let t = std::time::Instant::now();
        let (status, text) = http(s.port, "POST", route, Some(&b));
        let code = serde_json::from_str::<Value>(&text).ok().map(|v| v["error"]["code"].clone());
        eprintln!(
            "{what} via {route}: {status} {:?} in {:?}",
            code.unwrap_or_default(),
            t.elapsed()
        );
        assert_4xx_names_something(route, what, status, &text);
        refused += usize::from(status != 200);
        assert!(s.child.try_wait().unwrap().is_none(), "the server exited after {what}");
    }
    assert!(refused >= 6, "the bounds refused only {refused} of {} cases", cases.len());
    assert_stream_finished(&streaming.join().unwrap());
    assert_eq!(get(s.port, "/health").0, 200);
    let (_, metrics) = get(s.port, "/metrics");
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    let (bytes, budget) =
        (gauge("loraplex_grammar_cache_bytes"), gauge("loraplex_grammar_cache_budget_bytes"));
    assert!(bytes > 0.0 && bytes <= budget, "grammar cache {bytes} of {budget}");
}

#[test]
fn a_compile_past_its_budget_is_refused_and_delays_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--grammar-compile-timeout-ms", "300"]);
    let streaming = stream_beside(s.port, 200);
    // About a second and a half of compiling on this machine: past the 300 ms budget.
    let slow = body("/v1/chat/completions", &Shape::Schema(flat_optional(max::PROPERTIES, "s")));
    let started = std::time::Instant::now();
    let (status, text) = http(s.port, "POST", "/v1/chat/completions", Some(&slow));
    assert_eq!(status, 400, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "grammar_compile_timeout", "{text}");
    assert!(v["error"]["message"].as_str().unwrap().contains("300 ms"), "{text}");
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "answered after {:?}",
        started.elapsed()
    );
    // A small grammar compiles on the other thread meanwhile.
    let small = body("/v1/completions", &Shape::Schema(flat_optional(3, "k")));
    let (status, text) = http(s.port, "POST", "/v1/completions", Some(&small));
    assert_eq!(status, 200, "{text}");
    assert_stream_finished(&streaming.join().unwrap());
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: usize = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    kb * 1024
}

#[test]
fn the_grammar_cache_stays_within_its_byte_budget() {
    let m = loraplex::model::load::load_model(
        real_model_path().to_str().unwrap(),
        loraplex::model::WeightFormat::Packed,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let budget = 32 << 20;
    let opts = GrammarOptions { cache_bytes: budget, ..GrammarOptions::default() };
    let g = Grammars::with_options(&m.tokenizer, m.model.cfg.vocab_size, opts).unwrap();
    let rss_before = rss_bytes();
    let mut peak = 0;
    for i in 0..300 {
        let spec = ConstraintSpec::JsonSchema(flat_optional(120, &format!("s{i}_")).to_string());
        g.compile(&spec).unwrap();
        let u = g.cache_usage();
        assert!(u.bytes <= budget, "{} bytes cached after {i} schemas", u.bytes);
        peak = peak.max(u.bytes);
    }
    let u = g.cache_usage();
    assert!(u.entries > 5 && u.entries < 300, "{} entries", u.entries);
    assert!(peak > budget / 2, "the cache weighed its grammars at {peak} bytes in all");
    // What the process holds grew by about the budget, not by 300 grammars (each ~1 MB).
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < budget + (96 << 20), "RSS grew by {grown} bytes");
    // The most recent schema is still cached: the same compiled grammar comes back.
    let last = ConstraintSpec::JsonSchema(flat_optional(120, "s299_").to_string());
    assert!(std::sync::Arc::ptr_eq(&g.compile(&last).unwrap(), &g.compile(&last).unwrap()));
}
