//! Attention composed of candle ops, in query blocks: the fallback for what the CPU kernel does
//! not take (bf16 compute, non-CPU tensors) and the reference the other two are tested against.

use super::{block_rows, causal_mask, Mask, SCORE_BUDGET};
use crate::error::Result;
use candle_core::{DType, Tensor, D};

/// Scaled dot-product attention with GQA over K/V segments (the last one is the chunk itself),
/// in query blocks, composed of candle ops. q `[heads, n, d]`, segments `[kv, len_i, d]` → `[n, heads*d]`.
pub(crate) fn attend_composed(
    q: &Tensor,
    segments: &[(Tensor, Tensor)],
    mask: &Mask,
    differentiable: bool,
    kvh: usize,
) -> Result<Tensor> {
    let (heads, n, d) = q.dims3()?;
    let g = heads / kvh;
    let lens: Vec<usize> = segments
        .iter()
        .map(|(k, _)| k.dim(1))
        .collect::<candle_core::Result<_>>()?;
    let t: usize = lens.iter().sum();
    let ctx = t - n;
    let scale = 1.0 / (d as f64).sqrt();
    let block = block_rows(SCORE_BUDGET, heads, n, t);
    let q = q.reshape((kvh, g, n, d))?;
    let mut outs = Vec::new();
    let mut start = 0;
    while start < n {
        let nb = block.min(n - start);
        // Rows of a block attend to the context plus chunk columns up to themselves.
        let cols = ctx + start + nb;
        let qb = q.narrow(2, start, nb)?.reshape((kvh, g * nb, d))?; // [kv, g*nb, d]
        let mut used = Vec::new(); // (k, v) per segment, trimmed to `cols`
        let mut off = 0;
        for ((k, v), &len) in segments.iter().zip(&lens) {
            if off >= cols {
                break;
            }
            if len == 0 {
                continue;
            }
            let take = len.min(cols - off);
            let (k, v) = if take == len {
                (k.clone(), v.clone())
            } else {
                (k.narrow(1, 0, take)?, v.narrow(1, 0, take)?)
            };
            used.push((k, v));
            off += take;
        }
        let scores: Vec<Tensor> = used
            .iter()
            .map(|(k, _)| qb.matmul(&k.t()?))
            .collect::<candle_core::Result<_>>()?; // [kv, g*nb, len_i]
        let mut s = if scores.len() == 1 {
            scores[0].clone()
        } else {
            Tensor::cat(&scores, 2)?
        };
        s = (s.to_dtype(DType::F32)? * scale)?; // [kv, g*nb, cols]
        let m = match mask {
            Mask::Causal if nb > 1 => Some(causal_mask(ctx, start, nb, cols)?),
            Mask::Causal => None,
            Mask::Explicit(full) => Some(full.narrow(0, start, nb)?.narrow(1, 0, cols)?),
        };
        if let Some(m) = m {
            s = s
                .reshape((kvh, g, nb, cols))?
                .broadcast_add(&m)?
                .reshape((kvh, g * nb, cols))?;
        }
        let p = if differentiable {
            candle_nn::ops::softmax(&s, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&s)?
        };
        let p = p.to_dtype(q.dtype())?;
        let mut o: Option<Tensor> = None;
        let mut off = 0;
        for (k, v) in &used {
            let len = k.dim(1)?;
            let part = p.narrow(2, off, len)?.matmul(v)?; // [kv, g*nb, d]
            o = Some(match o {
                None => part,
                Some(acc) => (acc + part)?,
            });
            off += len;
        }
        outs.push(
            o.expect("at least the chunk segment")
                .reshape((heads, nb, d))?,
        );
        start += nb;
    }
    let o = if outs.len() == 1 {
        outs.pop().expect("one block")
    } else {
        Tensor::cat(&outs, 1)?
    };
    Ok(o.transpose(0, 1)?.reshape((n, heads * d))?)
}
