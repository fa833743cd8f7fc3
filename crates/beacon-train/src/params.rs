//! The trainable beacon parameters: the beacon embedding and the beacon projections of `beacon_param`
//! (SPEC §1.1), as candle variables. Everything else stays frozen.
//!
//! Two model views share the variables' storage: `train` holds the variables themselves (its forward
//! builds an autograd graph), `plain` holds detached aliases (no graph, inference kernels). An
//! optimiser update (`Var::set`, in place) is therefore seen by both at once.
//!
//! With `rank = Some(r)` a beacon projection is `W_backbone + A·B` (A `[out, r]` zero-initialised,
//! B `[r, in]` small random), our extension: far fewer trained values, and the export merges it back
//! into the released full-matrix tensor names.

use anyhow::{bail, Result};
use beacon::config::BeaconParams;
use beacon::model::{Linear, Model, Weight};
use beacon::schedule::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};

/// One named trainable tensor.
pub struct Param {
    /// Checkpoint name: the released tensor name, or `<projection>.lora_a` / `.lora_b`.
    pub name: String,
    pub var: Var,
}

pub struct TrainableModel {
    pub train: Model,
    pub plain: Model,
    pub params: Vec<Param>,
    pub rank: Option<usize>,
}

impl TrainableModel {
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    pub fn num_values(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.var.as_tensor().elem_count())
            .sum()
    }
}

/// A frozen dense copy of a quantized weight's matrix, kept so training and the fast prefill path use
/// GEMM (the quantized kernels have no backward).
fn ensure_dense(w: &mut Weight) -> Result<()> {
    if let Weight::Quantized { qtensor, dense, .. } = w {
        if dense.is_none() {
            *dense = Some(qtensor.dequantize(&Device::Cpu)?);
        }
    }
    Ok(())
}

fn small_random(shape: (usize, usize), std: f32, rng: &mut SplitMix64) -> Result<Tensor> {
    // Uniform in [-√3σ, √3σ] (variance σ²): enough for a symmetry-breaking init.
    let a = 3f32.sqrt() * std;
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * a)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The beacon projection `key` (q, k, v or o) of layer `layer`.
fn slot<'a>(m: &'a mut Model, layer: usize, key: &str) -> &'a mut Option<Linear> {
    let b = &mut m.layers[layer].beacon;
    match key {
        "q" => &mut b.q,
        "k" => &mut b.k,
        "v" => &mut b.v,
        _ => &mut b.o,
    }
}

/// Make the beacon parameters of `model` trainable. `model` must already have beacon projections
/// (loaded from a file, or `init_beacons` from the backbone) for every projection in `which`.
pub fn make_trainable(
    mut model: Model,
    which: BeaconParams,
    rank: Option<usize>,
    seed: u64,
) -> Result<TrainableModel> {
    if model.dtype != DType::F32 {
        bail!(
            "training runs in f32 (the model was loaded as {:?})",
            model.dtype
        );
    }
    ensure_dense(&mut model.lm_head.weight)?;
    let mut train = model.clone();
    let mut plain = model;
    let mut params = Vec::new();
    let mut rng = SplitMix64(seed ^ 0x5eed_1a7e);

    let embed = Var::from_tensor(&plain.beacon_embed.to_dtype(DType::F32)?)?;
    train.beacon_embed = embed.as_tensor().clone();
    plain.beacon_embed = embed.as_tensor().detach();
    params.push(Param {
        name: "model.beacon_embed_tokens.weight".into(),
        var: embed,
    });

    for i in 0..plain.layers.len() {
        let prefix = format!("model.layers.{i}.self_attn");
        for (key, on) in [
            ("q", which.q),
            ("k", which.k),
            ("v", which.v),
            ("o", which.o),
        ] {
            if !on {
                continue;
            }
            let current = slot(&mut plain, i, key).clone();
            let Some(lin) = current else {
                bail!("layer {i} has no beacon_{key}_proj to train (initialise the beacons first)");
            };
            let name = format!("{prefix}.beacon_{key}_proj");
            let bias_var = match &lin.bias {
                Some(b) => {
                    let v = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
                    Some(v)
                }
                None => None,
            };
            let (train_w, plain_w) = match rank {
                None => {
                    let w = Var::from_tensor(&lin.weight.to_dense()?.to_dtype(DType::F32)?)?;
                    let pair = (
                        Weight::Dense(w.as_tensor().clone()),
                        Weight::Dense(w.as_tensor().detach()),
                    );
                    params.push(Param {
                        name: format!("{name}.weight"),
                        var: w,
                    });
                    pair
                }
                Some(r) => {
                    let mut base = match &lin.weight {
                        Weight::LowRank { base, .. } => (**base).clone(),
                        w => w.clone(),
                    };
                    ensure_dense(&mut base)?;
                    let (out, inp) = base.dims();
                    let a = Var::from_tensor(&Tensor::zeros((out, r), DType::F32, &Device::Cpu)?)?;
                    let b = Var::from_tensor(&small_random(
                        (r, inp),
                        1.0 / (inp as f32).sqrt(),
                        &mut rng,
                    )?)?;
                    let pair = (
                        Weight::LowRank {
                            base: Box::new(base.clone()),
                            a: a.as_tensor().clone(),
                            b: b.as_tensor().clone(),
                        },
                        Weight::LowRank {
                            base: Box::new(base),
                            a: a.as_tensor().detach(),
                            b: b.as_tensor().detach(),
                        },
                    );
                    params.push(Param {
                        name: format!("{name}.lora_a"),
                        var: a,
                    });
                    params.push(Param {
                        name: format!("{name}.lora_b"),
                        var: b,
                    });
                    pair
                }
            };
            let (train_b, plain_b) = match &bias_var {
                Some(v) => (Some(v.as_tensor().clone()), Some(v.as_tensor().detach())),
                None => (None, None),
            };
            if let Some(v) = bias_var {
                params.push(Param {
                    name: format!("{name}.bias"),
                    var: v,
                });
            }
            *slot(&mut train, i, key) = Some(Linear {
                weight: train_w,
                bias: train_b,
            });
            *slot(&mut plain, i, key) = Some(Linear {
                weight: plain_w,
                bias: plain_b,
            });
        }
    }
    Ok(TrainableModel {
        train,
        plain,
        params,
        rank,
    })
}
