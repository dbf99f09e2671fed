//! OpenAI wire types (serde) for completions, chat completions and their stream chunks, plus
//! loraplex's `adapters` extension. Only the edge uses these; the core never sees them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One entry of the `adapters` extension: `{"name": "squad", "scale": 0.7}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterRef {
    pub name: String,
    pub scale: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (vLLM and others accept it too).
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<StringOrList>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub user: Option<String>,
    /// Extension: keep generating past EOS (benchmarks want fixed output lengths).
    pub ignore_eos: Option<bool>,
    pub adapters: Option<Vec<AdapterRef>>,
    /// OpenAI: token id (as a string) → bias from -100 to 100.
    pub logit_bias: Option<Value>,
    /// vLLM's sampling extensions.
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Vec<Value>>,
    /// OpenAI's structured outputs (`text`, `json_object`, `json_schema`).
    pub response_format: Option<Value>,
    /// vLLM's structured outputs (`json`, `regex`, `choice`, `grammar`, `json_object`).
    pub structured_outputs: Option<Value>,
    /// vLLM's `prompt_logprobs`: the prompt tokens' log-probabilities with this many top
    /// alternatives each.
    pub prompt_logprobs: Option<i64>,
}

/// A completion's `prompt` as OpenAI's spec allows it: text, texts, token ids, or lists of
/// token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids or a list of lists of token ids"
)]
pub enum PromptInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<PromptInput>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub common: CommonParams,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    /// An assistant turn's calls.
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Clone, Deserialize)]
pub struct WireToolCall {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: WireFunctionCall,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WireFunctionCall {
    pub name: String,
    /// A JSON object, as a string (OpenAI's wire).
    pub arguments: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Vec<WireMessage>>,
    /// Function tools (checked in `api::tools`).
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonParams,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Which adapter versions a response used (loraplex extension).
#[derive(Debug, Clone, Serialize)]
pub struct AppliedAdapter {
    pub name: String,
    pub version: u64,
    pub scale: f64,
}

/// OpenAI's legacy `logprobs`; with `echo` the prompt's tokens lead, the first with `null`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM's `prompt_logprobs` (asked for by that field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<Map<String, Value>>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    /// Always `null` (no refusal tokens).
    pub refusal: (),
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// `null` when the answer is only tool calls.
    pub content: Option<String>,
    /// Always `null`: the model does not refuse (OpenAI's field, required by its spec).
    pub refusal: (),
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// A call the model made: `arguments` is its JSON object as a string (OpenAI's wire).
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    /// Streamed deltas number their calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionOut {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A completion response or stream chunk (`object` tells which).
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapters: Option<Vec<AppliedAdapter>>,
    /// vLLM's `prompt_logprobs` of a chat request (the prompt is every choice's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<Map<String, Value>>>>,
}
