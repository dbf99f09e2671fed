//! `adapter_config.json`: parsed once into a typed [`PeftConfig`], with every field that would
//! change the maths but that we cannot honour rejected by name (never silently ignored).

use super::AdapterError;
use crate::model::ModuleId;
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// A regex from the config, compiled once when the config is read (it is matched against
/// every module name of the model on each load), compared and shown by its source.
#[derive(Clone)]
pub struct Pattern {
    pub source: String,
    re: Regex,
}

impl Pattern {
    /// `source` compiled inside `wrap` (the anchoring PEFT applies to it).
    fn new(source: &str, wrap: impl Fn(&str) -> String, what: &str) -> Result<Self, AdapterError> {
        let re = Regex::new(&wrap(source))
            .map_err(|e| bad(format!("{what} `{source}` is not a valid regex: {e}")))?;
        Ok(Self { source: source.to_string(), re })
    }

    /// A `rank_pattern` / `alpha_pattern` key that selects exactly the module at `path`.
    pub fn module(path: &str) -> Result<Self, AdapterError> {
        Self::new(&regex::escape(path), pattern_key, "module path")
    }

    pub fn is_match(&self, name: &str) -> bool {
        self.re.is_match(name)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

/// `target_modules` / `exclude_modules` as PEFT accepts them.
#[derive(Debug, Clone, PartialEq)]
pub enum ModuleSelector {
    /// Names that match exactly or as a `.`-separated suffix.
    List(Vec<String>),
    /// A regex that must match the whole module name.
    Regex(Pattern),
    /// Every linear layer except the output head.
    AllLinear,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<Value>,
    lora_alpha: Option<Value>,
    #[serde(default)]
    use_rslora: Option<bool>,
    target_modules: Option<Value>,
    exclude_modules: Option<Value>,
    #[serde(default)]
    rank_pattern: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, Value>>,
    layers_to_transform: Option<Value>,
    layers_pattern: Option<Value>,
    #[serde(default)]
    fan_in_fan_out: Option<bool>,
    #[serde(default)]
    use_dora: Option<bool>,
    modules_to_save: Option<Value>,
    #[serde(default)]
    lora_bias: Option<bool>,
    bias: Option<String>,
    lora_dropout: Option<f64>,
    base_model_name_or_path: Option<String>,
    task_type: Option<String>,
    layer_replication: Option<Value>,
    target_parameters: Option<Value>,
    trainable_token_indices: Option<Value>,
    alora_invocation_tokens: Option<Value>,
    #[serde(default)]
    use_qalora: Option<bool>,
    use_bdlora: Option<Value>,
    velora_config: Option<Value>,
    monteclora_config: Option<Value>,
    arrow_config: Option<Value>,
    kasa_config: Option<Value>,
    init_lora_weights: Option<Value>,
    #[serde(default)]
    ensure_weight_tying: Option<bool>,
}

/// Rows of a vocabulary layer an adapter trains in place of the base's
/// (`trainable_token_indices`): `module` as the config names it (`None`: the embedding).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainableTokens {
    pub module: Option<String>,
    pub ids: Vec<u32>,
}

/// A validated PEFT LoRA config.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// DoRA (`use_dora`): each module also has a magnitude vector ([`crate::model::lora::dora`]).
    pub use_dora: bool,
    pub target_modules: ModuleSelector,
    pub exclude_modules: Option<ModuleSelector>,
    /// PEFT's rule: key `k` applies to module `n` when `(.*\.)?(k)$` matches `n` from its start.
    pub rank_pattern: Vec<(Pattern, usize)>,
    pub alpha_pattern: Vec<(Pattern, f64)>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub fan_in_fan_out: bool,
    pub lora_dropout: f64,
    pub base_model_name_or_path: Option<String>,
    pub task_type: Option<String>,
    /// Modules the adapter holds a whole trained copy of (`modules_to_save`).
    pub modules_to_save: Vec<String>,
    /// `trainable_token_indices`.
    pub trainable_tokens: Vec<TrainableTokens>,
    /// PEFT's `ensure_weight_tying`: adapters on a tied embedding and head kept tied.
    pub ensure_weight_tying: bool,
}

fn unsupported(msg: impl Into<String>) -> AdapterError {
    AdapterError::Unsupported(msg.into())
}

