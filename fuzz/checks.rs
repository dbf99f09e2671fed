// The properties each fuzz target checks, shared by the cargo-fuzz targets
// (fuzz/fuzz_targets/*.rs) and the regression test that replays saved inputs
// (tests/fuzz_regressions.rs), so a crash found once stays a test.

use loraplex::adapters::{header, PeftConfig};
use loraplex::api::openai::{ChatRequest, CompletionRequest};
use loraplex::api::context::ModelView;
use loraplex::api::validate;
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

/// Structured outputs for that tokenizer, built once.
pub fn grammars() -> &'static loraplex::structured::Grammars {
    static G: std::sync::OnceLock<loraplex::structured::Grammars> = std::sync::OnceLock::new();
    G.get_or_init(|| loraplex::structured::Grammars::new(tokenizer(), VOCAB).expect("grammars"))
}

/// The default model's logits width.
const VOCAB: usize = 49152;

/// Any body either parses and validates into a typed request or yields an OpenAI-shaped error.
pub fn request(data: &[u8]) {
    let limits = Limits::default();
    let mv = ModelView {
        id: "SmolLM2-135M-Instruct",
        context_len: 8192,
        vocab: VOCAB,
        grammars: Ok(grammars()),
        tokenizer: tokenizer(),
        limits: &limits,
        registry: None,
    };
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        match validate::completion(&req, &mv) {
            Ok(v) => check_valid(&v, &limits),
            Err(e) => assert!(e.body()["error"]["message"].is_string()),
        }
    }
    if let Ok(req) = serde_json::from_slice::<ChatRequest>(data) {
        match validate::chat(&req, &mv) {
            Ok(v) => {
                assert_eq!(v.response.prompt_lens.len(), 1);
                check_valid(&v, &limits);
            }
            Err(e) => assert!(e.body()["error"]["message"].is_string()),
        }
    }
}

/// A validated request is within every limit, in the types the engine computes with.
fn check_valid(v: &validate::ValidRequest, limits: &Limits) {
    let r = &v.response;
    assert!(r.n >= 1 && r.n <= limits.max_n && !r.prompt_lens.is_empty());
    assert_eq!(v.sequences.len(), r.prompt_lens.len() * r.n);
    let work: usize = v.sequences.iter().map(|s| s.prompt_ids.len() + s.max_tokens).sum();
    assert!(work <= limits.max_request_tokens);
    for s in &v.sequences {
        assert!(!s.prompt_ids.is_empty() && s.prompt_ids.len() <= limits.max_prompt_tokens);
        assert!(s.max_tokens >= 1 && s.prompt_ids.len() + s.max_tokens <= 8192);
        let t = s.sampling.temperature;
        assert!(t == 0.0 || (validate::MIN_TEMPERATURE..=2.0).contains(&t));
        assert!(s.sampling.top_p as f32 > 0.0 && s.sampling.top_p <= 1.0);
        assert!(s.mix.is_empty(), "no registry here: adapters cannot resolve");
        let (rules, p) = (&s.rules, &s.sampling);
        assert!(rules.repetition > 0.0 && rules.repetition.is_finite());
        assert!((0.0..=1.0).contains(&p.min_p));
        assert!(rules.bias.iter().all(|&(t, b)| (t as usize) < VOCAB && (-100.0..=100.0).contains(&b)));
        assert!(s.stop_token_ids.iter().all(|&t| (t as usize) < VOCAB));
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
