//! Fused, memory-lean scaled-dot-product attention for the training (differentiable) path.
//!
//! The composed attention (`matmul → scale → mask → softmax → matmul`, all in the autograd graph)
//! keeps several score-sized `[heads, rows, context]` f32 tensors per layer alive until the backward,
//! which dominates training memory. [`fused_attention`] is one [`CustomOp3`] over `(q, k, v)`:
//!
//! - **forward** computes the output in query blocks with graph-free tensor ops; nothing but the
//!   output is kept (the graph holds q, k, v and the output, all `O(rows × d)` or `O(context × d)`);
//! - **backward** recomputes the probabilities block by block (FlashAttention-style):
//!   `P = softmax(q kᵀ·scale + mask)`, `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
//!   `dQ = dS K·scale`, `dK = dSᵀ Q·scale`, so its peak is `O(block × context)` per layer, transient.
//!
//! GQA: query head `h` reads kv head `h / g` (`g = heads / kv_heads`), as everywhere in [`super`].
//! f32 only (the trainer's compute dtype).

use super::{block_rows, causal_mask, Mask, SCORE_BUDGET};
use crate::error::{BeaconError, Result};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

/// The fused attention op. `q [heads, n, d]`, `k`/`v [kv, T, d]` → `[heads, n, d]`, all f32.
struct FusedAttention {
    mask: Mask,
    scale: f64,
    /// Query rows per block.
    block: usize,
}

/// Shapes of one call: (kv heads, group size, rows, context, head dim).
struct Dims {
    kvh: usize,
    g: usize,
    n: usize,
    t: usize,
    d: usize,
}

impl FusedAttention {
    fn dims(q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Dims> {
        let (heads, n, d) = q.dims3()?;
        let (kvh, t, dk) = k.dims3()?;
        if v.dims3()? != (kvh, t, dk) || dk != d || kvh == 0 || heads % kvh != 0 || t < n {
            candle_core::bail!("fused-attention: q {q:?}, k {k:?}, v {v:?}");
        }
        Ok(Dims {
            kvh,
            g: heads / kvh,
            n,
            t,
            d,
        })
    }

    /// Columns a block of rows `start..start+nb` reads, and its additive mask (if any).
    fn block_mask(
        &self,
        dm: &Dims,
        start: usize,
        nb: usize,
    ) -> candle_core::Result<(usize, Option<Tensor>)> {
        Ok(match &self.mask {
            Mask::Causal => {
                let ctx = dm.t - dm.n;
                let cols = ctx + start + nb;
                let m = if nb > 1 {
                    Some(causal_mask(ctx, start, nb, cols)?)
                } else {
                    None
                };
                (cols, m)
            }
            Mask::Explicit(m) => (dm.t, Some(m.narrow(0, start, nb)?)),
        })
    }

    /// Probabilities of one block: `qb [kv, g·nb, d]` against `k[:, :cols]` → `[kv, g·nb, cols]`.
    fn probs(
        &self,
        dm: &Dims,
        qb: &Tensor,
        k: &Tensor,
        start: usize,
        nb: usize,
    ) -> candle_core::Result<(usize, Tensor)> {
        let (cols, m) = self.block_mask(dm, start, nb)?;
        let kc = if cols == dm.t {
            k.clone()
        } else {
            k.narrow(1, 0, cols)?
        };
        let mut s = (qb.matmul(&kc.t()?)? * self.scale)?;
        if let Some(m) = m {
            s = s
                .reshape((dm.kvh, dm.g, nb, cols))?
                .broadcast_add(&m)?
                .reshape((dm.kvh, dm.g * nb, cols))?;
        }
        Ok((cols, candle_nn::ops::softmax_last_dim(&s)?))
    }

    /// Rows `start..start+nb` of `x [kv, g, n, w]` as `[kv, g·nb, w]`.
    fn rows(dm: &Dims, x: &Tensor, start: usize, nb: usize) -> candle_core::Result<Tensor> {
        let w = x.dim(3)?;
        if nb == dm.n {
            return x.reshape((dm.kvh, dm.g * nb, w));
        }
        x.narrow(2, start, nb)?
            .contiguous()?
            .reshape((dm.kvh, dm.g * nb, w))
    }

    /// The forward on graph-free tensors.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let dm = Self::dims(q.shape(), k.shape(), v.shape())?;
        let q4 = q.reshape((dm.kvh, dm.g, dm.n, dm.d))?;
        let mut outs = Vec::new();
        let mut start = 0;
        while start < dm.n {
            let nb = self.block.min(dm.n - start);
            let qb = Self::rows(&dm, &q4, start, nb)?;
            let (cols, p) = self.probs(&dm, &qb, k, start, nb)?;
            let vc = if cols == dm.t {
                v.clone()
            } else {
                v.narrow(1, 0, cols)?
            };
            let o = p.matmul(&vc)?.reshape((dm.kvh, dm.g, nb, dm.d))?;
            outs.push(o);
            start += nb;
        }
        let o = if outs.len() == 1 {
            outs.pop().expect("one block")
        } else {
            Tensor::cat(&outs, 2)?
        };
        o.reshape((dm.kvh * dm.g, dm.n, dm.d))
    }
}