fn bad(msg: impl Into<String>) -> AdapterError {
    AdapterError::ConfigJson(msg.into())
}

fn is_set(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

fn positive_int(v: &Value, what: &str) -> Result<usize, AdapterError> {
    match v.as_u64() {
        Some(n) if n > 0 && n <= 1 << 16 => Ok(n as usize),
        _ => Err(bad(format!("`{what}` must be a positive integer, got `{v}`"))),
    }
}

/// A number the LoRA delta computes with in f32 (the scaling `alpha / r` and each request's
/// `scale · alpha / r`): it must be finite *as an f32*, where `1e300` is infinite.
fn f32_number(v: &Value, what: &str) -> Result<f64, AdapterError> {
    match v.as_f64() {
        Some(x) if (x as f32).is_finite() => Ok(x),
        _ => Err(bad(format!(
            "`{what}` must be a finite number within the 32-bit float range (±3.4e38), got `{v}`"
        ))),
    }
}

fn selector(v: &Value, what: &str) -> Result<ModuleSelector, AdapterError> {
    match v {
        Value::String(s) if s == "all-linear" => Ok(ModuleSelector::AllLinear),
        Value::String(s) => Ok(ModuleSelector::Regex(Pattern::new(
            s,
            |s| format!("^(?:{s})$"),
            &format!("`{what}`"),
        )?)),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("`{what}` entries must be strings")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(ModuleSelector::List),
        other => Err(bad(format!("`{what}` must be a list or a string, got `{other}`"))),
    }
}

impl ModuleSelector {
    /// Whether a full module name (e.g. `model.layers.0.self_attn.q_proj`) is selected.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            ModuleSelector::AllLinear => name != "lm_head" && !name.ends_with("embed_tokens"),
            ModuleSelector::List(items) => {
                items.iter().any(|t| name == t || name.ends_with(&format!(".{t}")))
            }
            ModuleSelector::Regex(re) => re.is_match(name),
        }
    }
}

/// `trainable_token_indices`: a list (the embedding's rows) or `{module: [ids]}`.
fn trainable_tokens(v: Option<&Value>) -> Result<Vec<TrainableTokens>, AdapterError> {
    let ids = |v: &Value, what: &str| -> Result<Vec<u32>, AdapterError> {
        let Value::Array(items) = v else {
            return Err(bad(format!("`{what}` must be a list of token ids, got `{v}`")));
        };
        items
            .iter()
            .map(|i| match i.as_u64() {
                Some(n) if n <= u32::MAX as u64 => Ok(n as u32),
                _ => Err(bad(format!("`{what}` entries must be token ids, got `{i}`"))),
            })
            .collect()
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                Ok(TrainableTokens {
                    module: Some(k.clone()),
                    ids: ids(v, &format!("trainable_token_indices.{k}"))?,
                })
            })
            .collect(),
        Some(v) => {
            Ok(vec![TrainableTokens { module: None, ids: ids(v, "trainable_token_indices")? }])
        }
    }
}

/// PEFT's pattern rule as a regex around a `rank_pattern` / `alpha_pattern` key.
fn pattern_key(key: &str) -> String {
    format!("^(?:.*\\.)?(?:{key})$")
}

