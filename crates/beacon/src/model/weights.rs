//! Backbone weights as stored or as computed with: dense, quantized (GGUF) with an optional dense
//! prefill copy, low-rank-adapted; the projections and the token embedding built on them.

use super::frozen::frozen_matmul;
use crate::bf16;
use crate::error::Result;
use crate::memory_plan::PrefillWeights;
use crate::q4_1;
use crate::stored_quant;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

/// A projection `y = x Wᵀ (+ b)`. Quantized weights (from GGUF) stay quantized; a dense copy may be
/// kept beside them because dense GEMM wins for prefill-sized chunks while the quantized vec-dot wins
/// for single-row decode (PERF-NOTES).
#[derive(Clone)]
pub enum Weight {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor),
    Quantized {
        q: Arc<QMatMul>,
        qtensor: Arc<QTensor>,
        /// Dequantized `[out, in]` (f32 or bf16), used for chunks of at least [`DENSE_MIN_ROWS`] rows.
        dense: Option<Tensor>,
        /// Without a dense copy, dequantize into a temporary f32 matrix for such chunks (instead of
        /// running the quantized dot products row by row).
        scratch: bool,
    },
    /// Low-rank beacon projection: `base + a·b` (a `[out, r]`, b `[r, in]`), our training extension.
    LowRank {
        base: Box<Weight>,
        a: Tensor,
        b: Tensor,
    },
}

/// Chunks with at least this many rows use the dense copy of a quantized weight.
pub const DENSE_MIN_ROWS: usize = 8;

impl Weight {
    /// A quantized matrix held for prefill as the memory plan chose.
    pub fn quantized(qtensor: QTensor, prefill: PrefillWeights) -> Result<Self> {
        let dense = match prefill {
            PrefillWeights::Dense => Some(qtensor.dequantize(&Device::Cpu)?),
            PrefillWeights::Bf16 => Some(qtensor.dequantize(&Device::Cpu)?.to_dtype(DType::BF16)?),
            PrefillWeights::Scratch | PrefillWeights::Quantized => None,
        };
        let qtensor = Arc::new(qtensor);
        let q = Arc::new(QMatMul::from_arc(qtensor.clone())?);
        Ok(Weight::Quantized {
            q,
            qtensor,
            dense,
            scratch: prefill == PrefillWeights::Scratch,
        })
    }

    /// `[out, in]`
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Dense(t) => t.dims2().unwrap_or((0, 0)),
            Weight::Quantized { qtensor, .. } => qtensor.shape().dims2().unwrap_or((0, 0)),
            Weight::LowRank { base, .. } => base.dims(),
        }
    }

    /// A dense `[out, in]` f32 copy (for initialising beacon weights from the backbone).
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.to_dtype(DType::F32)?,
            Weight::Quantized { qtensor, dense, .. } => match dense {
                Some(d) => d.to_dtype(DType::F32)?,
                None => qtensor.dequantize(&Device::Cpu)?,
            },
            Weight::LowRank { base, a, b } => (base.to_dense()? + a.matmul(b)?)?,
        })
    }

    /// x: `[n, in]` → `[n, out]`
    ///
    /// When `x` carries an autograd graph (training) and the weight is a frozen backbone matrix, the
    /// product goes through [`FrozenMatmul`], whose backward computes only the input gradient; the
    /// quantized kernels have no backward at all, so a quantized weight then uses its dense copy.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let training = x.track_op();
        Ok(match self {
            Weight::Dense(w) if training && !w.track_op() => frozen_matmul(x, w)?,
            Weight::Dense(w) => dense_forward(w, x)?,
            Weight::Quantized { qtensor, dense, .. } if training => match dense {
                Some(w) => frozen_matmul(x, w)?,
                None => frozen_matmul(x, &qtensor.dequantize(&Device::Cpu)?.to_dtype(x.dtype())?)?,
            },
            Weight::Quantized {
                q,
                qtensor,
                dense,
                scratch,
            } => {
                let rows = x.dim(0)?;
                match dense {
                    Some(w) if rows >= DENSE_MIN_ROWS => dense_forward(w, x)?,
                    None if *scratch && rows >= DENSE_MIN_ROWS => {
                        x.matmul(&qtensor.dequantize(&Device::Cpu)?.t()?)?
                    }
                    _ if qtensor.dtype() == GgmlDType::Q4_1 => q4_1::forward(qtensor, x)?,
                    // Not `QMatMul`: it keeps a repacked copy of K-quant matrices beside the stored one.
                    _ if stored_quant::supports(qtensor.dtype()) => {
                        stored_quant::forward(qtensor, x)?
                    }
                    _ => q.forward(x)?,
                }
            }
            Weight::LowRank { base, a, b } => {
                (base.forward(x)? + x.matmul(&b.t()?)?.matmul(&a.t()?)?)?
            }
        })
    }
}

/// Which bf16 dot product this CPU runs (AVX-512 BF16 or the portable widening loop).
pub fn bf16_kernel_name() -> &'static str {
    bf16::kernel_name()
}

/// `x Wᵀ` for a dense weight: bf16 weights with f32 activations go through [`bf16`]'s kernel for few
/// rows (decode) and through a temporary f32 widening of the matrix for many (prefill).
fn dense_forward(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if w.dtype() == DType::BF16 && x.dtype() == DType::F32 {
        return if x.dim(0)? <= bf16::MAX_ROWS {
            bf16::forward(w, x)
        } else {
            Ok(x.matmul(&w.to_dtype(DType::F32)?.t()?)?)
        };
    }
    Ok(x.matmul(&w.t()?)?)
}

#[derive(Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Token embedding table, dense or quantized (GGUF keeps it Q8_0; rows are dequantized on lookup).
#[derive(Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            // bf16 tables (Hugging Face checkpoints kept as stored) give f32 rows like the rest.
            Embedding::Dense(t) => t.embedding(ids)?.to_dtype(DType::F32)?,
            Embedding::Quantized(q) => q.embedding(ids)?,
        })
    }
    pub fn row(&self, id: u32) -> Result<Tensor> {
        let ids = Tensor::new(&[id], &Device::Cpu)?;
        Ok(self.lookup(&ids)?.squeeze(0)?)
    }
}
