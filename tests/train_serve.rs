//! Train → serve: `loraplex train` writes a few steps' adapter into the adapters folder of a
//! running `loraplex serve`, which serves it without a restart.

mod common;

use common::server::*;
use common::*;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_freshly_trained_adapter_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    let server = Server::start(&adapters, &[]);
    let data = dir.path().join("qa.jsonl");
    let lines = [
        json!({"context": "Bern is the capital of Switzerland.", "question": "What is the capital of Switzerland?", "answer": "Bern"}),
        json!({"context": "The Nile flows through Egypt.", "question": "Which river flows through Egypt?", "answer": "The Nile"}),
        json!({"context": "Marie Curie won two Nobel prizes.", "question": "How many Nobel prizes did Marie Curie win?", "answer": "two"}),
        json!({"context": "Mount Fuji is in Japan.", "question": "Where is Mount Fuji?", "answer": "Japan"}),
    ];
    std::fs::write(&data, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let out = adapters.join("fresh-squad");
    let status = Command::new(binary())
        .args([
            "train",
            "--model",
            real_model_path().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .args([
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--rank",
            "4",
            "--target-modules",
            "q_proj,v_proj",
            "--checkpoint-every",
            "0",
            "--warmup-steps",
            "0",
            "--quiet",
        ])
        .env("LORAPLEX_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "training_log.jsonl",
        "loss.png",
    ] {
        assert!(out.join(f).exists(), "{f} written");
    }
    let trained_at = Instant::now();
    let body = json!({"model": "fresh-squad", "prompt": "### CONTEXT\nBern is the capital of Switzerland.\n\n### QUESTION\nWhat is the capital of Switzerland?\n\n### ANSWER\n", "max_tokens": 8, "temperature": 0});
    loop {
        let (s, v) = complete(server.port, body.clone());
        if s == 200 {
            assert_eq!(v["adapters"][0]["name"], "fresh-squad");
            break;
        }
        assert!(
            trained_at.elapsed() < Duration::from_secs(20),
            "the new adapter was not served: {s} {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, models) = get(server.port, "/v1/models");
    assert!(models.contains("fresh-squad"));
}

/// `kill -9` of `loraplex train` after a checkpoint, then `--resume`: the adapter equals
/// the uninterrupted run's (same seed), tensor by tensor within float tolerance.
#[test]
fn a_run_killed_with_sigkill_resumes_to_the_uninterrupted_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("qa.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| json!({"context": format!("Box {i} holds {} marbles.", i * 3 + 1), "question": format!("How many marbles are in box {i}?"), "answer": format!("{}", i * 3 + 1)}).to_string() + "\n")
        .collect();
    std::fs::write(&data, lines.concat()).unwrap();
    let train = |out: &std::path::Path, resume: bool| {
        let mut c = Command::new(binary());
        c.args([
            "train",
            "--model",
            real_model_path().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .args([
            "--steps",
            "8",
            "--batch-size",
            "2",
            "--rank",
            "4",
            "--target-modules",
            "q_proj,v_proj",
            "--checkpoint-every",
            "2",
        ])
        .args([
            "--warmup-steps",
            "1",
            "--seed",
            "7",
            "--quiet",
            if resume { "--resume" } else { "--resume=false" },
        ])
        .env("LORAPLEX_LOG", "warn");
        c
    };
    let full = dir.path().join("full");
    assert!(train(&full, false).status().unwrap().success());

    let killed = dir.path().join("killed");
    let state = dir.path().join(".killed.checkpoint/state.json");
    let mut child = train(&killed, false).spawn().unwrap();
    let started = Instant::now();
    // Kill it as soon as a checkpoint past step 2 exists, mid-way through the run.
    loop {
        let step = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["step"].as_u64());
        if step.is_some_and(|s| s >= 4) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "training ended before it could be killed");
        assert!(started.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("adapter_model.safetensors").exists(), "no adapter from a killed run");
    assert!(train(&killed, true).status().unwrap().success());

    let load = |p: &std::path::Path| {
        candle_core::safetensors::load(
            p.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (load(&full), load(&killed));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let d = max_abs_diff(t, &b[k]);
        assert!(d < 1e-5, "{k}: {d}");
    }
}