/// A contiguous f32 CPU storage region as a fresh graph-free tensor.
fn tensor_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("fused-attention: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Tensor::from_slice(&data[a..b], l.shape(), &Device::Cpu),
        None => candle_core::bail!("fused-attention: inputs must be contiguous"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (tensor_of(s1, l1)?, tensor_of(s2, l2)?, tensor_of(s3, l3)?);
        let o = self.forward(&q, &k, &v)?;
        let shape = o.shape().clone();
        Ok((CpuStorage::F32(o.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Everything below is graph-free: the gradients must not reference the forward graph.
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (o, go) = (res.detach(), grad_res.detach().contiguous()?);
        let dm = Self::dims(q.shape(), k.shape(), v.shape())?;
        let (kvh, g, n, t, d) = (dm.kvh, dm.g, dm.n, dm.t, dm.d);
        let q4 = q.reshape((kvh, g, n, d))?;
        let go4 = go.reshape((kvh, g, n, d))?;
        // D = rowsum(dO ∘ O): [kv, g, n, 1]
        let dsum = (&go * &o)?.sum_keepdim(2)?.reshape((kvh, g, n, 1))?;
        let mut dk = vec![0f32; kvh * t * d];
        let mut dv = vec![0f32; kvh * t * d];
        let mut dq_blocks = Vec::new();
        let mut start = 0;
        while start < n {
            let nb = self.block.min(n - start);
            let qb = Self::rows(&dm, &q4, start, nb)?; // [kv, g·nb, d]
            let gob = Self::rows(&dm, &go4, start, nb)?; // [kv, g·nb, d]
            let db = Self::rows(&dm, &dsum, start, nb)?; // [kv, g·nb, 1]
            let (cols, p) = self.probs(&dm, &qb, &k, start, nb)?; // [kv, g·nb, cols]
            let (kc, vc) = if cols == t {
                (k.clone(), v.clone())
            } else {
                (k.narrow(1, 0, cols)?, v.narrow(1, 0, cols)?)
            };
            let dv_b = p.t()?.matmul(&gob)?; // [kv, cols, d]
            let dp = gob.matmul(&vc.t()?)?; // [kv, g·nb, cols]
            let ds = (dp.broadcast_sub(&db)? * &p)?;
            drop((p, dp));
            let dq_b = (ds.matmul(&kc)? * self.scale)?; // [kv, g·nb, d]
            let dk_b = (ds.t()?.matmul(&qb)? * self.scale)?; // [kv, cols, d]
            drop(ds);
            accumulate(&mut dk, &dk_b, t, d)?;
            accumulate(&mut dv, &dv_b, t, d)?;
            dq_blocks.push(dq_b.reshape((kvh, g, nb, d))?);
            start += nb;
        }
        let dq = if dq_blocks.len() == 1 {
            dq_blocks.pop().expect("one block")
        } else {
            Tensor::cat(&dq_blocks, 2)?
        };
        let dq = dq.reshape((kvh * g, n, d))?;
        let dk = Tensor::from_vec(dk, (kvh, t, d), &Device::Cpu)?;
        let dv = Tensor::from_vec(dv, (kvh, t, d), &Device::Cpu)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `acc [kv, t, d]` (row-major) += `x [kv, cols, d]` on its first `cols` rows.
fn accumulate(acc: &mut [f32], x: &Tensor, t: usize, d: usize) -> candle_core::Result<()> {
    let (kvh, cols, _) = x.dims3()?;
    let x = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    for h in 0..kvh {
        let dst = &mut acc[h * t * d..h * t * d + cols * d];
        let src = &x[h * cols * d..(h + 1) * cols * d];
        for (a, b) in dst.iter_mut().zip(src) {
            *a += b;
        }
    }
    Ok(())
}

/// Attention of `q [heads, n, d]` over `k`, `v` `[kv, T, d]` (T ≥ n; for [`Mask::Causal`] the
/// last n columns are the query rows themselves) → `[heads, n, d]`, f32, differentiable in q, k, v.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask) -> Result<Tensor> {
    let (heads, n, _) = q.dims3()?;
    let t = k.dim(1)?;
    fused_attention_blocked(q, k, v, mask, block_rows(SCORE_BUDGET, heads, n, t))
}

/// [`fused_attention`] with an explicit query block size (tests exercise several blocks).
pub fn fused_attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    block: usize,
) -> Result<Tensor> {
    for x in [q, k, v] {
        if x.dtype() != DType::F32 {
            return Err(BeaconError::invalid(format!(
                "fused-attention: f32 only, got {:?}",
                x.dtype()
            )));
        }
    }
    let (_, n, d) = q.dims3()?;
    let t = k.dim(1)?;
    let mask = match mask {
        Mask::Causal => Mask::Causal,
        Mask::Explicit(m) => {
            if m.dims2()? != (n, t) {
                return Err(BeaconError::invalid(format!(
                    "fused-attention: mask {:?}, want [{n}, {t}]",
                    m.shape()
                )));
            }
            Mask::Explicit(m.detach().to_dtype(DType::F32)?.contiguous()?)
        }
    };
    let op = FusedAttention {
        mask,
        scale: 1.0 / (d as f64).sqrt(),
        block: block.max(1),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Differentiable attention over the segments, concatenated (`Tensor::cat` carries the gradient
/// back to each segment), through the fused op. q `[heads, n, d]` → `[n, heads*d]`.
pub(super) fn attend_fused(
    q: &Tensor,
    segments: &[(Tensor, Tensor)],
    mask: &Mask,
) -> Result<Tensor> {
    let (heads, n, d) = q.dims3()?;
    let used: Vec<&(Tensor, Tensor)> = segments
        .iter()
        .filter(|(k, _)| k.dim(1).map_or(true, |l| l > 0))
        .collect();
    let (k, v) = if used.len() == 1 {
        (used[0].0.clone(), used[0].1.clone())
    } else {
        let ks: Vec<&Tensor> = used.iter().map(|(k, _)| k).collect();
        let vs: Vec<&Tensor> = used.iter().map(|(_, v)| v).collect();
        (Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?)
    };
    let o = fused_attention(q, &k, &v, mask.clone())?; // [heads, n, d]
    Ok(o.transpose(0, 1)?.reshape((n, heads * d))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::composed::attend_composed;
    use candle_core::Var;

    use crate::testing::{max_rel_diff as rel, random_tensor as rand_tensor};

    /// An attention implementation under test: (q, segments) → `[n, heads·d]`.
    type AttnFn<'a> = &'a dyn Fn(&Tensor, &[(Tensor, Tensor)]) -> Tensor;

    /// Output and gradients (q, then k and v of every segment) of `sum(out ∘ r)`.
    fn run(f: AttnFn, q: &Var, segs: &[(Var, Var)], r: &Tensor) -> (Tensor, Vec<Tensor>) {
        let s: Vec<(Tensor, Tensor)> = segs
            .iter()
            .map(|(k, v)| (k.as_tensor().clone(), v.as_tensor().clone()))
            .collect();
        let out = f(q.as_tensor(), &s);
        let loss = (&out * r).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let mut grads = vec![g.get(q.as_tensor()).unwrap().clone()];
        for (k, v) in segs {
            grads.push(g.get(k.as_tensor()).unwrap().clone());
            grads.push(g.get(v.as_tensor()).unwrap().clone());
        }
        (out, grads)
    }

    fn check(explicit: bool) {
        let (kvh, g, d, n) = (2usize, 3usize, 8usize, 11usize);
        let heads = kvh * g;
        let lens = [5usize, 7, n];
        let t: usize = lens.iter().sum();
        let ctx = t - n;
        let mut seed = if explicit { 7 } else { 3 };
        let q = Var::from_tensor(&(rand_tensor(&mut seed, (heads, n, d)) * 2.0).unwrap()).unwrap();
        let segs: Vec<(Var, Var)> = lens
            .iter()
            .map(|&l| {
                let k = (rand_tensor(&mut seed, (kvh, l, d)) * 2.0).unwrap();
                let v = rand_tensor(&mut seed, (kvh, l, d));
                (Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap())
            })
            .collect();
        let r = rand_tensor(&mut seed, (1, n, heads * d))
            .squeeze(0)
            .unwrap();
        // Explicit: causal plus holes (never the row's own column).
        let mask_t = explicit.then(|| {
            let mut m = vec![0f32; n * t];
            for row in 0..n {
                for c in 0..t {
                    let hole = (row * 7 + c * 3) % 5 == 0 && c != ctx + row;
                    if c > ctx + row || hole {
                        m[row * t + c] = f32::NEG_INFINITY;
                    }
                }
            }
            Tensor::from_vec(m, (n, t), &Device::Cpu).unwrap()
        });
        let mask = || match &mask_t {
            Some(m) => Mask::Explicit(m.clone()),
            None => Mask::Causal,
        };
        let (o_ref, g_ref) = run(
            &|q, s| attend_composed(q, s, &mask(), true, kvh).unwrap(),
            &q,
            &segs,
            &r,
        );
        let mut candidates: Vec<(String, (Tensor, Vec<Tensor>))> = vec![(
            "attend_fused".into(),
            run(&|q, s| attend_fused(q, s, &mask()).unwrap(), &q, &segs, &r),
        )];
        for block in [1usize, 4, n] {
            let f = |q: &Tensor, s: &[(Tensor, Tensor)]| {
                let k = Tensor::cat(&s.iter().map(|(k, _)| k).collect::<Vec<_>>(), 1).unwrap();
                let v = Tensor::cat(&s.iter().map(|(_, v)| v).collect::<Vec<_>>(), 1).unwrap();
                let m = match &mask_t {
                    Some(m) => Mask::Explicit(m.clone()),
                    None => Mask::Causal,
                };
                let o = fused_attention_blocked(q, &k, &v, m, block).unwrap();
                o.transpose(0, 1).unwrap().reshape((n, heads * d)).unwrap()
            };
            candidates.push((format!("block {block}"), run(&f, &q, &segs, &r)));
        }
        let names = ["dq", "dk0", "dv0", "dk1", "dv1", "dk2", "dv2"];
        for (name, (o, grads)) in &candidates {
            for x in grads {
                assert!(!x.track_op(), "{name}: gradients must be graph-free");
            }
            let e = rel(o, &o_ref);
            assert!(e < 1e-4, "{name}: output rel err {e}");
            for ((gf, gr), gname) in grads.iter().zip(&g_ref).zip(names) {
                assert_eq!(gf.dims(), gr.dims(), "{name} {gname}");
                let e = rel(gf, gr);
                assert!(e < 1e-4, "{name}: {gname} rel err {e}");
            }
        }
    }

    #[test]
    fn fused_matches_composed_causal() {
        check(false);
    }

    #[test]
    fn fused_matches_composed_explicit_mask() {
        check(true);
    }
}
