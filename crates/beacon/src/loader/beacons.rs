//! Beacon parameters: read under their released names (from a checkpoint or a
//! `beacon.safetensors`), initialised from the backbone (SPEC §1.3), found beside a model, saved.

use super::safetensors::{SafeFiles, SafeSource};
use super::source::{beacon_proj_name, linear, BEACON_EMBED};
use super::{BeaconSource, LoadOptions};
use crate::config::{BeaconConfig, BeaconKeys, BeaconParams, ModelConfig};
use crate::error::{BeaconError, Result};
use crate::model::{Backbone, BeaconProjections, Beacons, Embedding, Layer, Model, Weight};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The dtype beacon tokens' embedding is held in: the activations' (the model computes in f32).
const EMBED_DTYPE: DType = DType::F32;

/// Beacon settings and weights files for a model, if any: the flags' first, else the candidates
/// that exist, in order.
pub(super) struct BeaconFiles {
    pub config: Option<PathBuf>,
    pub weights: Option<PathBuf>,
}

impl BeaconFiles {
    /// `beacon_config.json` / `beacon.safetensors` in `dir`.
    pub(super) fn beside(dir: &Path, opts: &LoadOptions) -> Self {
        Self::find(
            opts,
            &[dir.join("beacon_config.json")],
            &[dir.join("beacon.safetensors")],
        )
    }

    pub(super) fn find(opts: &LoadOptions, configs: &[PathBuf], weights: &[PathBuf]) -> Self {
        let first = |c: &[PathBuf]| c.iter().find(|p| p.exists()).cloned();
        BeaconFiles {
            config: opts
                .beacon_config
                .clone()
                .or_else(|| config_beside_weights(opts))
                .or_else(|| first(configs)),
            weights: match opts.untrained_beacons {
                true => None,
                false => opts.beacon_weights.clone().or_else(|| first(weights)),
            },
        }
    }
}

/// The `beacon_config.json` beside a weights file given by flag (`--beacon runs/x/beacon.safetensors`):
/// a trainer's export writes the two together, and its `beacon_param` says which projections the
/// weights hold.
pub(super) fn config_beside_weights(opts: &LoadOptions) -> Option<PathBuf> {
    let w = opts.beacon_weights.as_ref()?;
    let c = w.parent()?.join("beacon_config.json");
    c.exists().then_some(c)
}

/// Whether the file holds beacon projection `which` (judged by layer 0; `read` checks every layer).
fn holds_projection(st: &SafeFiles, which: &str) -> bool {
    st.contains(&format!("{}.weight", beacon_proj_name(0, which)))
}

/// `model.beacon_embed_tokens.weight` and `model.layers.{i}.self_attn.beacon_{q,k,v,o}_proj.*`,
/// the projections in `params` (matrices in `matrix_dtype`, like the backbone's dense ones).
pub(super) fn read(
    st: &SafeFiles,
    cfg: &ModelConfig,
    params: BeaconParams,
    matrix_dtype: DType,
) -> Result<Beacons> {
    let (h, q, kv) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
    // Trained projections the settings do not list would be silently replaced by the backbone's
    // (a q,k,v,o file read with q,k,v settings): refuse, naming both.
    for (which, listed) in params.each() {
        if !listed && holds_projection(st, which) {
            return Err(BeaconError::config(
                &st.label(),
                "beacon_param",
                &format!(
                    "{} (the beacon settings in use); the file also holds `{}.weight`: use the \
                     beacon_config.json that came with it (--beacon-config)",
                    params.names().join(","),
                    beacon_proj_name(0, which)
                ),
                &format!("beacon_{which}_proj"),
            ));
        }
    }
    let embed = st.tensor(BEACON_EMBED, EMBED_DTYPE, &[1, h])?;
    // The backbone's own reader: matrices in `matrix_dtype`, biases f32, shapes checked.
    let mut src = SafeSource {
        files: st,
        matrix_dtype,
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let mut get = |want: bool, which: &str, out: usize, inp: usize, bias: bool| {
            want.then(|| linear(&mut src, &beacon_proj_name(i, which), out, inp, bias))
                .transpose()
        };
        layers.push(BeaconProjections {
            q: get(params.q, "q", q, h, cfg.qkv_bias)?,
            k: get(params.k, "k", kv, h, cfg.qkv_bias)?,
            v: get(params.v, "v", kv, h, cfg.qkv_bias)?,
            o: get(params.o, "o", h, q, false)?,
        });
    }
    Ok(Beacons { embed, layers })
}

