//! Training ops for a frozen backbone: custom ops whose backward computes only what the beacon
//! parameters' gradients need (the input gradient), not the weight gradient candle's own ops would.

use crate::error::Result;
use candle_core::{DType, Tensor, D};

/// `x Wᵀ` for a frozen weight W `[out, in]`, as a custom op whose backward returns only `grad · W`.
/// candle's matmul backward also computes `xᵀ · grad` for W — a second GEMM of the forward's size
/// per projection whose result a frozen backbone throws away (PERF-NOTES: ~2.4 GB and 5–10 %).
pub struct FrozenMatmul {
    /// `[out, in]`, no autograd graph.
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let (n, k) = x_layout.shape().dims2()?;
        let (out, k_w) = self.w.dims2()?;
        if k != k_w {
            candle_core::bail!("frozen-matmul: input width {k}, weight [{out}, {k_w}]");
        }
        let wt = self.w.t()?;
        let (w_storage, w_layout) = wt.storage_and_layout();
        let w_cpu = match &*w_storage {
            candle_core::Storage::Cpu(s) => s,
            _ => candle_core::bail!("frozen-matmul: weight is not on the CPU"),
        };
        let y = x.matmul(w_cpu, (1, n, out, k), x_layout, w_layout)?;
        Ok((y, candle_core::Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.w)?)) // [n, out] · [out, in] → [n, in]
    }
}

/// x `[n, in]` (with a graph) times a frozen `[out, in]` weight → `[n, out]`.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = if w.dtype() == x.dtype() {
        w.clone()
    } else {
        w.to_dtype(x.dtype())?
    };
    Ok(x.apply_op1(FrozenMatmul { w: w.detach() })?)
}

pub(super) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if !differentiable {
        return Ok(candle_nn::ops::rms_norm(x, w, eps as f32)?);
    }
    if x.dtype() == DType::F32 && w.dtype() == DType::F32 && !w.track_op() {
        let w = w.flatten_all()?.to_vec1::<f32>()?;
        return Ok(x
            .contiguous()?
            .apply_op1(FrozenRmsNorm { w, eps: eps as f32 })?);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.to_dtype(dtype)?.broadcast_mul(w)?)
}

/// Differentiable RMSNorm over the last dim, `x / sqrt(mean(x²) + eps) · w`, f32, with a frozen
/// weight: one op whose backward returns only `dx = r·(g − x̂·mean(g ∘ x̂))` (g = dy ∘ w, r =
/// 1/sqrt(mean(x²) + eps), x̂ = x·r), instead of ~5 `[rows, hidden]` composed intermediates kept for
/// the backward.
struct FrozenRmsNorm {
    w: Vec<f32>,
    eps: f32,
}

impl FrozenRmsNorm {
    fn slice<'a>(
        s: &'a candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<&'a [f32]> {
        let data = match s {
            candle_core::CpuStorage::F32(v) => v.as_slice(),
            _ => candle_core::bail!("rms-norm: f32 only"),
        };
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(&data[a..b]),
            None => candle_core::bail!("rms-norm: input must be contiguous"),
        }
    }

    /// 1 / sqrt(mean(x²) + eps) of one row.
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|&v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl candle_core::CustomOp1 for FrozenRmsNorm {
    fn name(&self) -> &'static str {
        "frozen-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = Self::slice(s, l)?;
        let h = self.w.len();
        if l.shape().dims().last() != Some(&h) {
            candle_core::bail!("rms-norm: input {:?}, weight [{h}]", l.shape());
        }
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let r = self.inv_rms(xr);
            for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(&self.w) {
                *yv = xv * r * wv;
            }
        }
        Ok((candle_core::CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = x.detach().contiguous()?;
        let gy = grad_y.detach().contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = gy.storage_and_layout();
        let (xs, gs) = match (&*xs, &*gs) {
            (candle_core::Storage::Cpu(a), candle_core::Storage::Cpu(b)) => {
                (Self::slice(a, xl)?, Self::slice(b, gl)?)
            }
            _ => candle_core::bail!("rms-norm: CPU only"),
        };
        let h = self.w.len();
        let mut dx = vec![0f32; xs.len()];
        for ((xr, gr), dr) in xs
            .chunks_exact(h)
            .zip(gs.chunks_exact(h))
            .zip(dx.chunks_exact_mut(h))
        {
            let r = self.inv_rms(xr);
            let c = xr
                .iter()
                .zip(gr)
                .zip(&self.w)
                .map(|((&xv, &gv), &wv)| gv * wv * xv * r)
                .sum::<f32>()
                / h as f32;
            for (((d, &xv), &gv), &wv) in dr.iter_mut().zip(xr).zip(gr).zip(&self.w) {
                *d = r * (gv * wv - xv * r * c);
            }
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_rms_norm_matches_composed() {
        let (n, h) = (5usize, 12usize);
        let xs: Vec<f32> = (0..n * h)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 4.0)
            .collect();
        let ws: Vec<f32> = (0..h).map(|i| 0.5 + (i as f32) / 7.0).collect();
        let rs: Vec<f32> = (0..n * h)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(xs, (n, h), &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::from_vec(ws, h, &Device::Cpu).unwrap();
        let r = Tensor::from_vec(rs, (n, h), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                rms_norm(x.as_tensor(), &w, 1e-5, true).unwrap()
            } else {
                // the composed differentiable formula
                let ms = x
                    .as_tensor()
                    .sqr()
                    .unwrap()
                    .mean_keepdim(D::Minus1)
                    .unwrap();
                let y = x
                    .as_tensor()
                    .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap();
                y.broadcast_mul(&w).unwrap()
            };
            assert!(y.track_op());
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let (yf, gf) = run(true);
        let (yc, gc) = run(false);
        let rel = crate::testing::max_rel_diff;
        assert!(rel(&yf, &yc) < 1e-5, "y {}", rel(&yf, &yc));
        assert!(rel(&gf, &gc) < 1e-4, "dx {}", rel(&gf, &gc));
        assert!(!gf.track_op());
    }
}
