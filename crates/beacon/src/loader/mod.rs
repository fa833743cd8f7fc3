//! Loading a model: Hugging Face directories (config.json + safetensors, sharded or not, incl. the
//! released beacon checkpoints) and GGUF files, plus separate beacon weights (`beacon.safetensors` +
//! `beacon_config.json`).
//!
//! Loading is a table: each format is a [`source::WeightSource`] and a [`source::NameMap`] (the
//! names *are* the checkpoint naming, SPEC §1.1), one builder assembles the backbone from either,
//! and the beacon parameters are resolved (checkpoint, file, or initialisation) before the
//! [`Model`] is built with them. The memory plan ([`crate::memory_plan`]) decides how matrices are
//! held before any is read.

mod beacons;
mod gguf;
mod safetensors;
mod source;

pub use beacons::{init_beacons, load_beacon_weights, save_beacon_weights};

use crate::config::BeaconConfig;
use crate::config::ModelConfig;
use crate::error::{BeaconError, Result};
use crate::memory_plan::{
    self, Available, Checkpoint, KvNeeds, MemoryPlan, PrefillWeights, Shapes,
};
use crate::model::{Model, Weight};
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// How to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// How a Hugging Face checkpoint's matrices are held: f32 (widened) or bf16 (as most are stored;
    /// products accumulate in f32). Activations are f32 either way. `None`: f32 when the memory plan
    /// fits it, else bf16.
    pub dtype: Option<DType>,
    /// Beacon weights file; default: `beacon.safetensors` beside the model.
    pub beacon_weights: Option<PathBuf>,
    /// Beacon settings file; default: `beacon_config.json` beside the model.
    pub beacon_config: Option<PathBuf>,
    /// How quantized matrices are held for prefill; `None`: the largest choice that fits
    /// ([`crate::memory_plan`]).
    pub prefill_weights: Option<PrefillWeights>,
    /// Use at most this many bytes (besides what the machine reports).
    pub memory_limit: Option<u64>,
    /// The K/V the caller will hold at its peak; `None`: full attention over the native window
    /// (capped at 8K entries) in f16.
    pub kv: Option<KvNeeds>,
    /// Use beacon weights initialised from the backbone even if trained ones exist.
    pub untrained_beacons: bool,
}

impl LoadOptions {
    /// The memory plan for a checkpoint of these shapes (see [`crate::memory_plan::plan`]).
    fn plan(&self, checkpoint: &Checkpoint, cfg: &ModelConfig) -> Result<MemoryPlan> {
        let kv = self.kv.clone().unwrap_or_else(|| KvNeeds {
            entries: cfg.max_position_embeddings.min(8192),
            dtype_bytes: 2,
            label: "full attention over the native window, f16".into(),
        });
        let shapes = Shapes {
            layers: cfg.num_layers,
            hidden: cfg.hidden_size,
            kv_dim: cfg.kv_dim(),
            ffn: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            heads: cfg.num_heads,
        };
        let requested = match (checkpoint, self.dtype) {
            (Checkpoint::Hf { .. }, Some(DType::F32)) => Some(PrefillWeights::Dense),
            (Checkpoint::Hf { .. }, Some(DType::BF16)) => Some(PrefillWeights::Bf16),
            (Checkpoint::Hf { .. }, Some(other)) => {
                return Err(BeaconError::invalid(format!(
                    "--dtype: expected f32 or bf16, found {other:?}"
                )))
            }
            _ => self.prefill_weights,
        };
        if let (Checkpoint::Hf { .. }, Some(d), Some(p)) =
            (checkpoint, self.dtype, self.prefill_weights)
        {
            if requested != Some(p) {
                return Err(BeaconError::invalid(format!(
                    "--dtype {d:?} and --prefill-weights {} disagree (a Hugging Face checkpoint's \
                     matrices are held one way for both)",
                    p.name()
                )));
            }
        }
        memory_plan::plan(
            checkpoint,
            shapes,
            &kv,
            Available::probe(self.memory_limit),
            requested,
            512,
        )
    }
}

