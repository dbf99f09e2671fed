//! The OpenAI surface agents and apps use, through the official `openai` Python client against
//! the release binary on the real model (tests/e2e/structured_client.py): `parse` with a nested
//! pydantic model (base, adapter as `model`, a mix), `json_object`, 200 constrained completions
//! over 12 schemas and four mixes validated with `jsonschema`, vLLM's `structured_outputs`, the
//! sampling fields, `/tokenize` and `/detokenize`, vLLM's adapter endpoints, tool-call round
//! trips (`required` on an adapter, a named function on a mix; streamed and not), stateless
//! `/v1/responses` (text, a function tool round trip, its stream events, `parse`), and bad input.

mod common;

use common::server::*;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn run_client(script: &str, server: &Server, dir: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e").join(script);
    let out = Command::new("python3").arg(&script).arg(server.url()).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed (scripts/test-deps.sh installs `openai` and `jsonschema`): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn is_json_object(text: &Value) -> bool {
    serde_json::from_str::<Value>(text.as_str().unwrap_or("")).is_ok_and(|v| v.is_object())
}

#[test]
fn structured_outputs_sampling_fields_and_vllm_endpoints_through_the_openai_client() {
    let dir = tempfile::tempdir().unwrap();
    serve_options(dir.path());
    let server = Server::start(dir.path(), &[]);
    let got = run_client("structured_client.py", &server, dir.path());

    for label in ["base", "adapter", "mix"] {
        let p = &got["parse"][label];
        assert_eq!(p["finish_reason"], "stop", "{label}: {p}");
        let person = &p["parsed"];
        assert!(person["age"].as_i64().is_some_and(|a| (0..=120).contains(&a)), "{label}: {p}");
        assert!(["engineer", "doctor", "teacher"].contains(&person["role"].as_str().unwrap()));
        let zip = person["address"]["zip_code"].as_str().unwrap();
        assert!(zip.len() == 5 && zip.chars().all(|c| c.is_ascii_digit()), "{zip}");
    }
    assert_eq!(got["parse"]["adapter"]["adapters"][0]["name"], "qa-r8");
    assert_eq!(got["parse"]["mix"]["adapters"].as_array().unwrap().len(), 2);

    assert!(is_json_object(&got["json_object_chat"]["content"]), "{}", got["json_object_chat"]);
    assert_eq!(got["json_object_stream"], got["json_object_chat"]["content"], "streamed = whole");
    assert!(is_json_object(&got["json_object_completion"]["text"]));

    let v = &got["validity"];
    assert_eq!(v["total"], 200);
    assert!(v["schemas"].as_u64().unwrap() >= 10);
    assert_eq!(v["invalid"], serde_json::json!([]), "outputs that break their schema");
    let (valid, length) = (v["valid"].as_u64().unwrap(), v["length"].as_u64().unwrap());
    assert_eq!(valid + length, 200);
    assert!(valid >= 180, "only {valid} of 200 finished (the rest hit max_tokens): {v}");
    eprintln!("validity: {valid} valid, {length} stopped at max_tokens: {}", v["length_by_schema"]);

    assert!(["yes", "no"].contains(&got["choice"].as_str().unwrap()), "{}", got["choice"]);
    let regex = got["regex"].as_str().unwrap();
    assert!(regex.len() == 9 && regex.starts_with(' ') && regex.as_bytes()[4] == b'-', "{regex}");

    assert_eq!(got["logit_bias"]["text"], " Lyon Lyon Lyon", "{}", got["logit_bias"]);
    // stop_token_ids: the free text's third token ends the text before it.
    let (free, stopped) = (got["free"].as_str().unwrap(), &got["stop_token_ids"]);
    assert_eq!(stopped["finish_reason"], "stop");
    let text = stopped["text"].as_str().unwrap();
    assert!(free.starts_with(text) && text.len() < free.len(), "{free:?} vs {text:?}");
    let m = &got["min_tokens"];
    assert_eq!(m["free_finish"], "stop");
    assert!(m["tokens"].as_u64() >= m["min"].as_u64(), "{m}");
    let rep = &got["repetition_penalty"];
    assert_ne!(rep["penalised"], rep["free"], "{rep}");
    assert!(
        rep["free"].as_str().unwrap().matches("apple").count()
            > rep["penalised"].as_str().unwrap().matches("apple").count()
    );
    // min_p 0.9 at temperature 1 keeps only near-argmax tokens: the greedy text here.
    assert!(
        free.starts_with(got["min_p_greedy_like"].as_str().unwrap()),
        "{}",
        got["min_p_greedy_like"]
    );

    let t = &got["tokenize"];
    assert_eq!(
        (t["status"].as_u64(), t["count"].as_u64(), t["detok_status"].as_u64()),
        (Some(200), Some(5), Some(200))
    );
    assert_eq!(t["detok"], "The capital of France is");
    assert_eq!(t["strs"][1], "\u{0120}capital");
    assert!(t["chat_count"].as_u64().unwrap() > 10);

    let load = got["load_lora"].as_array().unwrap();
    let status: Vec<u64> = load.iter().map(|r| r[0].as_u64().unwrap()).collect();
    assert_eq!(status, [200, 400, 200, 400], "{load:?}");
    assert_eq!(load[0][1], "Success: LoRA adapter 'extra-qa' added successfully.");
    assert_eq!(got["loaded_adapter_text"], got["same_folder_text"]);
    let unload: Vec<u64> =
        got["unload_lora"].as_array().unwrap().iter().map(|r| r[0].as_u64().unwrap()).collect();
    assert_eq!(unload, [200, 404, 404]);
    assert_eq!(got["retrieved"]["id"], "extra-qa");
    assert_eq!(got["retrieved"]["object"], "model");
    assert_eq!(got["listed_after_unload"], false);
    assert_eq!(got["request_after_unload"], 404);
    assert_eq!(got["retrieve_after_unload"], 404);
    assert_eq!(
        (got["reload_status"].as_u64(), got["listed_after_reload"].as_bool()),
        (Some(200), Some(true))
    );

    for label in ["required_adapter", "named_mix"] {
        let t = &got["tools"][label];
        assert_eq!(
            (t["finish_reason"].as_str(), t["stream_finish"].as_str()),
            (Some("tool_calls"), Some("tool_calls")),
            "{label}: {t}"
        );
        let calls = t["calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "parallel_tool_calls false: {t}");
        assert_eq!(t["calls_valid"], true, "arguments break the tool's schema: {t}");
        let strip = |v: &Value| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|c| (c["name"].clone(), c["arguments"].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&t["calls"]), strip(&t["stream_calls"]), "{label}: streamed calls differ");
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        assert!(t["content"].is_null() && t["stream_content"] == "", "{label}: {t}");
        assert!(["stop", "length"].contains(&t["answer_finish"].as_str().unwrap()));
        assert!(t["answer"].as_str().is_some_and(|a| !a.is_empty()), "{label}: {t}");
        assert_eq!(t["answer"], t["answer_stream"], "{label}: streamed answer differs");
        assert_eq!(
            (t["answer_calls"].as_u64(), t["answer_stream_calls"].as_u64()),
            (Some(0), Some(0))
        );
    }
    let auto = &got["tools"]["auto"];
    match auto["finish_reason"].as_str() {
        Some("tool_calls") => assert!(!auto["calls"].as_array().unwrap().is_empty(), "{auto}"),
        Some("stop" | "length") => {
            assert!(
                auto["content"].as_str().is_some_and(|c| !c.starts_with("<tool_call>")),
                "{auto}"
            )
        }
        other => panic!("auto: finish_reason {other:?}"),
    }
    assert_eq!(got["tools"]["named_mix"]["calls"][0]["name"], "get_weather");
    assert_eq!(got["tools"]["named_mix"]["adapters"].as_array().unwrap().len(), 2);
    assert_eq!(got["tools"]["required_adapter"]["adapters"][0]["name"], "qa-r8");

    let r = &got["responses"];
    assert_eq!(
        (r["text"].clone(), r["usage"].clone()),
        (r["chat_text"].clone(), r["chat_usage"].clone()),
        "responses = chat for the same input: {r}"
    );
    assert_eq!(r["status"], "completed");
    for label in ["mix", "adapter"] {
        let t = &r[label];
        assert_eq!(t["status"], "completed", "{label}: {t}");
        assert_eq!(t["calls"].as_array().unwrap().len(), 1, "{label}: {t}");
        assert_eq!(t["calls_valid"], true, "{label}: {t}");
        assert!(t["calls"][0]["call_id"].as_str().unwrap().starts_with("call_"));
        assert!(["completed", "incomplete"].contains(&t["follow_status"].as_str().unwrap()));
        assert!(t["follow_text"].as_str().is_some_and(|s| !s.is_empty()), "{label}: {t}");
        let events: Vec<&str> =
            t["stream_events"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(events.first(), Some(&"response.created"));
        assert_eq!(events.last(), Some(&"response.completed"));
        assert!(events.contains(&"response.function_call_arguments.done"), "{events:?}");
        let strip = |v: &Value| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|c| (c["name"].clone(), c["arguments"].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&t["calls"]), strip(&t["stream_calls"]), "{label}");
    }
    assert_eq!(r["mix"]["adapters"].as_array().unwrap().len(), 2);
    assert_eq!(r["adapter"]["adapters"][0]["name"], "all-r16");
    assert_eq!(r["stream_text"]["deltas"], r["stream_text"]["final"]);
    assert!(r["parsed"]["name"].is_string() && r["parsed"]["country"].is_string(), "{r}");
    assert_eq!(
        (r["store_true"]["status"].as_u64(), r["store_true"]["param"].as_str()),
        (Some(400), Some("store"))
    );

    for (label, want_param) in [
        ("invalid_schema", "response_format.json_schema.schema"),
        ("unsupported_keyword", "response_format.json_schema.schema"),
        ("logit_bias_key", "logit_bias"),
        ("logit_bias_value", "logit_bias"),
        ("tool_parameters", "tools[0].function.parameters"),
        ("tool_choice_unknown", "tool_choice"),
    ] {
        let b = &got["bad"][label];
        assert_eq!(
            (b["status"].as_u64(), b["param"].as_str()),
            (Some(400), Some(want_param)),
            "{label}: {b}"
        );
    }
    assert!(got["bad"]["unsupported_keyword"]["message"].as_str().unwrap().contains("`not`"));
    assert!(got["still_serving"].as_str().is_some_and(|s| !s.is_empty()));
}
