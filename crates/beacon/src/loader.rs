//! Loading a model: Hugging Face directories (config.json + safetensors, sharded or not, incl. the
//! released beacon checkpoints) and GGUF files, plus separate beacon weights (`beacon.safetensors` +
//! `beacon_config.json`). The tensor paths in here *are* the checkpoint naming (SPEC §1.1).

use crate::config::{Arch, BeaconConfig, BeaconKeys, BeaconParams, HfConfig, ModelConfig};
use crate::error::{BeaconError, Result};
use crate::memory_plan::{
    self, Available, Checkpoint, KvNeeds, MemoryPlan, PrefillWeights, Shapes, StoredTensor,
};
use crate::model::{Attention, BeaconProjections, Embedding, Layer, Linear, Mlp, Model, Weight};
use crate::tokenizer::Tokenizer;
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
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

/// A named tensor source (safetensors files or a GGUF).
trait Tensors {
    fn file(&self) -> String;
    fn names(&self) -> Vec<String>;
    fn get_dense(&self, name: &str, dtype: DType) -> Result<Option<Tensor>>;
}

/// Safetensors files read tensor by tensor (positioned reads into the tensor's own buffer): no mapping
/// stays resident beside the loaded weights, so peak memory is what is kept plus one tensor, shard after
/// shard (a mapped 15 GB checkpoint would count its touched pages on top of the copies).
struct SafeFiles {
    label: String,
    files: Vec<(PathBuf, std::fs::File)>,
    /// name → (file index, dtype, dims, absolute byte range)
    index: HashMap<String, (usize, DType, Vec<usize>, std::ops::Range<u64>)>,
    names: Vec<String>,
}

/// A tensor's header entry: name, dtype, dims, absolute byte range in the file.
type HeaderEntry = (String, DType, Vec<usize>, std::ops::Range<u64>);

