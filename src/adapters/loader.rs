//! A PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) → an immutable
//! [`LoraAdapter`], checked tensor by tensor against the base model (a DoRA adapter's norms
//! computed against its frozen weights). Any mismatch is an error:
//! a silent partial load is the bug we exist to avoid.

use super::{AdapterError, LoraAdapter, LoraWeights, PeftConfig};
use crate::model::lora::DoraRows;
use crate::model::{DecoderConfig, FrozenProjections, ModuleId};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeSet;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The PEFT tensor name of `A` (`"A"`) or `B` (`"B"`) for a module.
pub fn peft_key(id: ModuleId, which: &str) -> String {
    format!("base_model.model.{id}.lora_{which}.weight")
}

fn read(path: &Path) -> Result<Vec<u8>, AdapterError> {
    std::fs::read(path)
        .map_err(|source| AdapterError::Io { path: path.display().to_string(), source })
}

/// Loads and validates the adapter in `dir` for a base model of shape `cfg`, by shape only:
/// a DoRA adapter, whose norms need the base weights, is refused ([`load_adapter_on`]).
pub fn load_adapter(
    dir: &Path,
    name: &str,
    cfg: &DecoderConfig,
    device: &Device,
) -> Result<LoraAdapter, AdapterError> {
    load_adapter_on(dir, name, cfg, device, None)
}

/// Loads and validates the adapter in `dir` for the base model of shape `cfg` whose frozen
/// projections are `base` (what a DoRA adapter's weight norms are computed against).
pub fn load_adapter_on(
    dir: &Path,
    name: &str,
    cfg: &DecoderConfig,
    device: &Device,
    base: Option<&FrozenProjections>,
) -> Result<LoraAdapter, AdapterError> {
    let text = read(&dir.join(CONFIG_FILE))?;
    let text =
        String::from_utf8(text).map_err(|_| AdapterError::ConfigJson("not valid UTF-8".into()))?;
    let config = PeftConfig::from_json(&text)?;
    // PEFT names a fused projection by its stored module (`qkv_proj`): target and scale by that.
    let module_paths: Vec<String> = {
        let mut v: Vec<String> = cfg.projections().map(|id| cfg.stored_module(id).path).collect();
        v.dedup();
        v.extend([super::vocab::embed_path(cfg), super::vocab::HEAD.to_string()]);
        v
    };
    let unknown = config.unknown_among(&module_paths);
    if !unknown.is_empty() {
        return Err(AdapterError::Unsupported(format!(
            "`target_modules` entries {unknown:?} name no linear layer of the base model"
        )));
    }
    // The most tensor data this config can need (every tensor in f64): anything larger is
    // refused from its header, before the file is read.
    let targeted = |id: &ModuleId| config.targets_module(&cfg.stored_module(*id).path, id.layer);
    let max_data: u64 = cfg
        .projections()
        .filter(targeted)
        .map(|id| {
            let m = cfg.stored_module(id);
            let (r, _) = config.rank_alpha_module(&m.path);
            let fan_in = cfg.proj_dims(id.target).0;
            ((r * fan_in + m.out * r + m.out) * 8) as u64
        })
        .sum::<u64>()
        + super::vocab::max_bytes(&config, cfg);
    super::header::check_file(&dir.join(WEIGHTS_FILE), max_data)?;
    let bytes = read(&dir.join(WEIGHTS_FILE))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| AdapterError::Weights(format!("unreadable safetensors: {e}")))?;
    let mut expected = BTreeSet::new();
    let mut modules = vec![None; ModuleId::count(cfg.num_layers)];
    for id in cfg.projections().filter(targeted) {
        let m = cfg.stored_module(id);
        let (r, alpha) = config.rank_alpha_module(&m.path);
        let fan_in = cfg.proj_dims(id.target).0;
        let key = |which: &str| format!("base_model.model.{}.lora_{which}.weight", m.path);
        let a = tensor(&st, &key("A"), (r, fan_in), device)?;
        // A combined module's B spans the whole stored output: this projection takes its rows,
        // and shares A with the module's other parts, as PEFT computes B (A x) over all rows.
        let b = tensor(&st, &key("B"), (m.out, r), device)?;
        let b = crate::model::select_rows(&b, &m.rows)?;
        expected.insert(key("A"));
        expected.insert(key("B"));
        let mut w = LoraWeights::new(a, b, alpha, config.use_rslora)?;
        if config.use_dora {
            let (mkey, rows) = dora_rows(&st, id, &m, base, &w)?;
            expected.insert(mkey);
            w = w.with_dora(rows);
        }
        modules[id.index()] = Some(w);
    }
    let vocab = super::vocab::read(&st, &config, cfg, device, base, &mut expected)?;
    if expected.is_empty() {
        return Err(AdapterError::Unsupported(
            "`target_modules` selects no linear layer of the base model".into(),
        ));
    }
    let extra: Vec<_> = st
        .names()
        .into_iter()
        .filter(|n| !expected.contains(*n))
        .take(5)
        .map(str::to_string)
        .collect();
    if !extra.is_empty() {
        return Err(AdapterError::Weights(format!(
            "tensors not described by the config: {extra:?}"
        )));
    }
    let size_bytes = modules.iter().flatten().map(LoraWeights::resident_bytes).sum::<usize>()
        + vocab.resident_bytes();
    Ok(LoraAdapter {
        name: name.to_string(),
        path: dir.to_path_buf(),
        rank: config.r,
        alpha: config.lora_alpha,
        modules,
        vocab,
        size_bytes,
        version: 0,
    })
}