impl PeftConfig {
    pub fn from_json(text: &str) -> Result<Self, AdapterError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, AdapterError> {
        match raw.peft_type.as_deref() {
            Some("LORA") => {}
            Some(other) => {
                return Err(unsupported(format!(
                    "`peft_type` is `{other}`; only `LORA` is supported"
                )))
            }
            None => return Err(bad("missing `peft_type`")),
        }
        let modules_to_save = match &raw.modules_to_save {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("`modules_to_save` entries must be strings"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(bad(format!("`modules_to_save` must be a list, got `{other}`")))
            }
        };
        let trainable_tokens = trainable_tokens(raw.trainable_token_indices.as_ref())?;
        if let Some(Value::String(init)) = &raw.init_lora_weights {
            // These initialisations rewrite the base weights (a residual after the adapter's
            // share, or a quantized copy): unless PEFT converted the adapter when saving (which
            // resets the field), it needs a base model other than this one.
            let rewrites =
                init.starts_with("pissa") || ["olora", "corda", "loftq"].contains(&init.as_str());
            if rewrites {
                return Err(unsupported(format!(
                    "`init_lora_weights: {init}` changes the base weights the adapter was \
                     trained against; save it with PEFT's `path_initial_model_for_weight_conversion` \
                     to get a plain LoRA"
                )));
            }
        }
        if raw.lora_bias == Some(true) {
            return Err(unsupported(
                "`lora_bias: true` (a trained bias on lora_B) is not supported",
            ));
        }
        if let Some(b) = raw.bias.as_deref().filter(|b| *b != "none") {
            return Err(unsupported(format!(
                "`bias: {b}` (trained biases) is not supported; expected `none`"
            )));
        }
        for (field, v) in [
            ("layer_replication", &raw.layer_replication),
            ("target_parameters", &raw.target_parameters),
            ("alora_invocation_tokens", &raw.alora_invocation_tokens),
            ("use_bdlora", &raw.use_bdlora),
            ("velora_config", &raw.velora_config),
            ("monteclora_config", &raw.monteclora_config),
            ("arrow_config", &raw.arrow_config),
            ("kasa_config", &raw.kasa_config),
        ] {
            if is_set(v) {
                return Err(unsupported(format!(
                    "`{field}` is set; it changes the maths and is not supported"
                )));
            }
        }
        if raw.use_qalora == Some(true) {
            return Err(unsupported("`use_qalora: true` is not supported"));
        }
        let r = positive_int(raw.r.as_ref().ok_or_else(|| bad("missing `r`"))?, "r")?;
        let lora_alpha = match &raw.lora_alpha {
            Some(v) => f32_number(v, "lora_alpha")?,
            None => 8.0, // PEFT's default
        };
        let target_modules = selector(
            raw.target_modules.as_ref().ok_or_else(|| bad("missing `target_modules`"))?,
            "target_modules",
        )?;
        let exclude_modules = match &raw.exclude_modules {
            None | Some(Value::Null) => None,
            Some(v) => Some(selector(v, "exclude_modules")?),
        };
        let rank_pattern = raw
            .rank_pattern
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| {
                Ok((
                    Pattern::new(k, pattern_key, "pattern key")?,
                    positive_int(v, &format!("rank_pattern.{k}"))?,
                ))
            })
            .collect::<Result<Vec<_>, AdapterError>>()?;
        let alpha_pattern = raw
            .alpha_pattern
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| {
                Ok((
                    Pattern::new(k, pattern_key, "pattern key")?,
                    f32_number(v, &format!("alpha_pattern.{k}"))?,
                ))
            })
            .collect::<Result<Vec<_>, AdapterError>>()?;
        let layers_to_transform = match &raw.layers_to_transform {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| bad("`layers_to_transform` must be non-negative"))?
                as usize]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| {
                        i.as_u64().map(|n| n as usize).ok_or_else(|| {
                            bad("`layers_to_transform` entries must be non-negative integers")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(other) => {
                return Err(bad(format!(
                    "`layers_to_transform` must be an integer or a list, got `{other}`"
                )))
            }
        };
        if is_set(&raw.layers_pattern)
            && !matches!(&raw.layers_pattern, Some(Value::String(s)) if s == "layers")
            && !matches!(&raw.layers_pattern, Some(Value::Array(a)) if a.iter().all(|x| x == "layers"))
        {
            return Err(unsupported(
                "`layers_pattern` other than `layers` does not fit a Llama model",
            ));
        }
        let dropout = raw.lora_dropout.unwrap_or(0.0);
        if !(0.0..1.0).contains(&dropout) {
            return Err(bad(format!("`lora_dropout` must be in [0, 1), got `{dropout}`")));
        }
        Ok(Self {
            r,
            lora_alpha,
            use_rslora: raw.use_rslora.unwrap_or(false),
            use_dora: raw.use_dora.unwrap_or(false),
            target_modules,
            exclude_modules,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            // PEFT resets fan_in_fan_out to false for torch.nn.Linear targets (every Llama
            // projection), so the saved A/B have the standard shapes either way.
            fan_in_fan_out: raw.fan_in_fan_out.unwrap_or(false),
            lora_dropout: dropout,
            base_model_name_or_path: raw.base_model_name_or_path,
            task_type: raw.task_type,
            modules_to_save,
            trainable_tokens,
            ensure_weight_tying: raw.ensure_weight_tying.unwrap_or(false),
        })
    }

    /// Whether the module at `path`, which has no layer index (the embedding, the head), is a
    /// LoRA target: PEFT's `layers_to_transform` selects only modules inside a layer.
    pub fn targets_vocab(&self, path: &str) -> bool {
        self.target_modules != ModuleSelector::AllLinear
            && self.target_modules.matches(path)
            && !self.exclude_modules.as_ref().is_some_and(|e| e.matches(path))
            && self.layers_to_transform.is_none()
    }

    /// Whether `modules_to_save` names the module at `path` (exactly or as a suffix, as PEFT
    /// matches it).
    pub fn saves_module(&self, path: &str) -> bool {
        ModuleSelector::List(self.modules_to_save.clone()).matches(path)
    }

    /// Whether the config changes the embedding or the output head at all.
    pub fn touches_vocab(&self, embed_path: &str) -> bool {
        self.targets_vocab(embed_path)
            || self.targets_vocab("lm_head")
            || !self.modules_to_save.is_empty()
            || !self.trainable_tokens.is_empty()
    }

    /// Whether the adapter targets this module (target list/regex, exclusions, layer filter).
    pub fn targets(&self, id: ModuleId) -> bool {
        self.targets_module(&id.to_string(), id.layer)
    }

    /// Whether the module at full path `name` (in layer `layer`) is adapted.
    pub fn targets_module(&self, name: &str, layer: usize) -> bool {
        self.target_modules.matches(name)
            && !self.exclude_modules.as_ref().is_some_and(|e| e.matches(name))
            && self.layers_to_transform.as_ref().is_none_or(|ls| ls.contains(&layer))
    }

    /// `(r, alpha)` for a module after `rank_pattern` / `alpha_pattern` (first match wins).
    pub fn rank_alpha(&self, id: ModuleId) -> (usize, f64) {
        self.rank_alpha_module(&id.to_string())
    }

    /// [`PeftConfig::rank_alpha`] by the module's full path.
    pub fn rank_alpha_module(&self, name: &str) -> (usize, f64) {
        let r = self.rank_pattern.iter().find(|(k, _)| k.is_match(name)).map_or(self.r, |p| p.1);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| k.is_match(name))
            .map_or(self.lora_alpha, |p| p.1);
        (r, alpha)
    }

    /// List entries that name no projection of a model with `num_layers` layers (PEFT refuses
    /// a config whose targets match nothing, and a typo would otherwise load as a no-op).
    pub fn unknown_list_targets(&self, num_layers: usize) -> Vec<String> {
        let names: Vec<String> = ModuleId::all(num_layers).map(|m| m.to_string()).collect();
        self.unknown_among(&names)
    }

    /// List entries that match none of the module paths `names`.
    pub fn unknown_among(&self, names: &[String]) -> Vec<String> {
        let ModuleSelector::List(items) = &self.target_modules else {
            return Vec::new();
        };
        items
            .iter()
            .filter(|t| !names.iter().any(|n| ModuleSelector::List(vec![(*t).clone()]).matches(n)))
            .cloned()
            .collect()
    }

    /// The JSON object PEFT writes for this config (used by the trainer).
    pub fn to_peft_json(&self) -> Value {
        let targets = match &self.target_modules {
            ModuleSelector::List(items) => Value::from(items.clone()),
            ModuleSelector::Regex(r) => Value::from(r.source.clone()),
            ModuleSelector::AllLinear => Value::from("all-linear"),
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": self.task_type.clone().unwrap_or_else(|| "CAUSAL_LM".into()),
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": targets,
            "lora_dropout": self.lora_dropout,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": self.use_dora,
            "lora_bias": false,
            "modules_to_save": (!self.modules_to_save.is_empty()).then(|| self.modules_to_save.clone()),
            "layers_to_transform": self.layers_to_transform,
            "rank_pattern": self.rank_pattern.iter().map(|(k, v)| (k.source.clone(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            "alpha_pattern": self.alpha_pattern.iter().map(|(k, v)| (k.source.clone(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "init_lora_weights": true,
        })
    }
}