/// One safetensors header's entries, and where the data section starts.
fn safetensors_header(path: &Path, f: &mut std::fs::File) -> Result<(Vec<HeaderEntry>, u64)> {
    use std::io::Read;
    let file = path.display().to_string();
    let parse = |message: String| BeaconError::Parse {
        path: file.clone(),
        message,
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| BeaconError::io(path, e))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(|e| BeaconError::io(path, e))?.len();
    if n > 100 << 20 || 8 + n > size {
        return Err(parse(format!(
            "header length {n} does not fit a file of {size} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| BeaconError::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| parse(format!("header: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| parse("header is not an object".into()))?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("I64") => DType::I64,
            Some("U8") => DType::U8,
            Some("U32") => DType::U32,
            other => {
                return Err(parse(format!(
                    "tensor `{name}`: unsupported dtype {other:?}"
                )))
            }
        };
        let dims: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .ok_or_else(|| parse(format!("tensor `{name}`: no shape")))?;
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
            .unwrap_or_default();
        let want = dims.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if offs.len() != 2
            || offs[1] < offs[0]
            || offs[1] - offs[0] != want
            || data_start + offs[1] > size
        {
            return Err(parse(format!(
                "tensor `{name}`: data_offsets {offs:?} do not hold {dims:?} {dtype:?} inside the file"
            )));
        }
        out.push((
            name.clone(),
            dtype,
            dims,
            data_start + offs[0]..data_start + offs[1],
        ));
    }
    Ok((out, data_start))
}

impl SafeFiles {
    fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        let mut names = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            let mut f = std::fs::File::open(p).map_err(|e| BeaconError::io(p, e))?;
            let (tensors, _) = safetensors_header(p, &mut f)?;
            for (name, dtype, dims, range) in tensors {
                names.push(name.clone());
                index.insert(name, (i, dtype, dims, range));
            }
            files.push((p.clone(), f));
        }
        let label = match paths {
            [one] => one.display().to_string(),
            many => format!("{} (+{} shards)", many[0].display(), many.len() - 1),
        };
        Ok(SafeFiles {
            label,
            files,
            index,
            names,
        })
    }

    /// Every tensor's header entry, for the memory plan.
    fn stored(&self) -> Vec<StoredTensor> {
        let mut v: Vec<StoredTensor> = self
            .index
            .iter()
            .map(|(name, (_, _, dims, range))| StoredTensor {
                name: name.clone(),
                dims: dims.clone(),
                bytes: range.end - range.start,
                is_matrix: dims.len() == 2 && name.ends_with("proj.weight")
                    || name == "lm_head.weight",
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

impl Tensors for SafeFiles {
    fn file(&self) -> String {
        self.label.clone()
    }
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn get_dense(&self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        use std::os::unix::fs::FileExt;
        let Some((i, stored, dims, range)) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, f) = &self.files[*i];
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        f.read_exact_at(&mut bytes, range.start)
            .map_err(|e| BeaconError::io(path, e))?;
        let t = Tensor::from_raw_buffer(&bytes, *stored, dims, &Device::Cpu)?;
        drop(bytes);
        Ok(Some(if *stored == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        }))
    }
}

fn require(t: Option<Tensor>, file: &str, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = t.ok_or_else(|| BeaconError::MissingTensor {
        file: file.into(),
        name: name.into(),
    })?;
    check_shape(&t, file, name, shape)?;
    Ok(t)
}

fn check_shape(t: &Tensor, file: &str, name: &str, shape: &[usize]) -> Result<()> {
    if t.dims() != shape {
        return Err(BeaconError::Shape {
            file: file.into(),
            name: name.into(),
            expected: shape.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(())
}

fn dense_linear(
    src: &dyn Tensors,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
    dtype: DType,
) -> Result<Linear> {
    let file = src.file();
    let wname = format!("{prefix}.weight");
    let w = require(src.get_dense(&wname, dtype)?, &file, &wname, &[out, inp])?;
    let b = if bias {
        let bname = format!("{prefix}.bias");
        Some(require(
            src.get_dense(&bname, DType::F32)?,
            &file,
            &bname,
            &[out],
        )?)
    } else {
        None
    };
    Ok(Linear {
        weight: Weight::Dense(w),
        bias: b,
    })
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
            if opts.beacon_config.is_none() && shipped.join("beacon_config.json").exists() {
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
        load_hf_dir(path, opts)
    } else if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
        load_gguf(path, opts)
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

/// The safetensors files of an HF directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`, or every `model-*.safetensors`.
fn hf_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| BeaconError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| BeaconError::Parse {
            path: index.display().to_string(),
            message: e.to_string(),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                BeaconError::config(
                    &index.display().to_string(),
                    "weight_map",
                    "an object of tensor → shard",
                    "none",
                )
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| BeaconError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("model-") && n.ends_with(".safetensors")
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(BeaconError::invalid(format!(
            "{}: no model.safetensors, model.safetensors.index.json or model-*.safetensors",
            dir.display()
        )));
    }
    Ok(shards)
}

fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let hf = HfConfig::from_file(&cfg_path)?;
    let source = cfg_path.display().to_string();
    let mut cfg = hf.model_config(&source)?;
    // generation_config.json's eos ids (may be a list) override config.json's.
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let text = std::fs::read_to_string(&gen_path).map_err(|e| BeaconError::io(&gen_path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| BeaconError::Parse {
            path: gen_path.display().to_string(),
            message: e.to_string(),
        })?;
        let eos = crate::config::token_ids(&v.get("eos_token_id").cloned());
        if !eos.is_empty() {
            cfg.eos_token_ids = eos;
        }
    }
    let mut beacon = hf.beacon_config(&source)?;
    let files = hf_weight_files(dir)?;
    let st = SafeFiles::open(&files)?;
    let plan = opts.plan(
        &Checkpoint::Hf {
            tensors: st.stored(),
        },
        &cfg,
    )?;
    // Matrices (incl. embedding and LM head) as the plan holds them; norms, biases and activations f32.
    let dtype = match plan.prefill {
        PrefillWeights::Dense => DType::F32,
        _ => DType::BF16,
    };
    let (h, q, kv, ff) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    let file = st.file();
    let embed = require(
        st.get_dense("model.embed_tokens.weight", dtype)?,
        &file,
        "model.embed_tokens.weight",
        &[cfg.vocab_size, h],
    )?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let norm = |n: &str| -> Result<Tensor> {
            let name = format!("{p}.{n}.weight");
            require(st.get_dense(&name, DType::F32)?, &file, &name, &[h])
        };
        let attn = Attention {
            q_proj: dense_linear(
                &st,
                &format!("{p}.self_attn.q_proj"),
                q,
                h,
                cfg.qkv_bias,
                dtype,
            )?,
            k_proj: dense_linear(
                &st,
                &format!("{p}.self_attn.k_proj"),
                kv,
                h,
                cfg.qkv_bias,
                dtype,
            )?,
            v_proj: dense_linear(
                &st,
                &format!("{p}.self_attn.v_proj"),
                kv,
                h,
                cfg.qkv_bias,
                dtype,
            )?,
            o_proj: dense_linear(&st, &format!("{p}.self_attn.o_proj"), h, q, false, dtype)?,
        };
        layers.push(Layer {
            input_layernorm: norm("input_layernorm")?,
            attn,
            beacon: BeaconProjections::default(),
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp {
                gate_proj: dense_linear(&st, &format!("{p}.mlp.gate_proj"), ff, h, false, dtype)?,
                up_proj: dense_linear(&st, &format!("{p}.mlp.up_proj"), ff, h, false, dtype)?,
                down_proj: dense_linear(&st, &format!("{p}.mlp.down_proj"), h, ff, false, dtype)?,
            },
        });
    }
    let norm = require(
        st.get_dense("model.norm.weight", DType::F32)?,
        &file,
        "model.norm.weight",
        &[h],
    )?;
    let lm_head = match st.get_dense("lm_head.weight", dtype)? {
        Some(w) => {
            check_shape(&w, &file, "lm_head.weight", &[cfg.vocab_size, h])?;
            Linear {
                weight: Weight::Dense(w),
                bias: None,
            }
        }
        None if cfg.tie_word_embeddings => Linear {
            weight: Weight::Dense(embed.clone()),
            bias: None,
        },
        None => {
            return Err(BeaconError::MissingTensor {
                file,
                name: "lm_head.weight".into(),
            })
        }
    };
    let beacon_embed_placeholder = Tensor::zeros((1, h), DType::F32, &Device::Cpu)?;
    let mut model = Model::new(
        cfg,
        DType::F32,
        Embedding::Dense(embed),
        beacon_embed_placeholder,
        layers,
        norm,
        lm_head,
    );
    // Beacon parameters: in the checkpoint (released format), else a beacon file, else initialised.
    let in_checkpoint = st
        .names()
        .iter()
        .any(|n| n == "model.beacon_embed_tokens.weight");
    let beacon_source = if in_checkpoint && !opts.untrained_beacons {
        attach_beacons(&mut model, &st, beacon.params)?;
        BeaconSource::Checkpoint
    } else {
        external_beacons(&mut model, &mut beacon, dir, opts)?
    };
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_hf_dir(dir)?)
    } else {
        None
    };
    let fingerprint = fingerprint(&files, &model)?;
    Ok(Loaded {
        model,
        beacon,
        tokenizer,
        beacon_source,
        fingerprint,
        path: dir.to_path_buf(),
        plan,
    })
}

