//! The decoder backbone (Llama / Qwen2 / Mistral) with Activation Beacon's extra projections.
//!
//! One immutable [`Model`] serves any number of conversations: the K/V a chunk attends to lives
//! outside it, behind [`AttentionContext`], so the inference engine can keep preallocated rotated
//! caches while the trainer keeps everything in the autograd graph.
//!
//! A chunk is a run of entries (raw tokens and beacon tokens) fed in one forward. Beacon rows take
//! `beacon_embed_tokens` and the `beacon_{q,k,v,o}_proj` weights (SPEC §1.2); everything else
//! (norms, MLP, lm_head, RoPE) is shared with the backbone.

use crate::attention::{fused_attention, AttnMask};
use crate::bf16;
use crate::config::ModelConfig;
use crate::cpu_attention;
use crate::error::Result;
use crate::memory_plan::PrefillWeights;
use crate::q4_1;
use crate::stored_quant;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
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

#[derive(Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

/// The separate beacon projections of one layer (`beacon_param`); `None` = use the backbone's.
#[derive(Clone, Default)]
pub struct BeaconProjections {
    pub q: Option<Linear>,
    pub k: Option<Linear>,
    pub v: Option<Linear>,
    pub o: Option<Linear>,
}

#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Clone)]
pub struct Layer {
    pub input_layernorm: Tensor,
    pub attn: Attention,
    pub beacon: BeaconProjections,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

#[derive(Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    pub dtype: DType,
    pub embed_tokens: Embedding,
    /// `[1, hidden]`: the one embedding row all beacon tokens share.
    pub beacon_embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
    /// `[head_dim / 2]` RoPE inverse frequencies, f32.
    inv_freq: Vec<f32>,
}

/// Which key columns a chunk's rows may see.
pub enum Mask {
    /// Every context entry, and the chunk causally (full-coverage / plain attention).
    Causal,
    /// Additive `[n, context + n]` mask (0 = visible, -inf = hidden), for append + step-expansion.
    Explicit(Tensor),
}

/// One forward's input. Entries are in order; `is_beacon[i]` marks beacon tokens.
pub struct Chunk<'a> {
    pub ids: &'a [u32],
    pub is_beacon: &'a [bool],
    /// Absolute position of each entry.
    pub positions: &'a [i64],
    pub mask: Mask,
    /// Rows whose logits are wanted (indices into the chunk). Empty = none.
    pub logits_rows: &'a [usize],
    /// Use ops that carry gradients (training); the inference kernels have no backward.
    pub differentiable: bool,
}

/// Storage for K/V during a forward, kept outside the model.
///
/// Per layer the model asks for the `context` segments a chunk attends to (each `(k_rot, v)`,
/// `[kv_heads, len, head_dim]`, in order), attends over them plus the chunk itself, then `commit`s the
/// chunk's own entries. Segments avoid copying a long cache just to append a few rows.
pub trait AttentionContext {
    fn context(&mut self, layer: usize) -> Result<Vec<(Tensor, Tensor)>>;
    fn commit(&mut self, layer: usize, k_rot: &Tensor, v: &Tensor) -> Result<()>;
}

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

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
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

use crate::attention::{block_rows, causal_mask, SCORE_BUDGET};