/// DoRA's magnitude of module `id` (PEFT's `lora_magnitude_vector`, its stored module's rows,
/// this projection's taken) and the norm products against the base weight; the key read.
fn dora_rows(
    st: &SafeTensors<'_>,
    id: ModuleId,
    m: &crate::model::StoredModule,
    base: Option<&FrozenProjections>,
    w: &LoraWeights,
) -> Result<(String, DoraRows), AdapterError> {
    let Some(base) = base else {
        return Err(AdapterError::Unsupported(
            "`use_dora: true` needs the base model's weights (for DoRA's weight norms), and this \
             command reads adapters by shape only"
                .into(),
        ));
    };
    // PEFT writes `lora_magnitude_vector`; some versions add `.weight`.
    let plain = format!("base_model.model.{}.lora_magnitude_vector", m.path);
    let key = [plain.clone(), format!("{plain}.weight")]
        .into_iter()
        .find(|k| st.tensor(k).is_ok())
        .ok_or_else(|| {
            AdapterError::Weights(format!("missing tensor `{plain}` (`use_dora: true`)"))
        })?;
    let view = st.tensor(&key).map_err(|e| AdapterError::Weights(e.to_string()))?;
    if view.shape() != [m.out] {
        return Err(AdapterError::Weights(format!(
            "tensor `{key}` has shape {:?}, the base model needs [{}]",
            view.shape(),
            m.out
        )));
    }
    let all = tensor_data(&key, view.data(), view.dtype(), &[m.out])?;
    let magnitude: Vec<f32> = m.rows.iter().map(|&r| all[r]).collect();
    let weight = base.dense_f32(id).map_err(|e| AdapterError::Weights(e.to_string()))?;
    let weight = weight.ok_or_else(|| {
        AdapterError::Unsupported(format!("DoRA on `{id}`, which the base model lacks"))
    })?;
    let rows = DoraRows::new(magnitude, &weight, &w.a, &w.b)?;
    Ok((key, rows))
}

/// Reads one tensor, checks name, shape, dtype and finiteness, and returns it as f32.
fn tensor(
    st: &SafeTensors<'_>,
    key: &str,
    shape: (usize, usize),
    device: &Device,
) -> Result<Tensor, AdapterError> {
    let values = tensor_values(st, key, shape)?;
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
}

/// [`tensor`]'s checks, the values row-major on the host.
pub(crate) fn tensor_values(
    st: &SafeTensors<'_>,
    key: &str,
    shape: (usize, usize),
) -> Result<Vec<f32>, AdapterError> {
    let view =
        st.tensor(key).map_err(|_| AdapterError::Weights(format!("missing tensor `{key}`")))?;
    if view.shape() != [shape.0, shape.1] {
        return Err(AdapterError::Weights(format!(
            "tensor `{key}` has shape {:?}, the base model needs [{}, {}]",
            view.shape(),
            shape.0,
            shape.1
        )));
    }
    tensor_data(key, view.data(), view.dtype(), &[shape.0, shape.1])
}

/// A float tensor's values as f32, refused when not a float type or not finite.
fn tensor_data(
    key: &str,
    data: &[u8],
    dtype: StDtype,
    shape: &[usize],
) -> Result<Vec<f32>, AdapterError> {
    let dtype = match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        other => {
            return Err(AdapterError::Weights(format!(
                "tensor `{key}` has dtype {other:?}; expected a float type"
            )))
        }
    };
    let t = Tensor::from_raw_buffer(data, dtype, shape, &Device::Cpu)?.to_dtype(DType::F32)?;
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
        return Err(AdapterError::Weights(format!(
            "tensor `{key}` has a non-finite value at flat index {pos}"
        )));
    }
    Ok(values)
}