/// Beacon weights beside the model (or given by flag); else initialise and warn.
fn external_beacons(
    model: &mut Model,
    beacon: &mut BeaconConfig,
    beside: &Path,
    opts: &LoadOptions,
) -> Result<BeaconSource> {
    let cfg_path = opts.beacon_config.clone().or_else(|| {
        let p = beside.join("beacon_config.json");
        p.exists().then_some(p)
    });
    if let Some(p) = &cfg_path {
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
    let weights = if opts.untrained_beacons {
        None
    } else {
        opts.beacon_weights.clone().or_else(|| {
            let p = beside.join("beacon.safetensors");
            p.exists().then_some(p)
        })
    };
    match weights {
        Some(p) => {
            let st = SafeFiles::open(std::slice::from_ref(&p))?;
            attach_beacons(model, &st, beacon.params)?;
            Ok(BeaconSource::File(p))
        }
        None => {
            init_beacons(model, beacon)?;
            if !opts.untrained_beacons {
                tracing::warn!(
                    "no beacon weights found: beacons initialised from the backbone (untrained)"
                );
            }
            Ok(BeaconSource::Initialised)
        }
    }
}

/// Replace a model's beacon parameters with those of a `beacon.safetensors` (released names), e.g. to
/// warm-start training from shipped weights. `params` says which projections the file must hold.
pub fn load_beacon_weights(model: &mut Model, path: &Path, params: BeaconParams) -> Result<()> {
    let st = SafeFiles::open(&[path.to_path_buf()])?;
    attach_beacons(model, &st, params)
}

/// Read `model.beacon_embed_tokens.weight` and `model.layers.{i}.self_attn.beacon_{q,k,v,o}_proj.*`.
fn attach_beacons(model: &mut Model, src: &dyn Tensors, params: BeaconParams) -> Result<()> {
    let cfg = model.cfg.clone();
    // Beacon projections are held like the backbone's dense matrices (bf16 for a bf16 checkpoint).
    let dtype = match model.layers.first().map(|l| &l.attn.q_proj.weight) {
        Some(Weight::Dense(w)) if w.dtype() == DType::BF16 => DType::BF16,
        _ => model.dtype,
    };
    let file = src.file();
    let (h, q, kv) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
    model.beacon_embed = require(
        src.get_dense("model.beacon_embed_tokens.weight", model.dtype)?,
        &file,
        "model.beacon_embed_tokens.weight",
        &[1, h],
    )?;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{i}.self_attn");
        let get = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            dense_linear(src, &format!("{p}.{name}"), out, inp, bias, dtype)
        };
        layer.beacon = BeaconProjections {
            q: if params.q {
                Some(get("beacon_q_proj", q, h, cfg.qkv_bias)?)
            } else {
                None
            },
            k: if params.k {
                Some(get("beacon_k_proj", kv, h, cfg.qkv_bias)?)
            } else {
                None
            },
            v: if params.v {
                Some(get("beacon_v_proj", kv, h, cfg.qkv_bias)?)
            } else {
                None
            },
            o: if params.o {
                Some(get("beacon_o_proj", h, q, false)?)
            } else {
                None
            },
        };
    }
    Ok(())
}

