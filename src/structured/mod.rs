//! Structured outputs: what a request constrains its text to (a JSON schema, any JSON object,
//! a regular expression, one of a list of strings, a Lark grammar), compiled by llguidance
//! against the served tokenizer and cached by its text. The engine gives each constrained
//! sequence its own [`Matcher`], which masks that sequence's row of logits only.

pub mod keywords;
pub mod tools;

use crate::model::tokenizer::TextTokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::InferenceCapabilities;
use llguidance::ParserFactory;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use llguidance::toktrie::SimpleVob as TokenMask;
pub use llguidance::Matcher;

/// Compiled grammars kept: a server sees few distinct schemas, each compiled once.
const CACHE_ENTRIES: usize = 256;

/// What a request's text must match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConstraintSpec {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A JSON schema, as its JSON text.
    JsonSchema(String),
    /// A regular expression (Rust `regex` syntax) the whole text matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StructuredError {
    /// The constraint does not compile; the message is llguidance's, naming what it refused.
    #[error("{0}")]
    Compile(String),
    #[error("structured outputs are unavailable for this tokenizer: {0}")]
    Tokenizer(String),
}

/// A compiled constraint: a matcher at the start of the text, copied for every sequence.
pub struct Grammar {
    fresh: Matcher,
    /// How long compiling took (0 for a cache hit's later users).
    pub compile_time: Duration,
}

impl Grammar {
    /// A matcher of its own for one sequence.
    pub fn matcher(&self) -> Matcher {
        self.fresh.deep_clone()
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("compile_time", &self.compile_time).finish()
    }
}

/// The served tokenizer as llguidance sees it, and the compiled-grammar cache.
pub struct Grammars {
    factory: ParserFactory,
    cache: Mutex<HashMap<ConstraintSpec, Arc<Grammar>>>,
}

impl Grammars {
    /// `vocab` is the model's logits width (it may exceed the tokenizer's).
    pub fn new(tok: &TextTokenizer, vocab: usize) -> Result<Self, StructuredError> {
        let bad = |e: &dyn std::fmt::Display| StructuredError::Tokenizer(e.to_string());
        let json = tok.inner.to_string(false).map_err(|e| bad(&e))?;
        let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())
            .map_err(|e| bad(&e))?;
        if !tok.eos_ids.is_empty() {
            bytes.set_eos_tokens(&tok.eos_ids);
        }
        let env = bytes.into_tok_env(Some(vocab)).map_err(|e| bad(&e))?;
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| bad(&e))?;
        factory.quiet();
        Ok(Self { factory, cache: Mutex::new(HashMap::new()) })
    }

    /// The compiled grammar for `spec`, from the cache when it was compiled before.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Arc<Grammar>, StructuredError> {
        if let Some(g) = self.cache.lock().ok().and_then(|c| c.get(spec).cloned()) {
            return Ok(g);
        }
        let started = Instant::now();
        let parser = self
            .factory
            .create_parser(top_level(spec)?)
            .map_err(|e| StructuredError::Compile(e.to_string()))?;
        let fresh = Matcher::new(Ok(parser));
        if let Some(e) = fresh.get_error() {
            return Err(StructuredError::Compile(e));
        }
        let grammar = Arc::new(Grammar { fresh, compile_time: started.elapsed() });
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(spec.clone(), grammar.clone());
        }
        Ok(grammar)
    }
}

/// JSON is written as `json.dumps` writes it (`", "` and `": "`, no other whitespace): the
/// form models saw most, and no room for a small model to loop on blank lines. A schema may
/// set llguidance's own `x-guidance` options instead.
fn json_grammar(mut schema: serde_json::Value) -> Result<TopLevelGrammar, StructuredError> {
    keywords::check(&schema).map_err(StructuredError::Compile)?;
    let Some(obj) = schema.as_object_mut() else {
        return match schema {
            serde_json::Value::Bool(_) => Ok(TopLevelGrammar::from_json_schema(schema)),
            _ => Err(StructuredError::Compile("a JSON schema must be an object".into())),
        };
    };
    obj.entry("x-guidance").or_insert_with(|| {
        serde_json::json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        })
    });
    Ok(TopLevelGrammar::from_json_schema(schema))
}

fn top_level(spec: &ConstraintSpec) -> Result<TopLevelGrammar, StructuredError> {
    match spec {
        ConstraintSpec::JsonObject => json_grammar(serde_json::json!({"type": "object"})),
        ConstraintSpec::JsonSchema(text) => json_grammar(
            serde_json::from_str(text).map_err(|e| StructuredError::Compile(e.to_string()))?,
        ),
        ConstraintSpec::Regex(rx) => Ok(TopLevelGrammar::from_regex(rx)),
        ConstraintSpec::Choice(options) => {
            let alternatives: Vec<String> = options.iter().map(|o| regex::escape(o)).collect();
            Ok(TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|"))))
        }
        ConstraintSpec::Lark(text) => Ok(TopLevelGrammar::from_lark(text.clone())),
    }
}
