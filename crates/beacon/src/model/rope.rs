//! Rotary position embedding: tables for arbitrary positions (beacons and re-rotated memory take
//! positions that are not a contiguous range) and their application, halves or interleaved.

use crate::error::Result;
use candle_core::{Device, Tensor};

/// Rotary tables for a list of positions: (cos, sin), each `[n, head_dim/2]`, computed in f32.
pub fn rope_tables(inv_freq: &[f32], positions: &[i64]) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            // Matches torch: freqs = float32(p) * float32(inv_freq), then cos/sin in f32.
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let n = positions.len();
    Ok((
        Tensor::from_vec(cos, (n, half), &Device::Cpu)?,
        Tensor::from_vec(sin, (n, half), &Device::Cpu)?,
    ))
}

/// Rotate `x` `[heads, n, d]` by (cos, sin) `[n, d/2]`.
pub fn apply_rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
    differentiable: bool,
) -> Result<Tensor> {
    let x4 = x.unsqueeze(0)?.contiguous()?;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let y = match (interleaved, differentiable) {
        (false, false) => candle_nn::rotary_emb::rope(&x4, &cos, &sin)?,
        (false, true) => candle_nn::rotary_emb::rope_slow(&x4, &cos, &sin)?,
        (true, false) => candle_nn::rotary_emb::rope_i(&x4, &cos, &sin)?,
        (true, true) => candle_nn::rotary_emb::rope_i_slow(&x4, &cos, &sin)?,
    };
    Ok(y.squeeze(0)?)
}
