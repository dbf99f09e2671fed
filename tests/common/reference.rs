//! Reading the reference outputs (`case_NN.safetensors` of `../shared/reference` and
//! `../shared/reference/archs/*`) and computing what they are compared with: all-position
//! logits of a ragged prefill, and greedy continuations through the engine's generate loop.

use candle_core::{Device, Tensor};
use loraplex::adapters::{load_adapter, AdapterMix, MixEntry};
use loraplex::engine::{LoraPath, Request};
use loraplex::generate::generate;
use loraplex::model::load::LoadedModel;
use loraplex::model::{BatchInput, Decoder, SeqCache, StepLora};
use safetensors::SafeTensors;
use std::path::Path;
use std::sync::Arc;

/// A reference case's mix (`case["adapters"]`: names and weights), its adapters loaded from
/// `adapters_dir` for `m`.
pub fn mix_for(case: &serde_json::Value, adapters_dir: &Path, m: &LoadedModel) -> AdapterMix {
    let entries = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let name = a["name"].as_str().unwrap();
            let adapter =
                load_adapter(&adapters_dir.join(name), name, &m.model.cfg, &Device::Cpu).unwrap();
            MixEntry { adapter: Arc::new(adapter), scale: a["weight"].as_f64().unwrap() }
        })
        .collect();
    AdapterMix::new(entries)
}

pub struct RefFile(Vec<u8>);

impl RefFile {
    pub fn open(path: &Path) -> Self {
        Self(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }
    pub fn floats(&self, key: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        st.tensor(key)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    pub fn ints(&self, key: &str) -> Vec<u32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        st.tensor(key)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
            .collect()
    }
}

/// All-position logits of every prompt, prefilled together in one ragged batch.
pub fn prefill_logits(
    model: &Decoder,
    prompts: &[Vec<u32>],
    mix: &AdapterMix,
    path: LoraPath,
) -> Vec<Tensor> {
    let mixes: Vec<&AdapterMix> = prompts.iter().map(|_| mix).collect();
    let lora = match path {
        LoraPath::Batched => {
            StepLora::batched(&mixes, model.cfg.num_layers, model.dtype(), model.device()).unwrap()
        }
        LoraPath::PerRow => StepLora::per_row(&mixes),
    };
    prefill_with(model, prompts, &lora)
}

/// All-position logits of every prompt, prefilled together with the step operands `lora`.
pub fn prefill_with(model: &Decoder, prompts: &[Vec<u32>], lora: &StepLora) -> Vec<Tensor> {
    let mut input = BatchInput::default();
    prompts.iter().for_each(|p| input.push(p));
    let mut caches: Vec<SeqCache> =
        prompts.iter().map(|p| SeqCache::new(model.cfg.num_layers, p.len())).collect();
    let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
    let seqs: Vec<usize> =
        prompts.iter().enumerate().flat_map(|(i, p)| std::iter::repeat_n(i, p.len())).collect();
    let hidden = model.forward(&input, Some(&mut refs), lora).unwrap();
    let logits = model.logits_for(&hidden, &seqs, lora).unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    for p in prompts {
        out.push(logits.narrow(0, offset, p.len()).unwrap());
        offset += p.len();
    }
    out
}

pub fn greedy(
    m: &LoadedModel,
    prompts: &[Vec<u32>],
    mix: &AdapterMix,
    path: LoraPath,
    n: usize,
) -> Vec<Vec<u32>> {
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request { stop_at_eos: false, ..Request::greedy(p.clone(), mix.clone(), n) })
        .collect();
    generate(&m.model, &m.tokenizer, &reqs, path).unwrap().into_iter().map(|o| o.ids).collect()
}

/// Per prompt of `names`: the max |Δ| of the last-position logits against the reference's
/// full ones, and of the reference's top-20 logits at every position.
pub fn logit_diffs(rf: &RefFile, names: &[&str], ours: &[Tensor]) -> Vec<(f32, f32)> {
    names
        .iter()
        .zip(ours)
        .map(|(p, ours)| {
            let t = ours.dim(0).unwrap();
            let last = Tensor::new(rf.floats(&format!("{p}.last_logits")), &Device::Cpu).unwrap();
            let d_last = super::max_abs_diff(&ours.get(t - 1).unwrap(), &last);
            let ids = rf.ints(&format!("{p}.topk_ids"));
            let want = rf.floats(&format!("{p}.topk_logits"));
            let ours = ours.to_vec2::<f32>().unwrap();
            let d_all = ids
                .iter()
                .zip(&want)
                .enumerate()
                .map(|(i, (&id, &w))| (ours[i / 20][id as usize] - w).abs())
                .fold(0f32, f32::max);
            (d_last, d_all)
        })
        .collect()
}