impl Model {
    pub fn new(
        cfg: ModelConfig,
        dtype: DType,
        embed_tokens: Embedding,
        beacon_embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
    ) -> Self {
        let d = cfg.head_dim;
        let inv_freq = (0..d / 2)
            .map(|i| 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        Model {
            cfg,
            dtype,
            embed_tokens,
            beacon_embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Embeddings of a chunk: raw ids from `embed_tokens`, beacons from `beacon_embed` → `[n, hidden]`.
    fn embed(&self, ids: &[u32], is_beacon: &[bool]) -> Result<Tensor> {
        let n = ids.len();
        let raw_idx: Vec<u32> = (0..n as u32).filter(|&i| !is_beacon[i as usize]).collect();
        let raw_ids: Vec<u32> = raw_idx.iter().map(|&i| ids[i as usize]).collect();
        let dev = Device::Cpu;
        let raw = if raw_ids.is_empty() {
            None
        } else {
            Some(
                self.embed_tokens
                    .lookup(&Tensor::new(raw_ids.as_slice(), &dev)?)?
                    .to_dtype(self.dtype)?,
            )
        };
        if raw_idx.len() == n {
            return Ok(raw.expect("non-empty chunk"));
        }
        let beacon_idx: Vec<u32> = (0..n as u32).filter(|&i| is_beacon[i as usize]).collect();
        let beacons = self
            .beacon_embed
            .to_dtype(self.dtype)?
            .broadcast_as((beacon_idx.len(), self.cfg.hidden_size))?;
        scatter_rows(
            n,
            self.cfg.hidden_size,
            &raw_idx,
            raw.as_ref(),
            &beacon_idx,
            &beacons.contiguous()?,
            self.dtype,
        )
    }

    /// Run one chunk through every layer. Returns the logits `[rows, vocab]` (f32) of `chunk.logits_rows`.
    pub fn forward(&self, chunk: &Chunk, ctx: &mut dyn AttentionContext) -> Result<Option<Tensor>> {
        let n = chunk.ids.len();
        assert_eq!(chunk.is_beacon.len(), n);
        let split = RowSplit::new(chunk.is_beacon);
        let (cos, sin) = rope_tables(&self.inv_freq, chunk.positions)?;
        let mut h = self.embed(chunk.ids, chunk.is_beacon)?; // [n, hidden]
        let cfg = &self.cfg;
        for (li, layer) in self.layers.iter().enumerate() {
            let x = rms_norm(
                &h,
                &layer.input_layernorm,
                cfg.rms_norm_eps,
                chunk.differentiable,
            )?;
            let at = &layer.attn;
            let b = &layer.beacon;
            let q = split.project(&x, &at.q_proj, b.q.as_ref(), self.dtype)?; // [n, heads*d]
            let k = split.project(&x, &at.k_proj, b.k.as_ref(), self.dtype)?; // [n, kv*d]
            let v = split.project(&x, &at.v_proj, b.v.as_ref(), self.dtype)?; // [n, kv*d]
            let q = q
                .reshape((n, cfg.num_heads, cfg.head_dim))?
                .transpose(0, 1)?
                .contiguous()?; // [heads, n, d]
            let k_pre = k
                .reshape((n, cfg.num_kv_heads, cfg.head_dim))?
                .transpose(0, 1)?
                .contiguous()?; // [kv, n, d]
            let v = v
                .reshape((n, cfg.num_kv_heads, cfg.head_dim))?
                .transpose(0, 1)?
                .contiguous()?; // [kv, n, d]
            let q = apply_rope(&q, &cos, &sin, cfg.rope_interleaved, chunk.differentiable)?;
            let k_rot = apply_rope(
                &k_pre,
                &cos,
                &sin,
                cfg.rope_interleaved,
                chunk.differentiable,
            )?;
            let mut segments = ctx.context(li)?; // [(kv, len_i, d)]
            segments.push((k_rot.clone(), v.clone()));
            let a = self.attend(&q, &segments, &chunk.mask, chunk.differentiable)?; // [n, heads*d]
            ctx.commit(li, &k_rot, &v)?;
            let o = split.project(&a, &at.o_proj, b.o.as_ref(), self.dtype)?;
            h = (h + o)?;
            let x = rms_norm(
                &h,
                &layer.post_attention_layernorm,
                cfg.rms_norm_eps,
                chunk.differentiable,
            )?;
            let m = &layer.mlp;
            let gate = m.gate_proj.forward(&x)?;
            let up = m.up_proj.forward(&x)?;
            let y = m.down_proj.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            h = (h + y)?;
        }
        if chunk.logits_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::new(
            chunk
                .logits_rows
                .iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        let h = h.index_select(&rows, 0)?;
        let h = rms_norm(&h, &self.norm, cfg.rms_norm_eps, chunk.differentiable)?;
        Ok(Some(self.lm_head.forward(&h)?.to_dtype(DType::F32)?))
    }

    /// Scaled dot-product attention with GQA over K/V segments (the last one is the chunk itself),
    /// in query blocks. q `[heads, n, d]`, segments `[kv, len_i, d]` → `[n, heads*d]`.
    ///
    /// The differentiable path (training, f32) goes through [`fused_attention`], which keeps no
    /// score-sized tensor for the backward; inference keeps the segment-wise composed kernels.
    fn attend(
        &self,
        q: &Tensor,
        segments: &[(Tensor, Tensor)],
        mask: &Mask,
        differentiable: bool,
    ) -> Result<Tensor> {
        if differentiable && q.dtype() == DType::F32 {
            return attend_fused(q, segments, mask);
        }
        if !differentiable {
            if let Some(o) = cpu_attention::attend(q, segments, mask, self.cfg.num_kv_heads)? {
                return Ok(o);
            }
        }
        // A cache kept in a narrower dtype (f16 K/V) than the compute dtype is widened here.
        if segments
            .iter()
            .any(|(k, v)| k.dtype() != q.dtype() || v.dtype() != q.dtype())
        {
            let widened: Vec<(Tensor, Tensor)> = segments
                .iter()
                .map(|(k, v)| Ok((k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?)))
                .collect::<Result<_>>()?;
            return attend_composed(q, &widened, mask, differentiable, self.cfg.num_kv_heads);
        }
        attend_composed(q, segments, mask, differentiable, self.cfg.num_kv_heads)
    }
}

/// Differentiable attention over the segments, concatenated (`Tensor::cat` carries the gradient
/// back to each segment), through the fused op. q `[heads, n, d]` → `[n, heads*d]`.
pub(crate) fn attend_fused(
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
    let m = match mask {
        Mask::Causal => AttnMask::Causal,
        Mask::Explicit(m) => AttnMask::Explicit(m.clone()),
    };
    let o = fused_attention(q, &k, &v, m)?; // [heads, n, d]
    Ok(o.transpose(0, 1)?.reshape((n, heads * d))?)
}

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

/// Raw vs beacon rows of a chunk, to route each to its projection.
struct RowSplit {
    n: usize,
    raw: Vec<u32>,
    beacon: Vec<u32>,
}

impl RowSplit {
    fn new(is_beacon: &[bool]) -> Self {
        let raw = (0..is_beacon.len() as u32)
            .filter(|&i| !is_beacon[i as usize])
            .collect();
        let beacon = (0..is_beacon.len() as u32)
            .filter(|&i| is_beacon[i as usize])
            .collect();
        RowSplit {
            n: is_beacon.len(),
            raw,
            beacon,
        }
    }

    /// Project raw rows with `base` and beacon rows with `beacon` (or `base` when the layer has no
    /// separate beacon weight). Rows are independent, so projecting the two subsets separately equals
    /// the reference's "compute both and select" (SPEC §1.2) at half the cost.
    fn project(
        &self,
        x: &Tensor,
        base: &Linear,
        beacon: Option<&Linear>,
        dtype: DType,
    ) -> Result<Tensor> {
        let beacon = match beacon {
            Some(b) if !self.beacon.is_empty() => b,
            _ => return base.forward(x),
        };
        if self.raw.is_empty() {
            return beacon.forward(x);
        }
        let dev = Device::Cpu;
        let raw_idx = Tensor::new(self.raw.as_slice(), &dev)?;
        let b_idx = Tensor::new(self.beacon.as_slice(), &dev)?;
        let yr = base.forward(&x.index_select(&raw_idx, 0)?)?;
        let yb = beacon.forward(&x.index_select(&b_idx, 0)?)?;
        let out = yr.dim(1)?;
        scatter_rows(self.n, out, &self.raw, Some(&yr), &self.beacon, &yb, dtype)
    }
}

/// Interleave two row sets back into chunk order → `[n, width]`.
fn scatter_rows(
    n: usize,
    width: usize,
    raw_idx: &[u32],
    raw: Option<&Tensor>,
    beacon_idx: &[u32],
    beacons: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let dev = Device::Cpu;
    let zeros = Tensor::zeros((n, width), dtype, &dev)?;
    let mut out = zeros.index_add(&Tensor::new(beacon_idx, &dev)?, beacons, 0)?;
    if let Some(raw) = raw {
        out = out.index_add(&Tensor::new(raw_idx, &dev)?, raw, 0)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

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
