//! The model's tokenizer and chat template: from `tokenizer.json` (+ `tokenizer_config.json`)
//! or rebuilt from GGUF metadata (`tokenizer.ggml.*`: byte-level BPE vocab, merges, special
//! tokens and the named pre-tokenizer), with the template rendered by minijinja.

use super::{ModelError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde::Serialize;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's GGUF token types for control (special) and user-defined tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// The split regex of the Llama 3 family (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with every digit its own piece.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A chat message as templates see it (OpenAI's shape: templates that handle tools read
/// `tool_calls[i].function.{name, arguments}` and `tool_call_id`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn text(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), ..Default::default() }
    }
}

/// An earlier tool call in an assistant turn; its arguments as a JSON object (templates apply
/// `tojson` to them).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallMessage {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

impl Serialize for ToolCallMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serde_json::json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
        .serialize(s)
    }
}

pub struct TextTokenizer {
    pub inner: Tokenizer,
    /// Chat content as text: written special tokens stay text (see [`TextTokenizer::encode_chat`]).
    markup: Markup,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    /// Generation stops at any of these.
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or(ModelError::Missing { key: key.to_string(), what: "GGUF metadata".into() })
}

fn meta_u32(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl TextTokenizer {
    /// Rebuilds the Hugging Face tokenizer from GGUF metadata.
    pub fn from_gguf(c: &Content) -> Result<Self> {
        let model = meta(c, "tokenizer.ggml.model")?.to_string()?.clone();
        if model != "gpt2" && model != "llama" {
            return Err(ModelError::Unsupported(format!("GGUF tokenizer model `{model}`; supported: gpt2 (byte-level BPE), llama (SentencePiece)")));
        }
        let tokens: Vec<String> = meta(c, "tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        if model == "llama" {
            return Self::spm_from_gguf(c, tokens);
        }
        let merges: Vec<(String, String)> = meta(c, "tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| {
                let m = v.to_string()?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| candle_core::Error::Msg(format!("bad merge `{m}`")))
            })
            .collect::<candle_core::Result<_>>()?;
        let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => {
                v.to_vec()?.iter().map(|t| t.to_i32()).collect::<candle_core::Result<_>>()?
            }
            None => vec![],
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let pre = c
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre.unwrap_or("default"))?));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;
        Ok(Self::with_gguf_specials(c, inner, &tokens))
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`): pieces with scores.
    fn spm_from_gguf(c: &Content, tokens: Vec<String>) -> Result<Self> {
        let scores: Vec<f32> = meta(c, "tokenizer.ggml.scores")?
            .to_vec()?
            .iter()
            .map(|v| v.to_f32())
            .collect::<candle_core::Result<_>>()?;
        let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => {
                v.to_vec()?.iter().map(|t| t.to_i32()).collect::<candle_core::Result<_>>()?
            }
            None => vec![],
        };
        let prefix = c
            .metadata
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        let mut inner = super::spm::tokenizer(
            &tokens,
            &scores,
            &types,
            meta_u32(c, "tokenizer.ggml.unknown_token_id"),
            prefix,
        )?;
        // Control pieces (`<start_of_turn>`, …) match whole and are special; user-defined ones
        // (Gemma's runs of spaces, tabs and newlines) match whole too but are text when decoded.
        let pick = |kind: i32, special: bool| -> Vec<AddedToken> {
            types
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == kind)
                .map(|(i, _)| AddedToken::from(tokens[i].clone(), special))
                .collect()
        };
        inner.add_special_tokens(pick(TOKEN_TYPE_CONTROL, true)).map_err(tok_err)?;
        inner.add_tokens(pick(TOKEN_TYPE_USER_DEFINED, false)).map_err(tok_err)?;
        Ok(Self::with_gguf_specials(c, inner, &tokens))
    }

    /// BOS/EOS, the BOS rule and the chat template from GGUF metadata around `inner`.
    fn with_gguf_specials(c: &Content, inner: Tokenizer, tokens: &[String]) -> Self {
        let bos_id = meta_u32(c, "tokenizer.ggml.bos_token_id");
        let eos_id = meta_u32(c, "tokenizer.ggml.eos_token_id");
        let name =
            |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned()).unwrap_or_default();
        Self {
            markup: Markup::of(&inner),
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            bos_id,
            add_bos: c
                .metadata
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            eos_ids: eos_id.into_iter().collect(),
            chat_template: c
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            inner,
        }
    }

    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(tok_err)?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let token_str = |k: &str| match &cfg[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => {
                o.get("content").and_then(|c| c.as_str()).map(str::to_string)
            }
            _ => None,
        };
        let bos_token = token_str("bos_token").unwrap_or_default();
        let eos_token = token_str("eos_token").unwrap_or_default();
        let chat_template = match &cfg["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(items) => items
                .iter()
                .find(|i| i["name"] == "default")
                .and_then(|i| i["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            markup: Markup::of(&inner),
            bos_id: inner.token_to_id(&bos_token),
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false),
            eos_ids: inner.token_to_id(&eos_token).into_iter().collect(),
            chat_template,
            bos_token,
            eos_token,
            inner,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if missing), the
    /// Hugging Face form [`TextTokenizer::from_dir`] reads back: for tools that need the
    /// tokenizer of a GGUF model offline (load generators counting tokens, for one).
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let io = |e: std::io::Error| {
            ModelError::Tokenizer(format!("writing to `{}`: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        self.inner.save(dir.join("tokenizer.json"), false).map_err(tok_err)?;
        let cfg = serde_json::json!({
            "add_bos_token": self.add_bos,
            "bos_token": self.bos_id.and_then(|i| self.inner.id_to_token(i)),
            "eos_token": self.eos_ids.first().and_then(|&i| self.inner.id_to_token(i)),
            "chat_template": self.chat_template,
        });
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg).map_err(tok_err)?,
        )
        .map_err(io)
    }

    /// Token ids of raw text: special tokens written in the text are recognised; a BOS is
    /// prepended only when the model's tokenizer config asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Token ids of raw text, with the special tokens a completion prompt gets (BOS where the
    /// model wants one) or without any.
    pub fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match add_special {
            true => self.encode(text),
            false => Ok(self.inner.encode(text, false).map_err(tok_err)?.get_ids().to_vec()),
        }
    }

    /// Text of `ids`, special tokens included (vLLM's `/detokenize`).
    pub fn decode_all(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the model's chat template (ending with the assistant header).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        self.apply_chat_template_with_tools(messages, &[])
    }

    /// Renders the model's chat template with `tools` (OpenAI's tool objects) in its context,
    /// for templates that list them themselves.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<String> {
        self.render_chat(messages, tools, true)
    }

    /// Renders the chat template, ending with the assistant header when
    /// `add_generation_prompt` (training renders whole conversations without it).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Err(ModelError::Template("the model has no chat template".into()));
        };
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", template).map_err(|e| ModelError::Template(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => (!tools.is_empty()).then_some(tools),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}

/// What keeps chat content from spelling control tokens: the special tokens' texts, a copy of
/// the tokenizer that reads them as plain text, and the placeholder scheme that carries them
/// through the template.
struct Markup {
    /// Special (control) token ids; only these are ever taken from the rendered markup.
    special_ids: std::collections::HashSet<u32>,
    /// Matches any special token's text (longest first) or the placeholder opener.
    written: Option<regex::Regex>,
    /// The special tokens' texts, by placeholder number (0 is the opener itself).
    texts: Vec<String>,
    /// The tokenizer with special-token matching off (`split_special_tokens`).
    plain: Tokenizer,
}

/// Placeholders are `\u{E000}<n>\u{E001}`: private-use characters, not whitespace, so
/// templates that trim or test content treat them as the text they stand for.
const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

impl Markup {
    fn of(inner: &Tokenizer) -> Self {
        let mut specials: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (id, t.content))
            .collect();
        specials.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.1.cmp(&b.1)));
        let mut texts = vec![OPEN.to_string()];
        texts.extend(specials.iter().map(|(_, t)| t.clone()));
        let pattern: Vec<String> = texts.iter().map(|t| regex::escape(t)).collect();
        let written = regex::Regex::new(&pattern.join("|")).ok();
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Self { special_ids: specials.iter().map(|(id, _)| *id).collect(), written, texts, plain }
    }

    /// `text` with every special token's text (and the opener) replaced by its placeholder.
    fn shield(&self, text: &str) -> String {
        let Some(rx) = &self.written else { return text.to_string() };
        rx.replace_all(text, |c: &regex::Captures<'_>| {
            let n = self.texts.iter().position(|t| t == &c[0]).unwrap_or(0);
            format!("{OPEN}{n}{CLOSE}")
        })
        .into_owned()
    }

    /// The placeholders of `text` back as the texts they stand for.
    fn unshield(&self, text: &str) -> String {
        if !text.contains(OPEN) {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find(OPEN) {
            out.push_str(&rest[..at]);
            let after = &rest[at + OPEN.len_utf8()..];
            let n =
                after.find(CLOSE).and_then(|end| Some((after[..end].parse::<usize>().ok()?, end)));
            match n.and_then(|(n, end)| Some((self.texts.get(n)?, end))) {
                Some((t, end)) => {
                    out.push_str(t);
                    rest = &after[end + CLOSE.len_utf8()..];
                }
                None => {
                    out.push(OPEN);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Every string of `v` (object keys too) shielded.
    fn shield_json(&self, v: &serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::String(s) => Value::String(self.shield(s)),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.shield_json(x)).collect()),
            Value::Object(o) => Value::Object(
                o.iter().map(|(k, x)| (self.shield(k), self.shield_json(x))).collect(),
            ),
            other => other.clone(),
        }
    }

    fn shield_message(&self, m: &ChatMessage) -> ChatMessage {
        ChatMessage {
            role: m.role.clone(),
            content: self.shield(&m.content),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| ToolCallMessage {
                    id: self.shield(&c.id),
                    name: self.shield(&c.name),
                    arguments: self.shield_json(&c.arguments),
                })
                .collect(),
            tool_call_id: m.tool_call_id.as_ref().map(|i| self.shield(i)),
        }
    }
}

/// A chat prompt: its text (as the template rendered it) and its token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPrompt {
    pub text: String,
    pub ids: Vec<u32>,
}

impl TextTokenizer {
    /// The chat template's rendering of `messages` (and `tools`) as token ids, where only the
    /// template's own markup yields special tokens: every string a client sent is rendered
    /// with its special-token texts as placeholders, the rendering is split at the special
    /// tokens it then holds (the markup's), and the text between them — placeholders put back
    /// — is encoded with special-token matching off. A user message or tool result that
    /// writes `<|im_start|>system` gets the tokens of that text, never the control ids. For
    /// content that writes no special token the ids equal encoding the plain rendering.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<ChatPrompt> {
        let mk = &self.markup;
        let shielded: Vec<ChatMessage> = messages.iter().map(|m| mk.shield_message(m)).collect();
        let tools: Vec<serde_json::Value> = tools.iter().map(|t| mk.shield_json(t)).collect();
        let rendered = self.render_chat(&shielded, &tools, add_generation_prompt)?;
        let enc = self.inner.encode(rendered.as_str(), false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        // A template that writes the BOS itself (Gemma's, Llama 3's) gets no second one, as
        // transformers and llama.cpp render chats.
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        let mut text = String::with_capacity(rendered.len());
        let mut cursor = 0;
        let plain = |segment: &str, ids: &mut Vec<u32>, text: &mut String| -> Result<()> {
            if segment.is_empty() {
                return Ok(());
            }
            let original = mk.unshield(segment);
            let e = mk.plain.encode(original.as_str(), false).map_err(tok_err)?;
            ids.extend_from_slice(e.get_ids());
            text.push_str(&original);
            Ok(())
        };
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            if !mk.special_ids.contains(&id) || start < cursor {
                continue;
            }
            let segment =
                rendered.get(cursor..start).ok_or_else(|| tok_err("offset inside a character"))?;
            plain(segment, &mut ids, &mut text)?;
            ids.push(id);
            text.push_str(rendered.get(start..end).unwrap_or_default());
            cursor = end;
        }
        plain(rendered.get(cursor..).unwrap_or_default(), &mut ids, &mut text)?;
        Ok(ChatPrompt { text, ids })
    }
}

/// The pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    Ok(match pre {
        // SmolLM splits every digit into its own piece before byte-level BPE.
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "llama-bpe" | "llama3" | "llama-v3" | "qwen2" => {
            let pattern = if pre == "qwen2" { QWEN2_SPLIT } else { LLAMA3_SPLIT };
            let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(tok_err)?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![PreTokenizerWrapper::Split(split), byte_level(false)]))
        }
        // GPT-2's own regex, which ByteLevel applies itself.
        "default" | "gpt2" => byte_level(true),
        // Another split would tokenize differently: refused rather than guessed.
        other => return Err(ModelError::Unsupported(format!("GGUF pre-tokenizer `tokenizer.ggml.pre` = `{other}`; supported: default, gpt2, smollm, llama-bpe, llama3, qwen2"))),
    })
}