/// SPEC §1.3: beacon embedding ← embedding of eos (or bos); beacon projections ← the backbone's.
/// Quantized backbone weights are shared, not copied: an untrained beacon projection *is* the
/// backbone projection.
pub fn init_beacons(model: &mut Model, beacon: &BeaconConfig) -> Result<()> {
    let id = if beacon.embed_init == "bos" {
        model.cfg.bos_token_id
    } else {
        model.cfg.eos_token_ids.first().copied()
    }
    .ok_or_else(|| {
        BeaconError::config(
            "model config",
            &format!("{}_token_id", beacon.embed_init),
            "a token id to initialise the beacon embedding",
            "none",
        )
    })?;
    model.beacon_embed = model
        .embed_tokens
        .row(id)?
        .to_dtype(model.dtype)?
        .unsqueeze(0)?;
    let p = beacon.params;
    for layer in model.layers.iter_mut() {
        let a = &layer.attn;
        layer.beacon = BeaconProjections {
            q: p.q.then(|| a.q_proj.clone()),
            k: p.k.then(|| a.k_proj.clone()),
            v: p.v.then(|| a.v_proj.clone()),
            o: p.o.then(|| a.o_proj.clone()),
        };
    }
    Ok(())
}

fn gguf_meta<'a>(c: &'a gguf_file::Content, key: &str, file: &str) -> Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| BeaconError::config(file, key, "present in the GGUF metadata", "missing"))
}

fn gguf_usize(c: &gguf_file::Content, key: &str, file: &str) -> Result<usize> {
    let v = gguf_meta(c, key, file)?;
    v.to_u64()
        .map(|x| x as usize)
        .or_else(|_| v.to_u32().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|_| BeaconError::config(file, key, "an integer", &format!("{v:?}")))
}

