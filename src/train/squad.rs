//! SQuAD data: the official v1.1 / v2.0 JSON (plain or `.gz`) and JSONL lines of
//! `{"context","question","answer"}` → question-answer examples; the prompt format of the
//! design notes; tokenized training examples with the loss on the answer and EOS only, and
//! over-long examples either skipped or truncated in the context around the answer.

pub use super::data::TrainExample;
use crate::model::tokenizer::TextTokenizer;
use serde::Deserialize;
use std::io::Read;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("i/o error on `{path}`: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid data in `{path}`: {reason}")]
    Invalid { path: String, reason: String },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

/// One question with its context and reference answers.
#[derive(Debug, Clone, PartialEq)]
pub struct QaExample {
    pub id: String,
    pub context: String,
    pub question: String,
    /// Reference answers (SQuAD dev has several); empty for unanswerable v2.0 questions.
    pub answers: Vec<String>,
    /// Character offset of the first answer in the context, when known.
    pub answer_start: Option<usize>,
}

#[derive(Deserialize)]
struct SquadFile {
    data: Vec<SquadArticle>,
}
#[derive(Deserialize)]
struct SquadArticle {
    paragraphs: Vec<SquadParagraph>,
}
#[derive(Deserialize)]
struct SquadParagraph {
    context: String,
    qas: Vec<SquadQa>,
}
#[derive(Deserialize)]
struct SquadQa {
    id: String,
    question: String,
    #[serde(default)]
    answers: Vec<SquadAnswer>,
    #[serde(default)]
    is_impossible: bool,
}
#[derive(Deserialize)]
struct SquadAnswer {
    text: String,
    answer_start: usize,
}
#[derive(Deserialize)]
struct JsonlLine {
    #[serde(default)]
    id: Option<String>,
    context: String,
    question: String,
    answer: AnswerField,
}
#[derive(Deserialize)]
#[serde(untagged)]
enum AnswerField {
    One(String),
    Many(Vec<String>),
}

pub fn read_text(path: &Path) -> Result<String, DataError> {
    let io = |source| DataError::Io { path: path.display().to_string(), source };
    let raw = std::fs::read(path).map_err(io)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_string(&mut s).map_err(io)?;
        Ok(s)
    } else {
        String::from_utf8(raw).map_err(|_| DataError::Invalid {
            path: path.display().to_string(),
            reason: "not UTF-8".into(),
        })
    }
}

/// Reads SQuAD JSON (v1.1 or v2.0, optionally gzipped) or JSONL (`.jsonl`, `.jsonl.gz`).
pub fn load(path: &Path) -> Result<Vec<QaExample>, DataError> {
    let text = read_text(path)?;
    let name = path.to_string_lossy();
    let jsonl = name.ends_with(".jsonl") || name.ends_with(".jsonl.gz");
    parse(&text, jsonl)
        .map_err(|reason| DataError::Invalid { path: path.display().to_string(), reason })
}

/// Parses SQuAD JSON (v1.1 or v2.0) or, with `jsonl`, lines of `{"context", "question",
/// "answer"}`; the error says what is wrong (and on which line).
pub fn parse(text: &str, jsonl: bool) -> Result<Vec<QaExample>, String> {
    if jsonl {
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let j: JsonlLine =
                    serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1))?;
                let answers = match j.answer {
                    AnswerField::One(a) => vec![a],
                    AnswerField::Many(v) => v,
                };
                let answer_start = answers
                    .first()
                    .and_then(|a| j.context.find(a.as_str()))
                    .map(|b| j.context[..b].chars().count());
                Ok(QaExample {
                    id: j.id.unwrap_or_else(|| format!("line-{}", i + 1)),
                    context: j.context,
                    question: j.question,
                    answers,
                    answer_start,
                })
            })
            .collect();
    }
    let file: SquadFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for article in file.data {
        for p in article.paragraphs {
            for qa in p.qas {
                let answers: Vec<String> = if qa.is_impossible {
                    vec![]
                } else {
                    qa.answers.iter().map(|a| a.text.clone()).collect()
                };
                let answer_start = if qa.is_impossible {
                    None
                } else {
                    qa.answers.first().map(|a| a.answer_start)
                };
                out.push(QaExample {
                    id: qa.id,
                    context: p.context.clone(),
                    question: qa.question,
                    answers,
                    answer_start,
                });
            }
        }
    }
    Ok(out)
}

