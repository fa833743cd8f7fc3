//! What every checkpoint format provides, and the one builder that turns it into a backbone.
//!
//! A format is a [`WeightSource`] (how a named tensor is read and held) plus a [`NameMap`] (what
//! its tensors are called); [`build_backbone`] reads the same parts in the same order from any of
//! them, so a layer is assembled in one place whatever file it came from.

use crate::config::ModelConfig;
use crate::error::{BeaconError, Result};
use crate::model::{Attention, Backbone, BeaconProjections, Embedding, Layer, Linear, Mlp, Weight};
use candle_core::quantized::QMatMul;
use candle_core::Tensor;
use std::sync::Arc;

/// A checkpoint's tensors, read by name and held as the memory plan decided.
pub(super) trait WeightSource {
    /// The file(s), for error messages.
    fn label(&self) -> String;
    fn contains(&self, name: &str) -> bool;
    /// A projection matrix `[out, in]`.
    fn matrix(&mut self, name: &str, shape: [usize; 2]) -> Result<Weight>;
    /// A vector (norm weight, bias), f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor>;
    /// The token embedding table `[vocab, hidden]`.
    fn embedding(&mut self, name: &str, shape: [usize; 2]) -> Result<Embedding>;
    /// An LM head stored apart from the embedding `[vocab, hidden]` (it only ever sees a few rows).
    fn head(&mut self, name: &str, shape: [usize; 2]) -> Result<Weight>;
}

/// What a format calls the backbone's tensors. Layer tensors are `{layer(i)}.{part}.weight` (and
/// `.bias`).
pub(super) struct NameMap {
    pub embed: &'static str,
    pub norm: &'static str,
    pub lm_head: &'static str,
    pub layer: fn(usize) -> String,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub o: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    pub attn_norm: &'static str,
    pub ffn_norm: &'static str,
}

/// Hugging Face (`transformers`) names, also those of the released beacon checkpoints.
pub(super) const HF_NAMES: NameMap = NameMap {
    embed: "model.embed_tokens.weight",
    norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layer: |i| format!("model.layers.{i}"),
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.o_proj",
    gate: "mlp.gate_proj",
    up: "mlp.up_proj",
    down: "mlp.down_proj",
    attn_norm: "input_layernorm",
    ffn_norm: "post_attention_layernorm",
};

/// llama.cpp's GGUF names.
pub(super) const GGUF_NAMES: NameMap = NameMap {
    embed: "token_embd.weight",
    norm: "output_norm.weight",
    lm_head: "output.weight",
    layer: |i| format!("blk.{i}"),
    q: "attn_q",
    k: "attn_k",
    v: "attn_v",
    o: "attn_output",
    gate: "ffn_gate",
    up: "ffn_up",
    down: "ffn_down",
    attn_norm: "attn_norm",
    ffn_norm: "ffn_norm",
};

/// The released names of the beacon parameters (safetensors: checkpoints and `beacon.safetensors`).
pub(super) const BEACON_EMBED: &str = "model.beacon_embed_tokens.weight";

/// `model.layers.{i}.self_attn.beacon_{which}_proj`.
pub(super) fn beacon_proj_name(layer: usize, which: &str) -> String {
    format!("model.layers.{layer}.self_attn.beacon_{which}_proj")
}

/// `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias` `[out]`.
pub(super) fn linear(
    src: &mut dyn WeightSource,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<Linear> {
    let weight = src.matrix(&format!("{prefix}.weight"), [out, inp])?;
    let bias = match bias {
        true => Some(src.vector(&format!("{prefix}.bias"), out)?),
        false => None,
    };
    Ok(Linear { weight, bias })
}

/// Embedding, layers (beacon projections still the backbone's), final norm and LM head, in that
/// order (the order peak memory was measured with).
pub(super) fn build_backbone(
    src: &mut dyn WeightSource,
    names: &NameMap,
    cfg: &ModelConfig,
) -> Result<Backbone> {
    let (h, q, kv, ff) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    let embed_tokens = src.embedding(names.embed, [cfg.vocab_size, h])?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = (names.layer)(i);
        let part = |name: &str| format!("{p}.{name}");
        let attn = Attention {
            q_proj: linear(src, &part(names.q), q, h, cfg.qkv_bias)?,
            k_proj: linear(src, &part(names.k), kv, h, cfg.qkv_bias)?,
            v_proj: linear(src, &part(names.v), kv, h, cfg.qkv_bias)?,
            o_proj: linear(src, &part(names.o), h, q, false)?,
        };
        let mlp = Mlp {
            gate_proj: linear(src, &part(names.gate), ff, h, false)?,
            up_proj: linear(src, &part(names.up), ff, h, false)?,
            down_proj: linear(src, &part(names.down), h, ff, false)?,
        };
        layers.push(Layer {
            input_layernorm: src.vector(&format!("{p}.{}.weight", names.attn_norm), h)?,
            attn,
            beacon: BeaconProjections::default(),
            post_attention_layernorm: src.vector(&format!("{p}.{}.weight", names.ffn_norm), h)?,
            mlp,
        });
    }
    let norm = src.vector(names.norm, h)?;
    let head = if src.contains(names.lm_head) {
        src.head(names.lm_head, [cfg.vocab_size, h])?
    } else if cfg.tie_word_embeddings {
        tied_head(&embed_tokens)?
    } else {
        return Err(BeaconError::MissingTensor {
            file: src.label(),
            name: names.lm_head.into(),
        });
    };
    Ok(Backbone {
        embed_tokens,
        layers,
        norm,
        lm_head: Linear {
            weight: head,
            bias: None,
        },
    })
}

/// The LM head that shares the embedding's table (a quantized table stays quantized: the head
/// sees a few rows at a time).
fn tied_head(embed: &Embedding) -> Result<Weight> {
    Ok(match embed {
        Embedding::Dense(t) => Weight::Dense(t.clone()),
        Embedding::Quantized(q) => Weight::Quantized {
            q: Arc::new(QMatMul::from_arc(q.clone())?),
            qtensor: q.clone(),
            dense: None,
            scratch: false,
        },
    })
}

pub(super) fn require(
    t: Option<Tensor>,
    file: &str,
    name: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let t = t.ok_or_else(|| BeaconError::MissingTensor {
        file: file.into(),
        name: name.into(),
    })?;
    check_shape(t.dims(), file, name, shape)?;
    Ok(t)
}

pub(super) fn check_shape(found: &[usize], file: &str, name: &str, shape: &[usize]) -> Result<()> {
    if found != shape {
        return Err(BeaconError::Shape {
            file: file.into(),
            name: name.into(),
            expected: shape.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}
