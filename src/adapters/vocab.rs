//! An adapter's parts on the vocabulary layers, read from its PEFT file: LoRA on the embedding
//! (`lora_embedding_A` `(r, vocab)`, `lora_embedding_B` `(hidden, r)`) and on the output head
//! (`lora_A/B`), `modules_to_save` copies (`<module>.weight`), trainable tokens
//! (`<module>.token_adapter.trainable_tokens_delta`, the rows of the config's ids), and the copies
//! of the base layers PEFT's `save_embedding_layers` adds (`<module>.base_layer.weight`), which
//! must be this base model's. What they compute is `model::lora::vocab`'s.

use super::config::PeftConfig;
use super::loader::tensor_values;
use super::AdapterError;
use crate::model::lora::vocab::{LowRank, Rows, VocabAdapter, VocabLayer};
use crate::model::names::Role;
use crate::model::{DecoderConfig, FrozenProjections};
use candle_core::{Device, Tensor};
use safetensors::SafeTensors;
use std::collections::BTreeSet;

/// The head's module path (the same in every family loraplex serves).
pub const HEAD: &str = "lm_head";

/// Rows sampled when checking a saved copy of a base layer against the base model.
const CHECKED_ROWS: usize = 64;
/// The least cosine a sampled row of a saved base copy may have with the base model's row: a
/// 4-bit quantized base keeps > 0.99; another model's rows are near 0.
const MIN_COSINE: f64 = 0.98;

fn key(path: &str, rest: &str) -> String {
    format!("base_model.model.{path}.{rest}")
}

fn unsupported(msg: String) -> AdapterError {
    AdapterError::Unsupported(msg)
}

/// The embedding's module path for this model (`model.embed_tokens`, BLOOM's
/// `transformer.word_embeddings`).
pub fn embed_path(cfg: &DecoderConfig) -> String {
    Role::Embed.module_path(&cfg.arch)
}

/// The most bytes (as f64) the vocabulary parts of `config` can hold, for the header check.
pub fn max_bytes(config: &PeftConfig, cfg: &DecoderConfig) -> u64 {
    let (vocab, hidden) = (cfg.vocab_size as u64, cfg.hidden_size as u64);
    let embed = embed_path(cfg);
    let lora = |path: &str| match config.targets_vocab(path) {
        true => config.rank_alpha_module(path).0 as u64 * (vocab + hidden),
        false => 0,
    };
    let tokens: u64 = config.trainable_tokens.iter().map(|t| t.ids.len() as u64 * hidden).sum();
    let copies = (2 + config.modules_to_save.len() as u64) * vocab * hidden;
    (lora(&embed) + lora(HEAD) + tokens + copies) * 8
}

/// Reads the vocabulary parts `config` describes from `st`, recording the keys read in
/// `expected`. `base` (when given) checks PEFT's saved copies of the base layers.
pub fn read(
    st: &SafeTensors<'_>,
    config: &PeftConfig,
    cfg: &DecoderConfig,
    device: &Device,
    base: Option<&FrozenProjections>,
    expected: &mut BTreeSet<String>,
) -> Result<VocabAdapter, AdapterError> {
    let embed = embed_path(cfg);
    let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
    let mut out = VocabAdapter::default();
    let mut take = |k: String, shape: (usize, usize)| -> Result<Vec<f32>, AdapterError> {
        let v = tensor_values(st, &k, shape)?;
        expected.insert(k);
        Ok(v)
    };
    let host = |v: Vec<f32>, shape: (usize, usize)| -> Result<Tensor, AdapterError> {
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
    };
    if config.targets_vocab(&embed) {
        let (r, alpha) = config.rank_alpha_module(&embed);
        let a = take(key(&embed, "lora_embedding_A"), (r, vocab))?;
        let b = take(key(&embed, "lora_embedding_B"), (hidden, r))?;
        out.embed.lora = Some(LowRank {
            a_t: host(transpose(&a, r, vocab), (vocab, r))?,
            b_t: host(transpose(&b, hidden, r), (r, hidden))?,
            rank: r,
            scaling: crate::model::lora::weights::scaling(alpha, r, config.use_rslora),
        });
    }
    if config.targets_vocab(HEAD) {
        let (r, alpha) = config.rank_alpha_module(HEAD);
        let a = take(key(HEAD, "lora_A.weight"), (r, hidden))?;
        let b = take(key(HEAD, "lora_B.weight"), (vocab, r))?;
        out.head.lora = Some(LowRank {
            a_t: host(transpose(&a, r, hidden), (hidden, r))?,
            b_t: host(transpose(&b, vocab, r), (r, vocab))?,
            rank: r,
            scaling: crate::model::lora::weights::scaling(alpha, r, config.use_rslora),
        });
    }
    for (path, is_head) in [(embed.as_str(), false), (HEAD, true)] {
        let k = key(path, "base_layer.weight");
        if st.tensor(&k).is_ok() {
            let saved = take(k.clone(), (vocab, hidden))?;
            if let Some(base) = base {
                let mine = if is_head { base.head_f32() } else { base.embed_f32() };
                let mine = mine.map_err(|e| AdapterError::Weights(e.to_string()))?;
                check_copy(&k, &saved, &mine.flatten_all()?.to_vec1::<f32>()?, hidden)?;
            }
        }
    }
    for name in &config.modules_to_save {
        let list = super::config::ModuleSelector::List(vec![name.clone()]);
        let (path, layer) = if list.matches(&embed) {
            (embed.as_str(), &mut out.embed)
        } else if list.matches(HEAD) {
            (HEAD, &mut out.head)
        } else {
            return Err(unsupported(format!(
                "`modules_to_save` entry `{name}`: only the embedding (`{embed}`) and the output \
                 head (`{HEAD}`) can be served as saved modules"
            )));
        };
        let rows = take(key(path, "weight"), (vocab, hidden))?;
        set_rows(
            layer,
            path,
            Rows {
                ids: (0..vocab as u32).collect(),
                rows: host(rows, (vocab, hidden))?,
                all: true,
            },
        )?;
    }
    for t in &config.trainable_tokens {
        let name = t.module.clone().unwrap_or_else(|| embed.clone());
        let list = super::config::ModuleSelector::List(vec![name.clone()]);
        let is_head = if list.matches(&embed) {
            false
        } else if list.matches(HEAD) {
            if cfg.tie_word_embeddings {
                return Err(unsupported(format!(
                    "`trainable_token_indices.{name}`: this model's head is tied to its embedding, \
                     whose trainable tokens it shares"
                )));
            }
            true
        } else {
            return Err(unsupported(format!(
                "`trainable_token_indices` names `{name}`: only the embedding (`{embed}`) and the \
                 output head (`{HEAD}`) have token rows"
            )));
        };
        let path = if is_head { HEAD } else { embed.as_str() };
        let what = format!("trainable_token_indices for `{name}`");
        let rows = token_rows(&mut take, path, &t.ids, vocab, hidden, &what)?;
        let (ids, rows) = rows;
        let rows = Rows {
            ids,
            rows: host(rows.clone(), (rows.len() / hidden.max(1), hidden))?,
            all: false,
        };
        if !is_head && cfg.tie_word_embeddings {
            // PEFT ties the head's token rows to the embedding's on a tied model.
            set_rows(&mut out.head, HEAD, rows.clone())?;
        }
        set_rows(if is_head { &mut out.head } else { &mut out.embed }, path, rows)?;
    }
    if cfg.tie_word_embeddings && config.ensure_weight_tying && !out.is_empty() {
        return Err(unsupported(
            "`ensure_weight_tying: true` on a model whose head is tied to its embedding (the \
             adapter's embedding and head parts tied as well) is not supported"
                .into(),
        ));
    }
    for (layer, path) in [(&out.embed, embed.as_str()), (&out.head, HEAD)] {
        if layer.lora.is_some() && layer.rows.is_some() {
            return Err(unsupported(format!(
                "LoRA on `{path}` together with replaced rows of it (`modules_to_save` or \
                 trainable tokens): PEFT cannot apply both"
            )));
        }
    }
    Ok(out)
}

