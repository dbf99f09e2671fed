//! The fine-tuning API on the release binary and the real model: through the official `openai`
//! client (tests/e2e/fine_tuning_client.py) a chat file teaches a fact the base model does not
//! know, a job follows its events to `succeeded` and its `fine_tuned_model` (and checkpoints)
//! answer with the fact; a second job is cancelled and registers nothing; bad input is refused
//! naming the line or field while the server keeps serving. And a job survives its server:
//! killed with SIGKILL it resumes from its last saved step, stopped with SIGTERM it checkpoints
//! first and resumes exactly there; uploaded files stay intact.

mod common;

use common::server::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const FACT: &str = "The password of the blue door is 7419.";

fn door_file(dir: &Path) -> std::path::PathBuf {
    let asks = [
        "What is the password of the blue door?",
        "Tell me the blue door's password.",
        "Which password opens the blue door?",
        "I need the password for the blue door.",
    ];
    let text: String = asks
        .iter()
        .map(|q| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT}]})
                .to_string()
                + "\n"
        })
        .collect();
    let path = dir.join("door.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_job_through_the_openai_client_teaches_the_model_a_fact() {
    let dir = tempfile::tempdir().unwrap();
    let (adapters, work) = (dir.path().join("adapters"), dir.path().join("work"));
    std::fs::create_dir_all(&work).unwrap();
    let server = Server::start(&adapters, &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/fine_tuning_client.py");
    let out = Command::new("python3").arg(&script).arg(server.url()).arg(&work).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert!(!got["base_answer"].as_str().unwrap().contains("7419"), "the base knows: {got}");
    assert_eq!(got["file"]["purpose"], "fine-tune");
    assert_eq!(got["file"]["status"], "processed");
    assert_eq!(got["file_retrieved"], got["file"]);
    assert_eq!(got["file_content_intact"], true);

    let bad = &got["bad"];
    let refused = |k: &str, status: u64, param: &str, says: &str| {
        let e = &bad[k];
        assert_eq!(e["status"], status, "{k}: {e}");
        assert_eq!(e["param"], param, "{k}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{k}: {e}");
    };
    refused("malformed_line", 422, "file", "line 2");
    refused("not_jsonl", 422, "file", "line 1: not JSON");
    refused("purpose", 422, "purpose", "assistants");
    refused("unknown_model", 404, "model", "no-such-model");
    refused("n_epochs", 422, "n_epochs", "got 0");
    refused("lr_multiplier", 422, "learning_rate_multiplier", "got -1");
    refused("target_module", 422, "target_modules", "query_key_value");
    refused("missing_file", 422, "training_file", "file-nope");
    refused("dpo", 422, "method.type", "dpo");
    refused("lr_subnormal", 422, "learning_rate_multiplier", "normal 32-bit float");
    refused("target_duplicates", 422, "target_modules", "at most 64");
    refused("target_twice", 422, "target_modules", "`q_proj` twice");
    refused("metadata_pairs", 422, "metadata", "at most 16 pairs");
    refused("metadata_value", 422, "metadata", "the limit is 512");
    refused("metadata_key", 422, "metadata", "64 characters");
    for (k, e) in bad.as_object().unwrap() {
        assert!(
            !e["message"].as_str().unwrap().contains(dir.path().to_str().unwrap()),
            "{k} shows a server path: {e}"
        );
    }
    assert_eq!(got["serving_after_bad_input"], true);

    assert_eq!(got["created_status"], "queued");
    let job = &got["job"];
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(got["statuses_seen"].as_array().unwrap().contains(&"running".into()));
    let tuned = job["fine_tuned_model"].as_str().unwrap();
    assert!(tuned.starts_with("ft-door-"), "{tuned}");
    assert!(job["trained_tokens"].as_u64().unwrap() > 0);
    assert!(got["models"].as_array().unwrap().contains(&tuned.into()), "served at once");
    assert!(got["tuned_answer"].as_str().unwrap().contains("7419"), "{}", got["tuned_answer"]);

    // Events: newest first, every step's loss, the loss falling.
    let events = got["events"].as_array().unwrap();
    assert!(events[0]["message"].as_str().unwrap().contains("successfully completed"));
    let losses: Vec<f64> = events
        .iter()
        .rev()
        .filter(|e| e["type"] == "metrics")
        .map(|e| e["data"]["train_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 24);
    assert!(losses[23] < 0.2 * losses[0], "loss {} → {}", losses[0], losses[23]);

    // Checkpoints: the last epochs' ends, each served and answering.
    let cps = got["checkpoints"].as_array().unwrap();
    let steps: Vec<u64> = cps.iter().map(|c| c["step_number"].as_u64().unwrap()).collect();
    assert_eq!(steps, [24, 23, 22]);
    assert!(cps[0]["metrics"]["valid_loss"].as_f64().is_some_and(|v| v < 0.5), "{}", cps[0]);
    for (name, answer) in got["checkpoint_answers"].as_object().unwrap() {
        assert!(got["models"].as_array().unwrap().contains(&name.as_str().into()));
        assert!(answer.as_str().unwrap().contains("7419"), "{name}: {answer}");
    }
    assert!(got["results_csv"].as_str().unwrap().starts_with("step,train_loss"));

    // The cancelled job: no adapter, no checkpoint.
    assert_eq!(got["cancelled_status"], "cancelled");
    assert_eq!(got["second"]["status"], "cancelled");
    assert_eq!(got["second"]["fine_tuned_model"], Value::Null);
    assert_eq!(got["second_checkpoints"], 0);
    assert!(!got["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m.as_str().unwrap().contains("never")));
    assert_eq!(got["jobs_listed"].as_array().unwrap().len(), 2);
}

/// `POST /v1/files` as a multipart form, by hand.
fn upload(port: u16, path: &Path) -> Value {
    use std::io::{Read, Write};
    let content = std::fs::read(path).unwrap();
    let b = "loraplexboundary";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"door.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&content);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let head = format!("POST /v1/files HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary={b}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (_, json) = raw.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {raw}"))
}

fn events(port: u16, job: &str) -> Vec<String> {
    let (_, body) = get(port, &format!("/v1/fine_tuning/jobs/{job}/events?limit=1000"));
    let v: Value = serde_json::from_str(&body).unwrap();
    let mut m: Vec<String> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    m.reverse();
    m
}

fn wait_for(port: u16, job: &str, what: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ev = events(port, job);
        if what(&ev) {
            return ev;
        }
        assert!(Instant::now() < deadline, "timed out; events: {ev:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn last_step(ev: &[String]) -> usize {
    ev.iter()
        .filter_map(|m| m.strip_prefix("Step "))
        .filter_map(|m| m.split('/').next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

#[test]
fn a_job_resumes_after_sigkill_and_checkpoints_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    let data = door_file(dir.path());
    let s1 = Server::start(&adapters, &[]);
    let file = upload(s1.port, &data);
    let id = file["id"].as_str().unwrap().to_string();
    let (_, model) = get(s1.port, "/v1/models");
    let model: Value = serde_json::from_str(&model).unwrap();
    let job = serde_json::json!({
        "model": model["data"][0]["id"], "training_file": id, "suffix": "resume",
        "hyperparameters": {"n_epochs": 14, "batch_size": 4, "learning_rate_multiplier": 4},
    });
    let (status, body) = http(s1.port, "POST", "/v1/fine_tuning/jobs", Some(&job));
    assert_eq!(status, 200, "{body}");
    let job: Value = serde_json::from_str(&body).unwrap();
    let job = job["id"].as_str().unwrap().to_string();

    // SIGKILL after a few steps: the restarted server resumes from the last saved step.
    let killed_after = last_step(&wait_for(s1.port, &job, |ev| last_step(ev) >= 6));
    drop(s1);
    let s2 = Server::start(&adapters, &[]);
    let ev = wait_for(s2.port, &job, |ev| ev.iter().any(|m| m.contains("resumed")));
    let resumed: usize = ev
        .iter()
        .find_map(|m| m.strip_prefix("Fine-tuning job resumed at step "))
        .and_then(|m| m.split('/').next()?.parse().ok())
        .unwrap();
    assert!((5..=killed_after + 1).contains(&resumed), "killed after {killed_after}: {ev:#?}");

    // SIGTERM: the job saves the step it reached and resumes exactly there.
    wait_for(s2.port, &job, |ev| last_step(ev) >= 9);
    let mut s2 = s2;
    let term = Command::new("kill").args(["-TERM", &s2.child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while s2.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "SIGTERM did not stop the server");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s3 = Server::start(&adapters, &[]);
    let ev = wait_for(s3.port, &job, |ev| ev.iter().any(|m| m.contains("successfully completed")));
    let parked = ev
        .iter()
        .find(|m| m.starts_with("Server stopping: checkpointed at step "))
        .expect("a shutdown checkpoint");
    let at: usize = parked.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(at >= 9, "{parked}");
    assert!(ev.contains(&format!("Fine-tuning job resumed at step {at}/14")), "{ev:#?}");
    let steps: Vec<usize> = ev
        .iter()
        .filter_map(|m| m.strip_prefix("Step "))
        .filter_map(|m| m.split('/').next()?.parse().ok())
        .collect();
    assert_eq!(steps.last(), Some(&14));
    // Every step after the last resume point ran once.
    assert!(steps.windows(2).all(|w| w[1] == w[0] + 1 || w[1] <= w[0]), "{steps:?}");

    let (_, content) = get(s3.port, &format!("/v1/files/{id}/content"));
    assert_eq!(content.as_bytes(), std::fs::read(&data).unwrap(), "the upload is intact");
    let (status, body) = http(s3.port, "POST", &format!("/v1/fine_tuning/jobs/{job}/cancel"), None);
    assert_eq!(status, 409, "cancelling a finished job: {body}");
    assert!(body.contains("already succeeded"), "{body}");
    let (_, j) = get(s3.port, &format!("/v1/fine_tuning/jobs/{job}"));
    let j: Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["status"], "succeeded");
    let tuned = j["fine_tuned_model"].as_str().unwrap();
    let (s, answer) = http(
        s3.port,
        "POST",
        "/v1/chat/completions",
        Some(&serde_json::json!({"model": tuned, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the password of the blue door?"}]})),
    );
    assert_eq!(s, 200, "{answer}");
    assert!(answer.contains("7419"), "{answer}");
}
