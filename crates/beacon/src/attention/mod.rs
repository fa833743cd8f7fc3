//! Scaled dot-product attention with GQA over K/V *segments* — the sink, the beacon memory, the
//! open window and the chunk itself, read where they lie rather than concatenated.
//!
//! Three implementations of the same function, chosen by [`attend`]:
//! - [`cpu`]: the inference kernel (graph-free, f32 queries, f32 or f16 K/V, cache-sized tiles);
//! - [`fused`]: the training op (differentiable, f32; keeps only its output for the backward);
//! - [`composed`]: candle ops in query blocks, for everything else (bf16 compute, other devices),
//!   and the reference the other two are tested against.
//!
//! Shapes: q `[heads, n, d]`, each segment `(k, v)` `[kv_heads, len_i, d]`, the last segment the
//! chunk's own entries (so chunk row `r` sits at column `T − n + r`); the output is `[n, heads·d]`.
//! Query head `h` reads kv head `h / g`, `g = heads / kv_heads`.

pub(crate) mod composed;
mod cpu;
pub mod fused;

pub use fused::{fused_attention, fused_attention_blocked};

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Which key columns a chunk's rows may see.
#[derive(Clone)]
pub enum Mask {
    /// Every context entry, and the chunk causally: row `r` of the `n` query rows sees columns
    /// `0..=T − n + r` (full-coverage / plain attention).
    Causal,
    /// Additive `[n, T]` f32 mask (0 = visible, −inf = hidden), for append + step-expansion.
    Explicit(Tensor),
}

/// Attention of the chunk's queries over the segments (see the module docs for shapes), by the
/// fastest implementation that supports the inputs: the fused op when gradients are wanted, the
/// CPU kernel otherwise, candle ops when neither applies. Cached K/V in a narrower dtype than the
/// queries (f16 K/V with f32 or bf16 compute) is widened only on the composed path.
pub fn attend(
    q: &Tensor,
    segments: &[(Tensor, Tensor)],
    mask: &Mask,
    differentiable: bool,
    kv_heads: usize,
) -> Result<Tensor> {
    if differentiable && q.dtype() == DType::F32 {
        return fused::attend_fused(q, segments, mask);
    }
    if !differentiable {
        if let Some(o) = cpu::attend(q, segments, mask, kv_heads)? {
            return Ok(o);
        }
    }
    if segments
        .iter()
        .any(|(k, v)| k.dtype() != q.dtype() || v.dtype() != q.dtype())
    {
        let widened: Vec<(Tensor, Tensor)> = segments
            .iter()
            .map(|(k, v)| Ok((k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?)))
            .collect::<Result<_>>()?;
        return composed::attend_composed(q, &widened, mask, differentiable, kv_heads);
    }
    composed::attend_composed(q, segments, mask, differentiable, kv_heads)
}

/// Query rows per block so one score-sized tensor stays within ~`budget` floats.
pub fn block_rows(budget: usize, heads: usize, n: usize, t: usize) -> usize {
    (budget / (heads * t).max(1)).clamp(1, n.max(1))
}

/// Floats per score-sized block tensor, for inference and training attention alike: attention
/// memory is O(block × context), never O(context²).
pub const SCORE_BUDGET: usize = 16 << 20;

/// Additive causal mask `[nb, cols]` for query rows `start..start+nb` of a chunk after `ctx` entries.
pub(crate) fn causal_mask(
    ctx: usize,
    start: usize,
    nb: usize,
    cols: usize,
) -> candle_core::Result<Tensor> {
    let mut m = vec![0f32; nb * cols];
    for r in 0..nb {
        let last_visible = ctx + start + r;
        for c in (last_visible + 1)..cols {
            m[r * cols + c] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (nb, cols), &Device::Cpu)
}
