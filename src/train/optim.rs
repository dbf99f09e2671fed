//! AdamW with decoupled weight decay (PyTorch's formulation), global-norm gradient clipping and
//! the learning-rate schedules. Written here rather than taken from candle-nn because its
//! state (moments, step) must be saved and restored for `--resume`.

use candle_core::{Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

/// Learning rate at optimizer step `step` (0-based), as Hugging Face's schedulers give it:
/// linear warm-up from 0, then the schedule down to 0 at `total`.
pub fn lr_at(base: f64, step: usize, warmup: usize, total: usize, schedule: Schedule) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    }
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub t: usize,
    /// First and second moments per parameter.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[Var], weight_decay: f64) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: params.iter().map(zeros).collect::<Result<_>>()?,
            v: params.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * self.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay_to_zero() {
        assert_eq!(lr_at(1.0, 0, 20, 133, Schedule::Linear), 0.0);
        assert!((lr_at(1.0, 10, 20, 133, Schedule::Linear) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(1.0, 20, 20, 133, Schedule::Linear), 1.0);
        assert_eq!(lr_at(1.0, 133, 20, 133, Schedule::Linear), 0.0);
        assert!((lr_at(1.0, 76, 20, 132, Schedule::Cosine) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(0.3, 50, 0, 100, Schedule::Constant), 0.3);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_against_the_gradient_sign() {
        let p = Var::from_vec(vec![1.0f32, -2.0], 2, &candle_core::Device::Cpu).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&p), 0.0).unwrap();
        let g = Tensor::new(&[0.5f32, -3.0], &candle_core::Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&p), &[g], 0.1).unwrap();
        let v = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5, "{v:?}");
    }
}
