//! Gemma-3-270m from its GGUF (Q4_K_M, fetched by `scripts/fetch-gemma.sh`): its SentencePiece
//! vocabulary tokenizes as llama.cpp does, its next-token distribution matches llama.cpp's, the
//! GGUF path and the Hugging Face path on the same (dequantized) weights agree, and the server
//! answers OpenAI requests, plain and streamed, with an adapter made for it.

mod common;

use actix_web::http::StatusCode;
use actix_web::test as web_test;
use candle_core::{DType, Device};
use common::http::{app, call, ctx_with, post};
use common::*;
use loraplex::adapters::AdapterMix;
use loraplex::engine::LoraPath;
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::WeightFormat;
use serde_json::{json, Value};
use std::path::PathBuf;

fn gemma_path() -> PathBuf {
    let p = std::env::var("LORAPLEX_GEMMA_MODEL").map(PathBuf::from).unwrap_or_else(|_| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-Q4_K_M.gguf")
    });
    assert!(p.exists(), "Gemma-3-270m missing at {}: run scripts/fetch-gemma.sh", p.display());
    p
}

fn reference() -> Value {
    serde_json::from_str(include_str!("data/gemma3-270m-llamacpp.json")).unwrap()
}

fn load(spec: &str) -> LoadedModel {
    load_model(spec, WeightFormat::Dense(DType::F32), &Device::Cpu).unwrap()
}

fn last_logprobs(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let logits = common::reference::prefill_logits(
        &m.model,
        &[ids.to_vec()],
        &AdapterMix::default(),
        LoraPath::Batched,
    )
    .remove(0);
    let last = logits.get(ids.len() - 1).unwrap();
    candle_nn::ops::log_softmax(&last, 0).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn the_sentencepiece_vocabulary_tokenizes_as_llama_cpp() {
    let mut f = std::fs::File::open(gemma_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = loraplex::model::tokenizer::TextTokenizer::from_gguf(&content).unwrap();
    for case in reference()["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> =
            case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        // Decoding drops the BOS the encoder added and gives the text back.
        assert_eq!(
            tok.decode(&want[1..]).unwrap(),
            text.replace("<start_of_turn>", "").replace("<end_of_turn>", ""),
            "{text:?}"
        );
    }
}

/// llama.cpp's five most likely next tokens get, on the f32 path, log-probabilities within 0.25
/// of llama.cpp's (which rounds activations to 8 bits in its K-quant matmuls): a wrong norm,
/// rope base, window or score scale moves them by whole units.
#[test]
fn the_next_token_distribution_matches_llama_cpp() {
    let m = load(gemma_path().to_str().unwrap());
    assert_eq!(m.model.cfg.arch.name, "gemma3");
    for case in reference()["next_token"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ours = last_logprobs(&m, &m.tokenizer.encode(prompt).unwrap());
        for pair in case["top_logprobs"].as_array().unwrap() {
            let (id, want) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            println!("{prompt:?}: token {id}: ours {:.3}, llama.cpp {want:.3}", ours[id]);
            assert!(
                (ours[id] - want).abs() < 0.25,
                "{prompt:?} token {id}: ours {}, llama.cpp {want}",
                ours[id]
            );
        }
    }
}

/// The GGUF written out as a Hugging Face folder (dequantized, norms as `w`, the layer pattern
/// and rope bases in `config.json`) loads through the Hugging Face path to the same model.
#[test]
fn the_gguf_and_hugging_face_paths_agree() {
    let dir = tempfile::tempdir().unwrap();
    loraplex::model::gguf_export::write_hf_from_gguf(&gemma_path(), dir.path()).unwrap();
    let (g, h) = (load(gemma_path().to_str().unwrap()), load(dir.path().to_str().unwrap()));
    assert_eq!(h.model.cfg.arch.windows, g.model.cfg.arch.windows);
    let prompts = ["The capital of France is", "Once upon a time, there was a"];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| g.tokenizer.encode(p).unwrap()).collect();
    for (p, i) in prompts.iter().zip(&ids) {
        assert_eq!(&h.tokenizer.encode(p).unwrap(), i, "{p}");
    }
    let (lg, lh) = (
        common::reference::prefill_logits(
            &g.model,
            &ids,
            &AdapterMix::default(),
            LoraPath::Batched,
        ),
        common::reference::prefill_logits(
            &h.model,
            &ids,
            &AdapterMix::default(),
            LoraPath::Batched,
        ),
    );
    for (a, b) in lg.iter().zip(&lh) {
        assert!(max_abs_diff(a, b) < 1e-3, "{}", max_abs_diff(a, b));
    }
    let greedy = |m: &LoadedModel| {
        common::reference::greedy(m, &ids, &AdapterMix::default(), LoraPath::Batched, 16)
    };
    assert_eq!(greedy(&g), greedy(&h));
}

#[actix_web::test]
async fn openai_requests_plain_and_streamed_with_an_adapter() {
    let (cfg, _) = loraplex::model::load::read_config(gemma_path().to_str().unwrap()).unwrap();
    let c = ctx_with(|o| o.model = Some(gemma_path().display().to_string()));
    write_random_adapter(
        &c.dir.path().join("gemma-r4"),
        &cfg,
        &lora_config(4, 8.0, &["q_proj", "v_proj", "down_proj"]),
        11,
    );
    c.state.backend().unwrap().registry.rescan();
    let app = app(&c).await;
    let (s, models) = call(&app, web_test::TestRequest::get().uri("/v1/models")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(models["data"][0]["loraplex"]["architecture"], "gemma3");
    let body = |model: Option<&str>, stream: bool| {
        let mut b = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": true, "stream": stream});
        if let Some(m) = model {
            b["model"] = json!(m);
        }
        b
    };
    let (s, base) = call(&app, post("/v1/completions", body(None, false))).await;
    assert_eq!(s, StatusCode::OK, "{base}");
    let (s, adapted) = call(&app, post("/v1/completions", body(Some("gemma-r4"), false))).await;
    assert_eq!(s, StatusCode::OK, "{adapted}");
    assert_eq!(adapted["adapters"][0]["name"], "gemma-r4");
    assert_eq!(adapted["usage"]["completion_tokens"], 8);
    assert_ne!(
        adapted["choices"][0]["text"], base["choices"][0]["text"],
        "the adapter changes the output"
    );
    // Streamed: the chunks' texts concatenate to the plain response's text.
    let resp = web_test::call_service(
        &app,
        post("/v1/completions", body(Some("gemma-r4"), true)).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(web_test::read_body(resp).await.to_vec()).unwrap();
    let streamed: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(streamed, adapted["choices"][0]["text"].as_str().unwrap());
}
