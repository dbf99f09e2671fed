// The properties each fuzz target checks, shared by the cargo-fuzz targets
// (fuzz/fuzz_targets/*.rs) and the regression test that replays saved inputs
// (tests/fuzz_regressions.rs), so a crash found once stays a test.

use loraplex::adapters::{header, PeftConfig};
use loraplex::api::openai::{ChatRequest, CompletionRequest};
use loraplex::api::validate::{self, ModelView};
use loraplex::config::Limits;
use loraplex::model::ModuleId;
use loraplex::train::squad::{self, Overflow};

/// The real default model's tokenizer, read once from the GGUF metadata (no weights).
/// `LORAPLEX_MODEL` overrides the path; the default is the file scripts/fetch-model.sh fetches.
pub fn tokenizer() -> &'static loraplex::model::tokenizer::TextTokenizer {
    static TOK: std::sync::OnceLock<loraplex::model::tokenizer::TextTokenizer> =
        std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = if root.ends_with("fuzz") { root.parent().unwrap_or(root) } else { root };
        let path = std::env::var("LORAPLEX_MODEL").unwrap_or_else(|_| {
            root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf").display().to_string()
        });
        let mut f = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e} (run scripts/fetch-model.sh)"));
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut f).expect("GGUF header");
        loraplex::model::tokenizer::TextTokenizer::from_gguf(&content).expect("tokenizer from GGUF")
    })
}

/// Any body either parses and validates into a typed request or yields an OpenAI-shaped error.
pub fn request(data: &[u8]) {
    let limits = Limits::default();
    let mv = ModelView {
        id: "SmolLM2-135M-Instruct",
        context_len: 8192,
        tokenizer: tokenizer(),
        limits: &limits,
        registry: None,
    };
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        match validate::completion(&req, &mv) {
            Ok(d) => {
                assert!(d.n >= 1 && d.n <= limits.max_n && !d.prompts.is_empty());
                assert!(d
                    .prompts
                    .iter()
                    .all(|p| !p.is_empty() && p.len() <= limits.max_prompt_tokens));
                assert!(d.adapters.len() <= limits.max_adapters_per_request);
                assert!(d
                    .adapters
                    .iter()
                    .all(|(_, s)| s.is_finite() && s.abs() <= limits.max_abs_scale));
            }
            Err(e) => assert!(e.body()["error"]["message"].is_string()),
        }
    }
    if let Ok(req) = serde_json::from_slice::<ChatRequest>(data) {
        match validate::chat(&req, &mv) {
            Ok(d) => assert_eq!(d.prompts.len(), 1),
            Err(e) => assert!(e.body()["error"]["message"].is_string()),
        }
    }
}

/// Any text is a config or an error; an accepted config answers every module query and
/// survives a round trip through its PEFT JSON unchanged.
pub fn adapter_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = PeftConfig::from_json(text) else { return };
    let _ = cfg.unknown_list_targets(30);
    let again = PeftConfig::from_json(&cfg.to_peft_json().to_string())
        .expect("a written config reads back");
    for id in ModuleId::all(30) {
        assert_eq!(cfg.targets(id), again.targets(id), "{id}");
        if cfg.targets(id) {
            let (r, alpha) = cfg.rank_alpha(id);
            assert!(r >= 1 && alpha.is_finite(), "{id}: r {r}, alpha {alpha}");
            assert_eq!((r, alpha), again.rank_alpha(id), "{id}");
        }
    }
}

/// Any bytes are accepted or refused by the header check; what it accepts lies inside the
/// file, and the safetensors reader can index it.
pub fn safetensors_header(data: &[u8]) {
    let Ok(declared) = header::check_bytes(data, 1 << 20) else { return };
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) as usize;
    let data_len = (data.len() - 8 - n) as u64;
    for d in &declared {
        assert!(d.range.0 <= d.range.1 && d.range.1 <= data_len, "{d:?} in {data_len}");
    }
    if let Ok(st) = safetensors::SafeTensors::deserialize(data) {
        for (_, view) in st.tensors() {
            let _ = view.data().len();
        }
    }
}

/// Any text parses as SQuAD JSON / JSONL or errors; every tokenized example fits the limit,
/// ends its targets with EOS and masks exactly the targets.
pub fn squad(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let tok = tokenizer();
    for jsonl in [false, true] {
        let Ok(examples) = squad::parse(text, jsonl) else { continue };
        for ex in examples.iter().take(4) {
            let _ = squad::prompt(ex);
            for overflow in [Overflow::Skip, Overflow::Truncate] {
                if let Ok(Some(t)) = squad::tokenize(ex, tok, 48, overflow) {
                    assert!(t.full_len() <= 48, "{} tokens", t.full_len());
                    assert_eq!(t.targets.last(), tok.eos_ids.first());
                    assert_eq!(
                        t.loss_mask().iter().filter(|m| m.is_some()).count(),
                        t.targets.len()
                    );
                }
            }
        }
    }
}