fn gguf_f64(c: &gguf_file::Content, key: &str, file: &str) -> Result<f64> {
    let v = gguf_meta(c, key, file)?;
    v.to_f32()
        .map(|x| x as f64)
        .or_else(|_| v.to_f64())
        .map_err(|_| BeaconError::config(file, key, "a float", &format!("{v:?}")))
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let file = path.display().to_string();
    let mut reader =
        std::io::BufReader::new(std::fs::File::open(path).map_err(|e| BeaconError::io(path, e))?);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| BeaconError::Parse {
        path: file.clone(),
        message: e.to_string(),
    })?;
    let arch = gguf_meta(&content, "general.architecture", &file)?
        .to_string()
        .map_err(|_| {
            BeaconError::config(&file, "general.architecture", "a string", "another type")
        })?
        .clone();
    let arch_kind = match arch.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(BeaconError::config(
                &file,
                "general.architecture",
                "llama or qwen2",
                other,
            ))
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = gguf_usize(&content, &k("embedding_length"), &file)?;
    let heads = gguf_usize(&content, &k("attention.head_count"), &file)?;
    let kv_heads = gguf_usize(&content, &k("attention.head_count_kv"), &file).unwrap_or(heads);
    let embd_info = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| BeaconError::MissingTensor {
            file: file.clone(),
            name: "token_embd.weight".into(),
        })?;
    let vocab = embd_info.shape.dims()[0];
    let tok_ids = |key: &str| -> Option<u32> {
        content.metadata.get(key).and_then(|v| {
            v.to_u32()
                .ok()
                .or_else(|| v.to_i32().ok().map(|x| x as u32))
        })
    };
    let cfg = ModelConfig {
        arch: arch_kind,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: gguf_usize(&content, &k("feed_forward_length"), &file)?,
        num_layers: gguf_usize(&content, &k("block_count"), &file)?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: gguf_f64(&content, &k("attention.layer_norm_rms_epsilon"), &file)?,
        rope_theta: gguf_f64(&content, &k("rope.freq_base"), &file).unwrap_or(10000.0),
        rope_scaling_factor: None,
        // llama.cpp's converter permutes llama q/k rows into interleaved pairs; qwen2 keeps halves (NEOX).
        rope_interleaved: arch_kind == Arch::Llama,
        max_position_embeddings: gguf_usize(&content, &k("context_length"), &file).unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: tok_ids("tokenizer.ggml.bos_token_id"),
        eos_token_ids: tok_ids("tokenizer.ggml.eos_token_id").into_iter().collect(),
    };
    let dtype = DType::F32; // quantized matmuls take f32 activations
    let stored: Vec<StoredTensor> = content
        .tensor_infos
        .iter()
        .map(|(name, info)| {
            let dims = info.shape.dims().to_vec();
            let elems: usize = dims.iter().product();
            let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            StoredTensor {
                is_matrix: dims.len() == 2 && name != "token_embd.weight"
                    || name == "output.weight",
                name: name.clone(),
                dims,
                bytes: bytes as u64,
            }
        })
        .collect();
    let plan = opts.plan(&Checkpoint::Gguf { tensors: stored }, &cfg)?;
    let mut get_q = |name: &str, shape: &[usize]| -> Result<candle_core::quantized::QTensor> {
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|_| BeaconError::MissingTensor {
                file: file.clone(),
                name: name.into(),
            })?;
        // GGUF dims are reversed relative to torch (ne[0] = innermost); candle already flips them.
        if t.shape().dims() != shape {
            return Err(BeaconError::Shape {
                file: file.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                found: t.shape().dims().to_vec(),
            });
        }
        Ok(t)
    };
    let (q_dim, kv_dim, ff) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let prefill = plan.prefill;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("blk.{i}");
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = get_q(&format!("{p}.{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(get_q(&format!("{p}.{name}.bias"), &[out])?.dequantize(&Device::Cpu)?)
            } else {
                None
            };
            Ok(Linear {
                weight: decode_friendly(w, prefill)?,
                bias: b,
            })
        };
        let attn = Attention {
            q_proj: lin("attn_q", q_dim, hidden, cfg.qkv_bias)?,
            k_proj: lin("attn_k", kv_dim, hidden, cfg.qkv_bias)?,
            v_proj: lin("attn_v", kv_dim, hidden, cfg.qkv_bias)?,
            o_proj: lin("attn_output", hidden, q_dim, false)?,
        };
        let mlp = Mlp {
            gate_proj: lin("ffn_gate", ff, hidden, false)?,
            up_proj: lin("ffn_up", ff, hidden, false)?,
            down_proj: lin("ffn_down", hidden, ff, false)?,
        };
        let input_layernorm =
            get_q(&format!("{p}.attn_norm.weight"), &[hidden])?.dequantize(&Device::Cpu)?;
        let post_attention_layernorm =
            get_q(&format!("{p}.ffn_norm.weight"), &[hidden])?.dequantize(&Device::Cpu)?;
        layers.push(Layer {
            input_layernorm,
            attn,
            beacon: BeaconProjections::default(),
            post_attention_layernorm,
            mlp,
        });
    }
    let norm = get_q("output_norm.weight", &[hidden])?.dequantize(&Device::Cpu)?;
    let embd = std::sync::Arc::new(get_q("token_embd.weight", &[vocab, hidden])?);
    let lm_head = if cfg.tie_word_embeddings {
        // The LM head only ever sees a few rows (last token / scored spans): keep it quantized.
        let qm = candle_core::quantized::QMatMul::from_arc(embd.clone())?;
        Linear {
            weight: Weight::Quantized {
                q: std::sync::Arc::new(qm),
                qtensor: embd.clone(),
                dense: None,
                scratch: false,
            },
            bias: None,
        }
    } else {
        Linear {
            weight: Weight::quantized(
                get_q("output.weight", &[vocab, hidden])?,
                PrefillWeights::Quantized,
            )?,
            bias: None,
        }
    };
    let placeholder = Tensor::zeros((1, hidden), dtype, &Device::Cpu)?;
    let mut model = Model::new(
        cfg.clone(),
        dtype,
        Embedding::Quantized(embd),
        placeholder,
        layers,
        norm,
        lm_head,
    );
    let tokenizer = Some(Tokenizer::from_gguf(&content, &file)?);
    // GGUF carries no beacon settings: start from the defaults for a model of this context length.
    let mut beacon = BeaconConfig::default();
    let beside = path.parent().unwrap_or(Path::new("."));
    let stem_cfg = path.with_extension("beacon_config.json");
    let stem_w = path.with_extension("beacon.safetensors");
    let mut opts = opts.clone();
    if opts.beacon_config.is_none() && stem_cfg.exists() {
        opts.beacon_config = Some(stem_cfg);
    }
    if opts.beacon_weights.is_none() && stem_w.exists() {
        opts.beacon_weights = Some(stem_w);
    }
    let beacon_source = external_beacons(&mut model, &mut beacon, beside, &opts)?;
    let fingerprint = fingerprint(&[path.to_path_buf()], &model)?;
    Ok(Loaded {
        model,
        beacon,
        tokenizer,
        beacon_source,
        fingerprint,
        path: path.to_path_buf(),
        plan,
    })
}

