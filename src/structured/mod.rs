//! Structured outputs: what a request constrains its text to (a JSON schema, any JSON object,
//! a regular expression, one of a list of strings, a Lark grammar), compiled by llguidance
//! against the served tokenizer and cached by its text. The engine gives each constrained
//! sequence its own [`Matcher`], which masks that sequence's row of logits only.

pub mod cache;
pub mod compiler;
pub mod keywords;
pub mod limits;
pub mod tools;

use crate::model::tokenizer::TextTokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::InferenceCapabilities;
use llguidance::ParserFactory;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use llguidance::toktrie::SimpleVob as TokenMask;
pub use llguidance::Matcher;

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

impl ConstraintSpec {
    /// Bytes of its text (what a cache key holds).
    pub fn text_len(&self) -> usize {
        match self {
            ConstraintSpec::JsonObject => 0,
            ConstraintSpec::JsonSchema(t) | ConstraintSpec::Regex(t) | ConstraintSpec::Lark(t) => {
                t.len()
            }
            ConstraintSpec::Choice(v) => v.iter().map(String::len).sum(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StructuredError {
    /// The constraint does not compile; one line of llguidance's reason.
    #[error("{0}")]
    Compile(String),
    /// The constraint exceeds a bound checked before compiling.
    #[error(transparent)]
    Limit(#[from] limits::LimitError),
    /// Compiling took longer than the budget.
    #[error("compiling took longer than the budget of {} ms", .budget.as_millis())]
    Timeout { budget: Duration },
    /// Every compile thread is busy and the queue is full (or the wait used the budget).
    #[error("the grammar compiler is busy; retry shortly")]
    Busy,
    #[error("structured outputs are unavailable for this tokenizer: {0}")]
    Tokenizer(String),
}

/// A compiled constraint: a matcher at the start of the text (its first mask computed),
/// copied for every sequence.
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

/// How grammars compile and how many stay cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrammarOptions {
    /// Bytes the compiled-grammar cache keeps at most.
    pub cache_bytes: usize,
    /// How long one request waits for its grammar to compile.
    pub compile_timeout: Duration,
    /// Compile threads.
    pub threads: usize,
}

impl Default for GrammarOptions {
    fn default() -> Self {
        Self { cache_bytes: 256 << 20, compile_timeout: Duration::from_secs(10), threads: 2 }
    }
}

/// The served tokenizer as llguidance sees it, the compile threads and the cache.
pub struct Grammars {
    compiler: compiler::Compiler,
    cache: Mutex<cache::GrammarCache>,
}

impl Grammars {
    /// `vocab` is the model's logits width (it may exceed the tokenizer's).
    pub fn new(tok: &TextTokenizer, vocab: usize) -> Result<Self, StructuredError> {
        Self::with_options(tok, vocab, GrammarOptions::default())
    }

    pub fn with_options(
        tok: &TextTokenizer,
        vocab: usize,
        opts: GrammarOptions,
    ) -> Result<Self, StructuredError> {
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
        // Errors without the parser's state and the grammar (which can be the request's text).
        factory.limits_mut().verbose_errors = false;
        let compiler =
            compiler::Compiler::start(Arc::new(factory), opts.threads, opts.compile_timeout)?;
        Ok(Self { compiler, cache: Mutex::new(cache::GrammarCache::new(opts.cache_bytes)) })
    }

    /// The compiled grammar for `spec`, from the cache when it was compiled before. The
    /// bounds of [`limits`] are checked first; the compile runs on a compile thread within
    /// the time budget.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Arc<Grammar>, StructuredError> {
        limits::check(spec)?;
        self.compile_checked(spec)
    }

    /// As [`Grammars::compile`], for a constraint built from parts already checked against
    /// the bounds (a request's tools).
    pub fn compile_checked(&self, spec: &ConstraintSpec) -> Result<Arc<Grammar>, StructuredError> {
        if let Some(g) = self.cache.lock().ok().and_then(|mut c| c.get(spec)) {
            return Ok(g);
        }
        let compiled = self.compiler.compile(spec.clone())?;
        let grammar = Arc::new(compiled.grammar);
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(spec.clone(), grammar.clone(), compiled.bytes);
        }
        Ok(grammar)
    }

    /// The cache's bytes, entries and budget.
    pub fn cache_usage(&self) -> cache::CacheUsage {
        self.cache.lock().map(|c| c.usage()).unwrap_or_default()
    }

    /// How long one request waits for its compile.
    pub fn compile_timeout(&self) -> Duration {
        self.compiler.budget()
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

pub(crate) fn top_level(spec: &ConstraintSpec) -> Result<TopLevelGrammar, StructuredError> {
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
