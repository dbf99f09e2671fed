//! The trainable LoRA parameters: `A` (Kaiming-uniform, as PEFT initialises it) and `B`
//! (zeros) per targeted *stored* module, as candle `Var`s — one pair for a fused projection
//! (Phi-3's `qkv_proj`, BLOOM's `query_key_value`), whose parts share `A` and take their rows
//! of `B`, as PEFT computes it and as serving loads it; with DoRA (`use_dora`) a magnitude per
//! stored module, initialised as PEFT does to the row norms of the base weight; views of them
//! as a [`LoraAdapter`] for the model's forward; and their PEFT-named export.

use crate::adapters::{AdapterError, PeftConfig};
use crate::model::lora::{DoraRows, LoraAdapter, LoraWeights};
use crate::model::{DecoderConfig, FrozenProjections, ModuleId};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

pub struct LoraParams {
    pub config: PeftConfig,
    /// `(stored module path, A (r, in), B (stored out, r))`.
    pub modules: Vec<(String, Var, Var)>,
    /// Per entry of `modules`, with DoRA: its magnitude `(stored out)`.
    pub magnitudes: Vec<Option<Var>>,
    /// Per entry of `modules`: the projections it feeds, with their rows of `B`.
    parts: Vec<Vec<(ModuleId, Vec<usize>)>>,
    /// The base weights DoRA's norms are taken against (DoRA only).
    base: Option<FrozenProjections>,
}

/// Refuses a `target_modules` entry that names no linear layer of this architecture (it
/// would train nothing), naming the modules it has.
pub fn check_targets(cfg: &DecoderConfig, config: &PeftConfig) -> std::result::Result<(), String> {
    let embed = crate::adapters::vocab::embed_path(cfg);
    if config.touches_vocab(&embed) {
        return Err(format!(
            "training the embedding or the output head (LoRA on `{embed}` or `lm_head`, \
             `modules_to_save`, `trainable_token_indices`) is not supported; loraplex serves \
             such adapters but trains the linear layers only"
        ));
    }
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
        Self::init_on(cfg, config, seed, device, None)
    }

    /// [`LoraParams::init`] for the model with frozen projections `base`, which a DoRA config
    /// needs (its magnitudes start at `||W||` per row, PEFT's init with `B = 0`).
    pub fn init_on(
        cfg: &DecoderConfig,
        config: PeftConfig,
        seed: u64,
        device: &Device,
        base: Option<&FrozenProjections>,
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
        let mut magnitudes = Vec::with_capacity(modules.len());
        for ((_, _, b), parts) in modules.iter().zip(&parts) {
            if !config.use_dora {
                magnitudes.push(None);
                continue;
            }
            let Some(base) = base else {
                candle_core::bail!("`use_dora` needs the base model's weights for the magnitudes");
            };
            let mut mag = vec![0f32; b.dim(0)?];
            for (id, rows) in parts {
                let w = base.dense_f32(*id).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let w =
                    w.ok_or_else(|| candle_core::Error::Msg(format!("no `{id}` in the base")))?;
                let norms: Vec<f32> = w.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
                rows.iter().zip(norms).for_each(|(&r, n)| mag[r] = n);
            }
            let n = mag.len();
            magnitudes.push(Some(Var::from_vec(mag, n, device)?));
        }
        Ok(Self { config, modules, magnitudes, parts, base: base.cloned() })
    }

    /// The trainable tensors: each module's `A` and `B`, then the DoRA magnitudes (after
    /// every pair, so a plain adapter's checkpoint layout is what it always was).
    pub fn vars(&self) -> Vec<Var> {
        let pairs = self.modules.iter().flat_map(|(_, a, b)| [a.clone(), b.clone()]);
        pairs.chain(self.magnitudes.iter().flatten().cloned()).collect()
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
        let live = |v: &Var| -> Result<Tensor> {
            match detach {
                true => v.as_tensor().detach().copy(),
                false => Ok(v.as_tensor().clone()),
            }
        };
        for (((path, a, b), parts), mag) in
            self.modules.iter().zip(&self.parts).zip(&self.magnitudes)
        {
            let (a, b) = (live(a)?, live(b)?);
            let (_, alpha) = self.config.rank_alpha_module(path);
            for (id, rows) in parts {
                // Row selection is differentiable: each part's gradient lands in its rows.
                let b = crate::model::select_rows(&b, rows)?;
                let mut w = LoraWeights::new(a.clone(), b, alpha, self.config.use_rslora)?;
                if let (Some(mag), Some(base)) = (mag, &self.base) {
                    let m = crate::model::select_rows(&live(mag)?, rows)?;
                    let weight =
                        base.dense_f32(*id).map_err(|e| AdapterError::Weights(e.to_string()))?;
                    let weight = weight
                        .ok_or_else(|| AdapterError::Weights(format!("no `{id}` in the base")))?;
                    // The norms are of the current A and B, detached (PEFT detaches them).
                    let rows = DoraRows::new(m.to_vec1()?, &weight, &w.a.detach(), &w.b.detach())?;
                    w = w.with_dora(rows);
                    if !detach {
                        w.trainable_magnitude = Some(m);
                    }
                }
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
            vocab: Default::default(),
            size_bytes,
            version: 0,
        })
    }

    /// Sets `A` and `B` from a loaded adapter of the same config (a training client that starts
    /// from a served version). Refused for combined modules (`qkv_proj`), whose loaded parts
    /// are row selections, and for modules the adapter lacks or shapes it does not share.
    pub fn load_from(
        &self,
        cfg: &DecoderConfig,
        adapter: &LoraAdapter,
    ) -> std::result::Result<(), String> {
        if cfg.arch.combined_modules {
            return Err(
                "starting from an adapter on a family with combined modules is not supported"
                    .into(),
            );
        }
        if adapter.modules.iter().flatten().any(|w| w.dora.is_some()) || !adapter.vocab.is_empty() {
            return Err(format!(
                "adapter `{}` has DoRA or vocabulary parts, which training clients do not train",
                adapter.name
            ));
        }
        for ((path, a, b), parts) in self.modules.iter().zip(&self.parts) {
            let [(id, _)] = parts.as_slice() else {
                return Err(format!("`{path}` feeds several projections"));
            };
            let w = adapter
                .module(*id)
                .ok_or_else(|| format!("adapter `{}` has no `{path}`", adapter.name))?;
            let e = |e: candle_core::Error| e.to_string();
            if w.a.dims() != a.dims() || w.b.dims() != b.dims() {
                return Err(format!(
                    "adapter `{}`'s `{path}` has other shapes than its config says",
                    adapter.name
                ));
            }
            a.set(&w.a.to_device(a.device()).map_err(e)?).map_err(e)?;
            b.set(&w.b.to_device(b.device()).map_err(e)?).map_err(e)?;
        }
        Ok(())
    }

    /// `(stored module path, magnitude)` detached, for a DoRA adapter's PEFT file.
    pub fn export_magnitudes(&self) -> Result<Vec<(String, Tensor)>> {
        self.modules
            .iter()
            .zip(&self.magnitudes)
            .filter_map(|((path, _, _), m)| m.as_ref().map(|m| (path, m)))
            .map(|(path, m)| Ok((path.clone(), m.as_tensor().detach().copy()?)))
            .collect()
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
