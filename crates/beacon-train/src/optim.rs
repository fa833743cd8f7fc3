//! AdamW with a checkpointable state, the learning-rate schedule and gradient clipping.
//!
//! candle-nn's `AdamW` keeps its moments private (no way to save or restore them), so a resumed run
//! could not continue bit-identically; this one exposes `m`, `v` and the step count.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Default: 0.9
    pub beta1: f64,
    /// Default: 0.999
    pub beta2: f64,
    /// Default: 1e-8
    pub eps: f64,
    /// Decoupled weight decay. Default: 0 (the reference trains with the HF default, 0).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates applied so far.
    pub step: u64,
    /// First and second moments, one per parameter (same shapes).
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[Var], cfg: AdamWConfig) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(AdamW {
            cfg,
            step: 0,
            m: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            v: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Restore moments (from a checkpoint).
    pub fn restore(&mut self, step: u64, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            bail!(
                "optimiser state has {} tensors, expected {}",
                m.len(),
                self.m.len()
            );
        }
        for (a, b) in m.iter().zip(&self.m).chain(v.iter().zip(&self.v)) {
            if a.dims() != b.dims() {
                bail!(
                    "optimiser state shape {:?}, expected {:?}",
                    a.dims(),
                    b.dims()
                );
            }
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// One update with learning rate `lr`.
    pub fn update(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.cfg;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let step = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let theta = p.as_tensor();
            let decayed = if c.weight_decay > 0.0 {
                (theta * (1.0 - lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            p.set(&(decayed - (step * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Learning-rate decay after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// Linear warm-up to `peak` over `warmup` steps, then decay to `peak × min_ratio` at `total` steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate of update number `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let p = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let f = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - p,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        };
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * f)
    }
}

/// Global L2 norm of the gradients.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut s = 0f64;
    for g in grads {
        s += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(s.sqrt())
}

/// Scale the gradients so their global norm is at most `max_norm` (0 = no clipping). Returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        let f = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * f)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_shape() {
        let s = Schedule {
            peak: 1.0,
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
            decay: Decay::Cosine,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-9);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
        let l = Schedule {
            decay: Decay::Linear,
            min_ratio: 0.0,
            ..s
        };
        assert!((l.lr(60) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn adamw_minimises_a_quadratic() -> Result<()> {
        let p = Var::from_tensor(&Tensor::new(&[3f32, -2.0], &Device::Cpu)?)?;
        let mut opt = AdamW::new(std::slice::from_ref(&p), AdamWConfig::default())?;
        for _ in 0..500 {
            let g = (p.as_tensor() * 2.0)?; // ∇ of x²
            opt.update(std::slice::from_ref(&p), &[g], 0.05)?;
        }
        let v: Vec<f32> = p.as_tensor().to_vec1()?;
        assert!(v.iter().all(|x| x.abs() < 0.05), "{v:?}");
        Ok(())
    }

    #[test]
    fn clipping_caps_the_norm() -> Result<()> {
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu)?];
        let before = clip_grad_norm(&mut g, 1.0)?;
        assert!((before - 5.0).abs() < 1e-6);
        assert!((grad_norm(&g)? - 1.0).abs() < 1e-5);
        Ok(())
    }
}
