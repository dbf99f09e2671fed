//! (m) Structured outputs on the default model's tokenizer: compiling a typical schema (the
//! nested pydantic model of tests/e2e/structured_client.py, a fresh text each iteration so the
//! cache never answers), and one token mask mid-way through a JSON object.
//! Run: `scripts/fetch-model.sh && cargo bench --bench structured` (part of
//! scripts/bench-structured.sh).

use criterion::{criterion_group, criterion_main, Criterion};
use loraplex::model::tokenizer::TextTokenizer;
use loraplex::structured::{ConstraintSpec, Grammars};
use serde_json::json;

fn person(max_age: u64) -> String {
    json!({"$defs": {"Address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 24},
            "zip_code": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip_code"], "additionalProperties": false}},
        "type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": max_age},
            "role": {"enum": ["engineer", "doctor", "teacher"]},
            "address": {"$ref": "#/$defs/Address"},
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
        "required": ["name", "age", "role", "address", "skills"], "additionalProperties": false})
    .to_string()
}

fn bench(c: &mut Criterion) {
    let path = std::env::var("LORAPLEX_MODEL").unwrap_or_else(|_| {
        format!("{}/models/SmolLM2-135M-Instruct.Q4_1.gguf", env!("CARGO_MANIFEST_DIR"))
    });
    let mut f = std::fs::File::open(&path).expect("run scripts/fetch-model.sh");
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = TextTokenizer::from_gguf(&content).unwrap();
    let grammars = Grammars::new(&tok, 49152).unwrap();
    let mut n = 120;
    c.bench_function("structured/compile a typical schema", |b| {
        b.iter(|| {
            n += 1;
            grammars.compile(&ConstraintSpec::JsonSchema(person(n))).unwrap()
        })
    });
    let g = grammars.compile(&ConstraintSpec::JsonSchema(person(120))).unwrap();
    let mut m = g.matcher();
    let prefix = tok
        .encode_with(
            r#"{"name": "Ada", "age": 36, "role": "engineer", "address": {"city": "#,
            false,
        )
        .unwrap();
    m.consume_tokens(&prefix).unwrap();
    c.bench_function("structured/one token mask mid-object", |b| {
        b.iter(|| {
            m.invalidate_bias_cache();
            m.compute_mask().unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
