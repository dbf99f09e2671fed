//! Resolving `--model` (a `.gguf` file, a Hugging Face folder, or `hf:ORG/NAME`) into the
//! model and its tokenizer.

use super::gguf;
use super::hf::{fetch_from_hub, HfSource};
use super::tokenizer::TextTokenizer;
use super::{Decoder, ModelError, Result, WeightFormat};
use candle_core::Device;
use std::path::PathBuf;

/// The default base model, as fetched by `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A loaded base model with its tokenizer and where it came from.
pub struct LoadedModel {
    pub model: Decoder,
    pub tokenizer: TextTokenizer,
    /// A short id for the API (`model` field): the file stem or repo name.
    pub id: String,
    pub path: PathBuf,
}

pub fn load_model(spec: &str, format: WeightFormat, device: &Device) -> Result<LoadedModel> {
    let (path, id) = match spec.strip_prefix("hf:") {
        Some(repo) => (fetch_from_hub(repo)?, repo.rsplit('/').next().unwrap_or(repo).to_string()),
        None => {
            let p = PathBuf::from(spec);
            let id = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.to_string());
            (p, id)
        }
    };
    if !path.exists() {
        let hint = if spec == DEFAULT_MODEL { " (run `scripts/fetch-model.sh` first)" } else { "" };
        return Err(ModelError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("model not found{hint}"),
            ),
        });
    }
    if path.is_dir() {
        let mut src = HfSource::open(&path, device)?;
        let model = Decoder::load(src.cfg.clone(), &mut src, format, device)?;
        let tokenizer = TextTokenizer::from_dir(&path)?;
        return Ok(LoadedModel { model, tokenizer, id, path });
    }
    let (model, src) = gguf::load(&path, format, device)?;
    let tokenizer = TextTokenizer::from_gguf(&src.content)?;
    Ok(LoadedModel { model, tokenizer, id, path })
}

/// The architecture of `spec` (a `.gguf` file or a Hugging Face folder) without its weights:
/// the config and the GGUF `general.architecture` name.
pub fn read_config(spec: &str) -> Result<(super::DecoderConfig, String)> {
    let path = PathBuf::from(spec);
    if path.is_dir() {
        let cfg = super::hf::read_config(&path)?;
        let arch = cfg.arch.name.clone();
        return Ok((cfg, arch));
    }
    let src = gguf::GgufSource::open(&path, &Device::Cpu)?;
    let arch = match src.meta("general.architecture") {
        Some(v) => v.to_string()?.clone(),
        None => "llama".into(),
    };
    Ok((src.cfg.clone(), arch))
}
