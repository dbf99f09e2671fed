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
        .args(["train", "--model", real_model_path().to_str().unwrap(), "--data", data.to_str().unwrap(), "--output", out.to_str().unwrap()])
        .args(["--steps", "2", "--batch-size", "2", "--rank", "4", "--target-modules", "q_proj,v_proj", "--checkpoint-every", "0", "--warmup-steps", "0", "--quiet"])
        .env("LORAPLEX_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    for f in ["adapter_config.json", "adapter_model.safetensors", "README.md", "training_log.jsonl", "loss.png"] {
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
        assert!(trained_at.elapsed() < Duration::from_secs(20), "the new adapter was not served: {s} {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, models) = get(server.port, "/v1/models");
    assert!(models.contains("fresh-squad"));
}
