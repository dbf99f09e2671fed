//! Models and configurations built in code for tests and benches: tiny random decoders (one
//! per architecture description), the merged-weights and dense-f32 copies the other paths are
//! checked against, and a decoder switched to another execution mode. Nothing here serves.

use super::config::{Arch, RopeScaling};
use super::lora::AdapterMix;
use super::ops::Exec;
use super::{BaseWeight, Decoder, DecoderConfig, Result, WeightFormat};
use candle_core::{DType, Device};

impl Decoder {
    /// A copy whose weights are `W + Σ c_i B_i A_i` for `mix` (dense f32; a DoRA term rescales
    /// the rows of the sum so far): the merged path that the unmerged paths are tested against.
    /// The bias stays as it is, as PEFT's merge leaves it.
    pub fn merged(&self, mix: &AdapterMix) -> Result<Decoder> {
        let mut out = self.clone();
        for block in out.blocks.iter_mut() {
            for p in block.proj.iter_mut().flatten() {
                let mut w = p.base.to_dense_f32()?;
                for (lw, c) in mix.terms(p.id) {
                    w = (w + (lw.b.matmul(&lw.a)? * c)?)?;
                    if let Some(d) = &lw.dora {
                        // PEFT's DoRA merge: each row of `W + c·B A` times `m / ||W + c·B A||`.
                        let k =
                            candle_core::Tensor::from_vec(d.gains(c), (d.len(), 1), w.device())?;
                        w = w.broadcast_mul(&k)?;
                    }
                }
                p.base = BaseWeight::Dense(w.to_dtype(self.dtype)?);
            }
        }
        Ok(out)
    }

    /// A copy with every base weight as dense f32 (exactly the values the packed or quantized
    /// weights stand for): the exact path the other formats are measured against.
    pub fn dense_f32(&self) -> Result<Decoder> {
        let mut out = self.clone();
        for block in out.blocks.iter_mut() {
            for p in block.proj.iter_mut().flatten() {
                p.base = BaseWeight::Dense(p.base.to_dense_f32()?);
            }
        }
        out.lm_head = BaseWeight::Dense(self.lm_head.to_dense_f32()?);
        out.format = WeightFormat::Dense(DType::F32);
        Ok(out)
    }

    /// A model with random weights (seeded), for invariant tests and benches.
    pub fn random(cfg: DecoderConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::random_with(cfg, seed, device, WeightFormat::Dense(DType::F32))
    }

    /// [`Decoder::random`] stored as `format` (packed: through Q4_1, as a GGUF would arrive).
    pub fn random_with(
        cfg: DecoderConfig,
        seed: u64,
        device: &Device,
        format: WeightFormat,
    ) -> Result<Self> {
        let mut src = super::random::RandomSource::new(cfg.clone(), seed, device.clone());
        Self::load(cfg, &mut src, format, device)
    }

    /// The same weights running the ops as `exec` says (the composed reference the fused
    /// path is tested against).
    pub fn with_exec(&self, exec: Exec) -> Decoder {
        let mut m = self.clone();
        m.kernels = m.kernels.with_exec(exec);
        m
    }
}

impl DecoderConfig {
    /// The smallest config that still exercises GQA, several layers and every projection;
    /// used by the invariant tests and benches on a random model.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 64,
            hidden_size: 16,
            intermediate_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            arch: super::family::llama(),
        }
    }

    /// [`DecoderConfig::tiny`] with widths that are whole 32-blocks (what the packed integer
    /// kernels need): the tiny model of the packed path's invariant tests.
    pub fn tiny_packable() -> Self {
        Self {
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 96,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            ..Self::tiny()
        }
    }

    /// [`DecoderConfig::tiny`] once per architecture description the decoder supports (Llama;
    /// Qwen2's q/k/v biases; Qwen3's q/k norms; Llama with every bias): what the invariant tests
    /// run over, so that each description keeps them.
    pub fn tiny_families() -> Vec<Self> {
        use super::family;
        let with = |arch: Arch| Self { arch, ..Self::tiny() };
        // Gemma 3's table values, with a score scale, a window and a local rope base that
        // matter at the tiny model's sizes.
        let gemma = Arch {
            query_pre_attn_scalar: Some(6.0),
            windows: vec![Some(3), None],
            local_rope_theta: Some(100.0),
            ..family::gemma3()
        };
        let all_biases = Arch { biased: super::Target::ALL.to_vec(), ..family::llama() };
        vec![
            Self { arch: family::bloom(), num_kv_heads: 4, ..Self::tiny() },
            Self::tiny(),
            with(family::qwen2()),
            with(family::qwen3()),
            with(family::phi3()),
            with(all_biases),
            with(gemma),
        ]
    }
}