/// SPEC §1.3: beacon embedding ← embedding of eos (or bos); beacon projections ← the backbone's.
/// Quantized backbone weights are shared, not copied: an untrained beacon projection *is* the
/// backbone projection.
fn initial(
    cfg: &ModelConfig,
    embed_tokens: &Embedding,
    layers: &[Layer],
    beacon: &BeaconConfig,
) -> Result<Beacons> {
    let id = if beacon.embed_init == "bos" {
        cfg.bos_token_id
    } else {
        cfg.eos_token_ids.first().copied()
    }
    .ok_or_else(|| {
        BeaconError::config(
            "model config",
            &format!("{}_token_id", beacon.embed_init),
            "a token id to initialise the beacon embedding",
            "none",
        )
    })?;
    let embed = embed_tokens.row(id)?.to_dtype(EMBED_DTYPE)?.unsqueeze(0)?;
    let p = beacon.params;
    let layers = layers
        .iter()
        .map(|layer| {
            let a = &layer.attn;
            BeaconProjections {
                q: p.q.then(|| a.q_proj.clone()),
                k: p.k.then(|| a.k_proj.clone()),
                v: p.v.then(|| a.v_proj.clone()),
                o: p.o.then(|| a.o_proj.clone()),
            }
        })
        .collect();
    Ok(Beacons { embed, layers })
}

/// Beacons for a backbone whose checkpoint has none: the settings file (if any) applied over
/// `beacon`, then the weights file, else the initialisation (with a warning unless asked for).
pub(super) fn resolve(
    cfg: &ModelConfig,
    backbone: &Backbone,
    beacon: &mut BeaconConfig,
    files: BeaconFiles,
    opts: &LoadOptions,
    matrix_dtype: DType,
) -> Result<(Beacons, BeaconSource)> {
    if let Some(p) = &files.config {
        *beacon = BeaconKeys::from_file(p)?.resolve(beacon.clone(), &p.display().to_string())?;
    }
    if beacon.params == BeaconParams::default() {
        // A backbone without beacon settings gets the recipes' q,k,v.
        beacon.params = BeaconParams {
            q: true,
            k: true,
            v: true,
            o: false,
        };
    }
    match files.weights {
        Some(p) => {
            let st = SafeFiles::open(std::slice::from_ref(&p))?;
            let b = read(&st, cfg, beacon.params, matrix_dtype)?;
            Ok((b, BeaconSource::File(p)))
        }
        None => {
            let b = initial(cfg, &backbone.embed_tokens, &backbone.layers, beacon)?;
            if !opts.untrained_beacons {
                tracing::warn!(
                    "no beacon weights found: beacons initialised from the backbone (untrained)"
                );
            }
            Ok((b, BeaconSource::Initialised))
        }
    }
}

/// Beacon projections are held like the backbone's dense matrices (bf16 for a bf16 checkpoint).
fn matrix_dtype_of(model: &Model) -> DType {
    match model.layers.first().map(|l| &l.attn.q_proj.weight) {
        Some(Weight::Dense(w)) if w.dtype() == DType::BF16 => DType::BF16,
        _ => model.dtype,
    }
}

/// Replace a model's beacon parameters with those of a `beacon.safetensors` (released names), e.g. to
/// warm-start training from shipped weights. Every projection in `params` that the file holds (in
/// layer 0; then in every layer, checked) is read; one the file lacks altogether keeps the model's
/// current value, so a warm start can add a projection (say `o` to a q,k,v file) at its
/// initialisation. Returns the projections kept that way.
pub fn load_beacon_weights(
    model: &mut Model,
    path: &Path,
    params: BeaconParams,
) -> Result<BeaconParams> {
    let st = SafeFiles::open(&[path.to_path_buf()])?;
    let present = params.filter(|which| holds_projection(&st, which));
    let kept = params.filter(|which| !holds_projection(&st, which));
    let mut b = read(&st, &model.cfg, present, matrix_dtype_of(model))?;
    for (read_layer, current) in b.layers.iter_mut().zip(&model.layers) {
        let c = &current.beacon;
        for (slot, cur, keep) in [
            (&mut read_layer.q, &c.q, kept.q),
            (&mut read_layer.k, &c.k, kept.k),
            (&mut read_layer.v, &c.v, kept.v),
            (&mut read_layer.o, &c.o, kept.o),
        ] {
            if keep {
                slot.clone_from(cur);
            }
        }
    }
    model.set_beacons(b)?;
    Ok(kept)
}

/// Reset a model's beacon parameters to their initialisation from the backbone (SPEC §1.3).
pub fn init_beacons(model: &mut Model, beacon: &BeaconConfig) -> Result<()> {
    let b = initial(&model.cfg, &model.embed_tokens, &model.layers, beacon)?;
    model.set_beacons(b)
}

/// Save beacon parameters in the released tensor naming (for a backbone that has none).
pub fn save_beacon_weights(model: &Model, path: &Path, dtype: DType) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    map.insert(BEACON_EMBED.into(), model.beacon_embed.to_dtype(dtype)?);
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, l) in [
            ("q", &layer.beacon.q),
            ("k", &layer.beacon.k),
            ("v", &layer.beacon.v),
            ("o", &layer.beacon.o),
        ] {
            if let Some(l) = l {
                let p = beacon_proj_name(i, name);
                map.insert(format!("{p}.weight"), l.weight.to_dense()?.to_dtype(dtype)?);
                if let Some(b) = &l.bias {
                    map.insert(format!("{p}.bias"), b.to_dtype(dtype)?);
                }
            }
        }
    }
    crate::util::atomic_write_with(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))
}
