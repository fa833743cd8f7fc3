//! The decoder backbone (Llama / Qwen2 / Mistral) with Activation Beacon's extra projections.
//!
//! One immutable [`Model`] serves any number of conversations: the K/V a chunk attends to lives
//! outside it, behind [`AttentionContext`], so the inference engine can keep preallocated rotated
//! caches while the trainer keeps everything in the autograd graph.
//!
//! A chunk is a run of entries (raw tokens and beacon tokens) fed in one forward. Beacon rows take
//! `beacon_embed_tokens` and the `beacon_{q,k,v,o}_proj` weights (SPEC §1.2); everything else
//! (norms, MLP, lm_head, RoPE) is shared with the backbone.

mod frozen;
mod rope;
mod weights;

pub use frozen::frozen_matmul;
pub use rope::{apply_rope, rope_tables};
pub use weights::{bf16_kernel_name, Embedding, Linear, Weight, DENSE_MIN_ROWS};

use crate::attention::{self, Mask};
use crate::config::ModelConfig;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use frozen::rms_norm;

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

/// A model's beacon parameters (SPEC §1.2): the embedding row every beacon token shares and each
/// layer's beacon projections, as read from a checkpoint or a `beacon.safetensors`, or initialised
/// from the backbone (SPEC §1.3).
#[derive(Clone)]
pub struct Beacons {
    /// `[1, hidden]`.
    pub embed: Tensor,
    /// One per layer.
    pub layers: Vec<BeaconProjections>,
}

/// The backbone's parts, as a loader reads them (everything but the beacon parameters).
pub struct Backbone {
    pub embed_tokens: Embedding,
    /// Layers whose `beacon` projections are still the backbone's (all `None`).
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
}

impl Model {
    /// The backbone with its beacon parameters attached; `dtype` is the activations' dtype.
    pub fn new(
        cfg: ModelConfig,
        dtype: DType,
        backbone: Backbone,
        beacons: Beacons,
    ) -> Result<Self> {
        let d = cfg.head_dim;
        let inv_freq = (0..d / 2)
            .map(|i| 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        let Backbone {
            embed_tokens,
            layers,
            norm,
            lm_head,
        } = backbone;
        let mut model = Model {
            cfg,
            dtype,
            embed_tokens,
            beacon_embed: beacons.embed.clone(),
            layers,
            norm,
            lm_head,
            inv_freq,
        };
        model.set_beacons(beacons)?;
        Ok(model)
    }

    /// Replace the beacon parameters (a warm start from a file, or the initialisation).
    pub fn set_beacons(&mut self, beacons: Beacons) -> Result<()> {
        let h = self.cfg.hidden_size;
        if beacons.layers.len() != self.layers.len() || beacons.embed.dims() != [1, h] {
            return Err(crate::error::BeaconError::invalid(format!(
                "beacon parameters for {} layers with a {:?} embedding; the model has {} layers \
                 and hidden size {h}",
                beacons.layers.len(),
                beacons.embed.dims(),
                self.layers.len()
            )));
        }
        self.beacon_embed = beacons.embed;
        for (layer, b) in self.layers.iter_mut().zip(beacons.layers) {
            layer.beacon = b;
        }
        Ok(())
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
            let a = attention::attend(
                &q,
                &segments,
                &chunk.mask,
                chunk.differentiable,
                cfg.num_kv_heads,
            )?; // [n, heads*d]
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
