//! The trainable LoRA parameters: `A` (Kaiming-uniform, as PEFT initialises it) and `B`
//! (zeros) per targeted module, as candle `Var`s; views of them as a [`LoraAdapter`] for the
//! model's forward; and their PEFT-named export.

use crate::adapters::{AdapterError, PeftConfig};
use crate::model::lora::{LoraAdapter, LoraWeights};
use crate::model::{DecoderConfig, ModuleId};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

pub struct LoraParams {
    pub config: PeftConfig,
    /// `(module, A (r, in), B (out, r))`.
    pub modules: Vec<(ModuleId, Var, Var)>,
}

impl LoraParams {
    /// Fresh parameters: `A ~ U(±1/sqrt(in))` (PEFT's `kaiming_uniform_(a = sqrt(5))`), `B = 0`.
    pub fn init(
        cfg: &DecoderConfig,
        config: PeftConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut modules = Vec::new();
        for id in ModuleId::all(cfg.num_layers).filter(|id| config.targets(*id)) {
            let (r, _) = config.rank_alpha(id);
            let (fan_in, fan_out) = cfg.proj_dims(id.target);
            let bound = 1.0 / (fan_in as f32).sqrt();
            let a: Vec<f32> = (0..r * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
            let a = Var::from_vec(a, (r, fan_in), device)?;
            let b = Var::zeros((fan_out, r), DType::F32, device)?;
            modules.push((id, a, b));
        }
        Ok(Self { config, modules })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.modules.iter().flat_map(|(_, a, b)| [a.clone(), b.clone()]).collect()
    }

    /// An adapter whose A/B are the live `Var` tensors (gradients flow to them). Its
    /// pre-transposed copies are snapshots: use it only on the per-row/training path.
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
        for (id, a, b) in &self.modules {
            let (a, b): (Tensor, Tensor) = if detach {
                (a.as_tensor().detach().copy()?, b.as_tensor().detach().copy()?)
            } else {
                (a.as_tensor().clone(), b.as_tensor().clone())
            };
            let (_, alpha) = self.config.rank_alpha(*id);
            modules[id.index()] = Some(LoraWeights::new(a, b, alpha, self.config.use_rslora)?);
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

    /// `(module, A, B)` detached, for writing the PEFT file.
    pub fn export(&self) -> Result<Vec<(ModuleId, Tensor, Tensor)>> {
        self.modules
            .iter()
            .map(|(id, a, b)| {
                Ok((*id, a.as_tensor().detach().copy()?, b.as_tensor().detach().copy()?))
            })
            .collect()
    }
}