/// candle has SIMD dot products for Q4_0, Q8_0 and the K-quants only; Q5_0/Q5_1 fall back to scalar
/// code that makes single-row decode ~10× slower. Such matrices are re-quantized to Q8_0 for the decode
/// path (finer than the source, so the error added is a fraction of one source step), while the dense
/// prefill copy keeps the exact source values. Q4_1 stays as it is: [`crate::q4_1`] reads it directly.
fn decode_friendly(w: QTensor, prefill: PrefillWeights) -> Result<Weight> {
    use candle_core::quantized::GgmlDType;
    if !matches!(w.dtype(), GgmlDType::Q5_0 | GgmlDType::Q5_1) {
        return Weight::quantized(w, prefill);
    }
    let dense = w.dequantize(&Device::Cpu)?;
    let q8 = std::sync::Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0)?);
    let q = std::sync::Arc::new(candle_core::quantized::QMatMul::from_arc(q8.clone())?);
    let dense = match prefill {
        PrefillWeights::Dense => Some(dense),
        PrefillWeights::Bf16 => Some(dense.to_dtype(DType::BF16)?),
        PrefillWeights::Scratch | PrefillWeights::Quantized => None,
    };
    Ok(Weight::Quantized {
        q,
        qtensor: q8,
        dense,
        scratch: prefill == PrefillWeights::Scratch,
    })
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

/// Save beacon parameters in the released tensor naming (for a backbone that has none).
pub fn save_beacon_weights(model: &Model, path: &Path, dtype: DType) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    map.insert(
        "model.beacon_embed_tokens.weight".into(),
        model.beacon_embed.to_dtype(dtype)?,
    );
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, l) in [
            ("q", &layer.beacon.q),
            ("k", &layer.beacon.k),
            ("v", &layer.beacon.v),
            ("o", &layer.beacon.o),
        ] {
            if let Some(l) = l {
                let p = format!("model.layers.{i}.self_attn.beacon_{name}_proj");
                map.insert(format!("{p}.weight"), l.weight.to_dense()?.to_dtype(dtype)?);
                if let Some(b) = &l.bias {
                    map.insert(format!("{p}.bias"), b.to_dtype(dtype)?);
                }
            }
        }
    }
    crate::util::atomic_write_with(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))
}
