//! The trainable LoRA parameters: `A` (Kaiming-uniform, as PEFT initialises it) and `B`
//! (zeros) per targeted *stored* module, as candle `Var`s — one pair for a fused projection
//! (Phi-3's `qkv_proj`, BLOOM's `query_key_value`), whose parts share `A` and take their rows
//! of `B`, as PEFT computes it and as serving loads it; views of them as a [`LoraAdapter`] for
//! the model's forward; and their PEFT-named export.

use crate::adapters::{AdapterError, PeftConfig};
use crate::model::lora::{LoraAdapter, LoraWeights};
use crate::model::{DecoderConfig, ModuleId};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

pub struct LoraParams {
    pub config: PeftConfig,
    /// `(stored module path, A (r, in), B (stored out, r))`.
    pub modules: Vec<(String, Var, Var)>,
    /// Per entry of `modules`: the projections it feeds, with their rows of `B`.
    parts: Vec<Vec<(ModuleId, Vec<usize>)>>,
}

/// Refuses a `target_modules` entry that names no linear layer of this architecture (it
/// would train nothing), naming the modules it has.
pub fn check_targets(cfg: &DecoderConfig, config: &PeftConfig) -> std::result::Result<(), String> {
    let mut paths: Vec<String> = cfg.projections().map(|id| cfg.stored_module(id).path).collect();
    paths.dedup();
    let unknown = config.unknown_among(&paths);
    if unknown.is_empty() {
        return Ok(());
    }
    let mut names: Vec<&str> = paths.iter().filter_map(|p| p.rsplit('.').next()).collect();
    names.sort();
    names.dedup();
    Err(format!(
        "`target_modules` {unknown:?} name no linear layer of this `{}` model; its modules are {names:?}",
        cfg.arch.name
    ))
}

impl LoraParams {
    /// Fresh parameters: `A ~ U(±1/sqrt(in))` (PEFT's `kaiming_uniform_(a = sqrt(5))`), `B = 0`.
    pub fn init(
        cfg: &DecoderConfig,
        config: PeftConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        check_targets(cfg, &config).map_err(candle_core::Error::Msg)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut modules, mut parts): (Vec<(String, Var, Var)>, Vec<Vec<_>>) = Default::default();
        for id in cfg.projections() {
            let m = cfg.stored_module(id);
            if !config.targets_module(&m.path, id.layer) {
                continue;
            }
            if let Some(k) = modules.iter().position(|(p, _, _)| *p == m.path) {
                parts[k].push((id, m.rows));
                continue;
            }
            let (r, _) = config.rank_alpha_module(&m.path);
            let fan_in = cfg.proj_dims(id.target).0;
            let bound = 1.0 / (fan_in as f32).sqrt();
            let a: Vec<f32> = (0..r * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
            let a = Var::from_vec(a, (r, fan_in), device)?;
            let b = Var::zeros((m.out, r), DType::F32, device)?;
            modules.push((m.path, a, b));
            parts.push(vec![(id, m.rows)]);
        }
        Ok(Self { config, modules, parts })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.modules.iter().flat_map(|(_, a, b)| [a.clone(), b.clone()]).collect()
    }

    /// An adapter whose A/B are the live `Var` tensors (gradients flow to them). A fused
    /// module's `B` parts are row selections computed now, and its pre-transposed copies are
    /// snapshots: view it again after each update, and use it only on the training path.
    pub fn as_adapter(
        &self,
        cfg: &DecoderConfig,
        name: &str,
    ) -> std::result::Result<LoraAdapter, AdapterError> {
        self.snapshot(cfg, name, false)
    }

    /// A detached copy, for evaluation with the batched path.
    pub fn detached_adapter(
        &self,
        cfg: &DecoderConfig,
        name: &str,
    ) -> std::result::Result<LoraAdapter, AdapterError> {
        self.snapshot(cfg, name, true)
    }

    fn snapshot(
        &self,
        cfg: &DecoderConfig,
        name: &str,
        detach: bool,
    ) -> std::result::Result<LoraAdapter, AdapterError> {
        let mut modules = vec![None; ModuleId::count(cfg.num_layers)];
        for ((path, a, b), parts) in self.modules.iter().zip(&self.parts) {
            let (a, b): (Tensor, Tensor) = if detach {
                (a.as_tensor().detach().copy()?, b.as_tensor().detach().copy()?)
            } else {
                (a.as_tensor().clone(), b.as_tensor().clone())
            };
            let (_, alpha) = self.config.rank_alpha_module(path);
            for (id, rows) in parts {
                // Row selection is differentiable: each part's gradient lands in its rows.
                let b = crate::model::select_rows(&b, rows)?;
                let w = LoraWeights::new(a.clone(), b, alpha, self.config.use_rslora)?;
                modules[id.index()] = Some(w);
            }
        }
        let size_bytes = modules.iter().flatten().map(LoraWeights::resident_bytes).sum();
        Ok(LoraAdapter {
            name: name.into(),
            path: Default::default(),
            rank: self.config.r,
            alpha: self.config.lora_alpha,
            modules,
            size_bytes,
            version: 0,
        })
    }

    /// `(stored module path, A, B)` detached, for writing the PEFT file.
    pub fn export(&self) -> Result<Vec<(String, Tensor, Tensor)>> {
        self.modules
            .iter()
            .map(|(path, a, b)| {
                Ok((path.clone(), a.as_tensor().detach().copy()?, b.as_tensor().detach().copy()?))
            })
            .collect()
    }
}