/// The trainable-token rows of `path` as `(sorted ids, rows in that order)`.
fn token_rows(
    take: &mut impl FnMut(String, (usize, usize)) -> Result<Vec<f32>, AdapterError>,
    path: &str,
    ids: &[u32],
    vocab: usize,
    hidden: usize,
    what: &str,
) -> Result<(Vec<u32>, Vec<f32>), AdapterError> {
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(AdapterError::ConfigJson(format!(
            "{what}: token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let unique: BTreeSet<u32> = ids.iter().copied().collect();
    if unique.len() != ids.len() || ids.is_empty() {
        return Err(AdapterError::ConfigJson(format!(
            "{what} must be distinct token ids, at least one"
        )));
    }
    let delta = take(key(path, "token_adapter.trainable_tokens_delta"), (ids.len(), hidden))?;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i]);
    let rows = order.iter().flat_map(|&i| delta[i * hidden..(i + 1) * hidden].iter().copied());
    Ok((order.iter().map(|&i| ids[i]).collect(), rows.collect()))
}

fn set_rows(layer: &mut VocabLayer, path: &str, rows: Rows) -> Result<(), AdapterError> {
    if layer.rows.is_some() {
        return Err(unsupported(format!(
            "`{path}` is both a saved module and has trainable tokens; PEFT keeps one of them"
        )));
    }
    layer.rows = Some(rows);
    Ok(())
}

/// `(rows, cols)` row-major → `(cols, rows)`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// A saved copy of a base layer must be this base model's (up to its quantization): sampled
/// rows' cosines against the base's rows.
fn check_copy(key: &str, saved: &[f32], base: &[f32], hidden: usize) -> Result<(), AdapterError> {
    let rows = saved.len() / hidden.max(1);
    if base.len() != saved.len() {
        return Err(AdapterError::Weights(format!(
            "tensor `{key}` has {rows} rows, the base model's layer has {}",
            base.len() / hidden.max(1)
        )));
    }
    let step = (rows / CHECKED_ROWS).max(1);
    for r in (0..rows).step_by(step) {
        let (a, b) = (&saved[r * hidden..(r + 1) * hidden], &base[r * hidden..(r + 1) * hidden]);
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        if na == 0.0 && nb == 0.0 {
            continue;
        }
        let cos = dot / (na * nb).max(f64::MIN_POSITIVE);
        if cos < MIN_COSINE {
            return Err(AdapterError::Unsupported(format!(
                "tensor `{key}` (PEFT's saved copy of the base layer) is not this base model's: \
                 row {r} has cosine {cos:.3} with the base's; the adapter was trained on another \
                 base (or a resized vocabulary)"
            )));
        }
    }
    Ok(())
}