/// Where the beacon parameters came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum BeaconSource {
    /// In the checkpoint itself (released beacon models).
    Checkpoint,
    /// A separate `beacon.safetensors`.
    File(PathBuf),
    /// Copied from the backbone (SPEC §1.3): untrained.
    Initialised,
}

pub struct Loaded {
    pub model: Model,
    pub beacon: BeaconConfig,
    pub tokenizer: Option<Tokenizer>,
    pub beacon_source: BeaconSource,
    /// Identifies backbone + beacon weights (for saved contexts): hash of file sizes/names and beacon tensors.
    pub fingerprint: String,
    pub path: PathBuf,
    /// How the weights are held and what that costs (printed by the front ends).
    pub plan: MemoryPlan,
}

impl Loaded {
    /// Ids that end a generation ([`crate::generate::stop_ids`]), as every front end stops on.
    pub fn stop_ids(&self) -> Vec<u32> {
        crate::generate::stop_ids(&self.model.cfg.eos_token_ids, self.tokenizer.as_ref())
    }
}

/// Where this repository ships beacon weights and settings for the default model
/// (`models/smollm2-135m-instruct/`, resolved at build time).
pub fn shipped_default_beacons() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m-instruct")
}

/// Load `model`, or the default model (fetched on first use) with the beacon weights and settings
/// shipped for it, unless `opts` names others. Every front end (run, compress, serve, eval) loads
/// through here, so they agree on the weights and thus on saved-context fingerprints.
pub fn load_model(model: Option<&Path>, opts: &LoadOptions) -> Result<Loaded> {
    match model {
        Some(p) => load(p, opts),
        None => {
            let path = crate::fetch::default_model_path()?;
            let mut opts = opts.clone();
            let shipped = shipped_default_beacons();
            if opts.beacon_config.is_none()
                && beacons::config_beside_weights(&opts).is_none()
                && shipped.join("beacon_config.json").exists()
            {
                opts.beacon_config = Some(shipped.join("beacon_config.json"));
            }
            if opts.beacon_weights.is_none()
                && !opts.untrained_beacons
                && shipped.join("beacon.safetensors").exists()
            {
                opts.beacon_weights = Some(shipped.join("beacon.safetensors"));
            }
            load(&path, &opts)
        }
    }
}

/// Load a model from a Hugging Face directory, a `config.json`'s directory, or a `.gguf` file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    if path.is_dir() {
        safetensors::load_hf_dir(path, opts)
    } else if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
        gguf::load_gguf(path, opts)
    } else if !path.exists() {
        Err(BeaconError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model not found"),
        ))
    } else {
        Err(BeaconError::invalid(format!(
            "{}: expected a Hugging Face model directory or a .gguf file",
            path.display()
        )))
    }
}

/// A short identity of backbone files (name + size + first MiB) and beacon parameters (values).
fn fingerprint(files: &[PathBuf], model: &Model) -> Result<String> {
    use std::io::Read;
    let mut h = Sha256::new();
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| BeaconError::io(f, e))?;
        h.update(meta.len().to_le_bytes());
        let mut buf = vec![0u8; 1 << 20];
        let mut fh = std::fs::File::open(f).map_err(|e| BeaconError::io(f, e))?;
        let n = fh.read(&mut buf).map_err(|e| BeaconError::io(f, e))?;
        h.update(&buf[..n]);
    }
    let mut add = |t: &Tensor| -> Result<()> {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for x in v.iter().step_by(97) {
            h.update(x.to_le_bytes());
        }
        Ok(())
    };
    add(&model.beacon_embed)?;
    for layer in &model.layers {
        for l in [
            &layer.beacon.q,
            &layer.beacon.k,
            &layer.beacon.v,
            &layer.beacon.o,
        ]
        .into_iter()
        .flatten()
        {
            if let Weight::Dense(w) = &l.weight {
                add(w)?;
            }
        }
    }
    let d = h.finalize();
    Ok(d.iter().take(12).map(|b| format!("{b:02x}")).collect())
}
