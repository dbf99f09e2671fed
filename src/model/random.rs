//! A seeded random weight source: the tiny model the invariant tests and benches build in code.

use super::linear::BaseWeight;
use super::names::Role;
use super::weights::{packed_from_dense, packed_from_qtensor, WeightSource};
use super::{DecoderConfig, ModuleId, Result, WeightFormat};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

pub struct RandomSource {
    cfg: DecoderConfig,
    rng: rand::rngs::StdRng,
    device: Device,
}

impl RandomSource {
    pub fn new(cfg: DecoderConfig, seed: u64, device: Device) -> Self {
        Self { cfg, rng: rand::rngs::StdRng::seed_from_u64(seed), device }
    }

    /// Uniform in `±bound`, like a Kaiming-uniform init with `bound = 1/sqrt(fan_in)`.
    pub fn uniform(&mut self, shape: (usize, usize), bound: f32) -> Result<Tensor> {
        let data: Vec<f32> =
            (0..shape.0 * shape.1).map(|_| self.rng.random_range(-bound..bound)).collect();
        Ok(Tensor::from_vec(data, shape, &self.device)?)
    }
}

impl WeightSource for RandomSource {
    fn embed(&mut self) -> Result<Tensor> {
        self.uniform((self.cfg.vocab_size, self.cfg.hidden_size), 1.0)
    }

    fn norm(&mut self, _role: Role, len: usize) -> Result<Tensor> {
        Ok((self.uniform((1, len), 0.2)? + 1.0)?.reshape(len)?)
    }

    fn norm_bias(&mut self, _role: Role, len: usize) -> Result<Tensor> {
        Ok(self.uniform((1, len), 0.2)?.reshape(len)?)
    }

    fn bias(&mut self, id: ModuleId) -> Result<Tensor> {
        let out = self.cfg.proj_dims(id.target).1;
        Ok(self.uniform((1, out), 0.5)?.reshape(out)?)
    }

    fn linear(&mut self, id: ModuleId, format: WeightFormat) -> Result<BaseWeight> {
        let (fan_in, fan_out) = self.cfg.proj_dims(id.target);
        let w = self.uniform((fan_out, fan_in), 1.0 / (fan_in as f32).sqrt())?;
        if format == WeightFormat::Packed {
            // Through Q4_1, as a real GGUF would arrive: exercises the 4-bit kernels.
            let q = candle_core::quantized::QTensor::quantize(
                &w,
                candle_core::quantized::GgmlDType::Q4_1,
            )?;
            return packed_from_qtensor(&q, |r| r);
        }
        Ok(BaseWeight::Dense(w.to_dtype(format.activation_dtype())?))
    }

    fn lm_head(&mut self, format: WeightFormat) -> Result<BaseWeight> {
        let w = self.embed()?;
        if format == WeightFormat::Packed {
            return packed_from_dense(&w);
        }
        Ok(BaseWeight::Dense(w.to_dtype(match format {
            WeightFormat::Dense(dt) => dt,
            _ => DType::F32,
        })?))
    }
}
