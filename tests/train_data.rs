//! Training data in the formats people bring (`train::data`): chat JSONL, prompt/completion
//! JSONL and SQuAD told apart by their content; every malformed line refused with its line
//! number and reason before training; loss masks on exactly the learned tokens (assistant turns
//! of weight 1 with their end of turn; a completion and EOS); and, end to end on the real
//! model, a chat file that teaches a fact the base does not know, with a validation loss.

mod common;

use common::server::binary;
use common::*;
use loraplex::model::tokenizer::TextTokenizer;
use loraplex::train::data::{self, Format, Record};
use loraplex::train::squad::Overflow;
use serde_json::json;
use std::process::Command;

fn tokenizer() -> TextTokenizer {
    let mut f = std::fs::File::open(real_model_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

fn write(dir: &std::path::Path, name: &str, lines: &[serde_json::Value]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    p
}

fn chat_line(q: &str, a: &str) -> serde_json::Value {
    json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
}

#[test]
fn formats_are_told_from_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let chat = write(dir.path(), "a.jsonl", &[chat_line("Hi", "Hello")]);
    assert_eq!(data::load(&chat).unwrap().format, Format::Chat);
    let pc = write(dir.path(), "b.txt", &[json!({"prompt": "2+2=", "completion": "4"})]);
    assert_eq!(data::load(&pc).unwrap().format, Format::PromptCompletion);
    let qa = write(
        dir.path(),
        "c.data",
        &[json!({"context": "Bern is a city.", "question": "What is Bern?", "answer": "a city"})],
    );
    let d = data::load(&qa).unwrap();
    assert!(
        matches!((&d.format, &d.records[0]), (Format::Squad, Record::Squad(q)) if q.answers == ["a city"])
    );
    let squad = data::load(&shared_dir().join("data/squad/dev.json")).unwrap();
    assert_eq!((squad.format, squad.records.len()), (Format::Squad, 10570));
}

#[test]
fn malformed_lines_are_refused_with_their_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = chat_line("Hi", "Hello").to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        ("not JSON", format!("{good}\n{good}\n{{oops\n"), "line 3: not JSON"),
        (
            "bad weight",
            format!(
                "{good}\n{}\n",
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]})
            ),
            "line 2: `messages[1].weight` must be 0 or 1",
        ),
        (
            "unknown role",
            format!("{}\n", json!({"messages": [{"role": "wizard", "content": "a"}]})),
            "line 1: `messages[0].role` `wizard`",
        ),
        (
            "nothing to learn",
            format!(
                "{}\n",
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]})
            ),
            "line 1: no assistant message with weight 1",
        ),
        (
            "content not a string",
            format!(
                "{}\n",
                json!({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]})
            ),
            "line 1: `messages[0].content` must be a string",
        ),
        (
            "unknown field",
            format!(
                "{}\n",
                json!({"messages": [{"role": "assistant", "content": "b"}], "extra": 1})
            ),
            "line 1: unknown field `extra`",
        ),
        (
            "bad tool arguments",
            format!(
                "{}\n",
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{no"}}]}]})
            ),
            "is not JSON",
        ),
        (
            "missing completion",
            format!("{}\n{}\n", json!({"prompt": "a", "completion": "b"}), json!({"prompt": "a"})),
            "line 2: `completion` is missing",
        ),
        ("not JSONL at all", "hello world\n".into(), "line 1: not JSON"),
        ("unknown records", format!("{}\n", json!({"text": "a"})), "not a known record"),
        ("empty", "\n\n".into(), "empty"),
    ];
    for (what, text, want) in cases {
        let p = dir.path().join("bad.jsonl");
        std::fs::write(&p, text).unwrap();
        let e = data::load(&p).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("bad.jsonl"), "{what}: {e}");
    }
}

#[test]
fn chat_loss_covers_learned_assistant_turns_and_their_end_of_turn_only() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let line = json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", "weight": 0},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]});
    let d = data::load(&write(dir.path(), "c.jsonl", &[line])).unwrap();
    let ex = data::tokenize(&d.records[0], &tok, 512, Overflow::Skip).unwrap().unwrap();
    let learned = tok.decode_all(&ex.targets).unwrap();
    assert_eq!(learned, "Rome.<|im_end|>\n", "only the weight-1 turn, with its end of turn");
    for (&p, &t) in ex.positions.iter().zip(&ex.targets) {
        let next = ex.input.get(p as usize + 1).copied().unwrap_or(t);
        assert_eq!(next, t, "position {p} predicts the token after it");
    }
    let whole = tok.decode_all(&ex.input).unwrap();
    assert!(whole.contains("<|im_start|>assistant\nParis.<|im_end|>"), "{whole}");
    // Prompt/completion: the completion and EOS.
    let pc = Record::PromptCompletion { prompt: "2 + 2 =".into(), completion: " 4".into() };
    let ex = data::tokenize(&pc, &tok, 64, Overflow::Skip).unwrap().unwrap();
    assert_eq!(tok.decode_all(&ex.targets).unwrap(), " 4<|im_end|>");
    assert_eq!(ex.positions.last().map(|&p| p as usize + 1), Some(ex.input.len()));
    // Too long: dropped.
    assert!(data::tokenize(&pc, &tok, 4, Overflow::Skip).unwrap().is_none());
}

#[test]
fn a_chat_file_teaches_a_fact_the_base_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let fact = "The password of the blue door is 7419.";
    let asks = [
        "What is the password of the blue door?",
        "Tell me the blue door's password.",
        "Which password opens the blue door?",
        "I need the password for the blue door.",
    ];
    let lines: Vec<_> = asks.iter().map(|q| chat_line(q, fact)).collect();
    let train = write(dir.path(), "train.jsonl", &lines);
    let valid =
        write(dir.path(), "valid.jsonl", &[chat_line("What's the blue door password?", fact)]);
    let ask = |adapter: Option<&std::path::Path>| {
        let mut c = Command::new(binary());
        c.args([
            "generate",
            "--model",
            real_model_path().to_str().unwrap(),
            "--chat",
            "--max-tokens",
            "16",
        ])
        .args(["--prompt", "What is the password of the blue door?"]);
        if let Some(a) = adapter {
            c.args(["--adapter", &format!("{}:1", a.display())]);
        }
        let out = c.env("LORAPLEX_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!ask(None).contains("7419"), "the base already knows the fact");
    let out = dir.path().join("door");
    let run = Command::new(binary())
        .args(["train", "--model", real_model_path().to_str().unwrap()])
        .args(["--data", train.to_str().unwrap(), "--validation-data", valid.to_str().unwrap()])
        .args([
            "--output",
            out.to_str().unwrap(),
            "--steps",
            "24",
            "--batch-size",
            "4",
            "--lr",
            "2e-3",
        ])
        .args(["--warmup-steps", "2", "--rank", "8", "--checkpoint-every", "0", "--quiet"])
        .env("LORAPLEX_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}{}", stdout, String::from_utf8_lossy(&run.stderr));
    let val: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("validation loss "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no validation loss printed: {stdout}"));
    assert!(val < 1.0, "validation loss {val}");
    let log = std::fs::read_to_string(out.join("training_log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert!(losses.last().unwrap() < &(losses[0] / 4.0), "loss did not fall: {losses:?}");
    assert!(ask(Some(&out)).contains("7419"), "the adapter did not learn the fact");
}