pub const CONTEXT_HEADER: &str = "### CONTEXT\n";

/// The text after the context: question and the answer header.
pub fn prompt_tail(question: &str) -> String {
    format!("\n\n### QUESTION\n{question}\n\n### ANSWER\n")
}

/// The prompt of the design notes (the answer follows it directly).
pub fn prompt(ex: &QaExample) -> String {
    format!("{CONTEXT_HEADER}{}{}", ex.context, prompt_tail(&ex.question))
}

/// What to do with an example longer than the sequence limit.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    Skip,
    Truncate,
}

fn enc(tok: &TextTokenizer, s: &str) -> Result<Vec<u32>, DataError> {
    tok.encode(s).map_err(|e| DataError::Tokenizer(e.to_string()))
}

/// Tokenizes one answerable example; `None` when it is too long and `overflow` is `Skip` (or
/// when even the question and answer alone do not fit).
pub fn tokenize(
    ex: &QaExample,
    tok: &TextTokenizer,
    max_len: usize,
    overflow: Overflow,
) -> Result<Option<TrainExample>, DataError> {
    let Some(answer) = ex.answers.first() else { return Ok(None) };
    let eos = *tok
        .eos_ids
        .first()
        .ok_or_else(|| DataError::Tokenizer("the tokenizer has no EOS token".into()))?;
    let head = enc(tok, CONTEXT_HEADER)?;
    let ctx = enc(tok, &ex.context)?;
    let tail = enc(tok, &prompt_tail(&ex.question))?;
    let mut targets = enc(tok, answer)?;
    targets.push(eos);
    let fixed = head.len() + tail.len() + targets.len();
    let ctx = if fixed + ctx.len() <= max_len {
        ctx
    } else if overflow == Overflow::Skip || fixed >= max_len {
        return Ok(None);
    } else {
        let budget = max_len - fixed;
        let (lo, hi) =
            window_around_answer(tok, &ex.context, ex.answer_start, answer, &ctx, budget)?;
        ctx[lo..hi].to_vec()
    };
    let mut full = head;
    full.extend_from_slice(&ctx);
    full.extend_from_slice(&tail);
    full.extend_from_slice(&targets[..targets.len() - 1]);
    Ok(Some(TrainExample::tail(full, targets)))
}

/// A `budget`-token window `[lo, hi)` of the context tokens that contains the answer span,
/// centred on it as far as the context allows.
fn window_around_answer(
    tok: &TextTokenizer,
    context: &str,
    start: Option<usize>,
    answer: &str,
    ctx: &[u32],
    budget: usize,
) -> Result<(usize, usize), DataError> {
    let char_start = start.or_else(|| context.find(answer)).unwrap_or(0);
    let byte_start = context.char_indices().nth(char_start).map_or(context.len(), |(b, _)| b);
    let byte_end = (byte_start + answer.len()).min(context.len());
    // Token index where the answer starts/ends: the token count of the text before it.
    let before = enc(tok, context.get(..byte_start).unwrap_or(context))?.len();
    let through = enc(tok, context.get(..byte_end).unwrap_or(context))?.len();
    let span = through.saturating_sub(before).max(1);
    let slack = budget.saturating_sub(span);
    let lo = before.saturating_sub(slack / 2).min(ctx.len().saturating_sub(budget));
    Ok((lo, (lo + budget).min(ctx.len())))
}
