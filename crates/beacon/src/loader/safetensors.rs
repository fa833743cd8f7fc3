//! Hugging Face checkpoints: `config.json` + safetensors (one file, or shards), incl. the released
//! beacon checkpoints whose beacon tensors sit beside the backbone's.

use super::beacons::{self, BeaconFiles};
use super::source::{self, WeightSource, HF_NAMES};
use super::{fingerprint, BeaconSource, LoadOptions, Loaded};
use crate::config::HfConfig;
use crate::error::{BeaconError, Result};
use crate::memory_plan::{Checkpoint, PrefillWeights, StoredTensor};
use crate::model::{Embedding, Model, Weight};
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Safetensors files read tensor by tensor (positioned reads into the tensor's own buffer): no mapping
/// stays resident beside the loaded weights, so peak memory is what is kept plus one tensor, shard after
/// shard (a mapped 15 GB checkpoint would count its touched pages on top of the copies).
pub(super) struct SafeFiles {
    label: String,
    files: Vec<(PathBuf, std::fs::File)>,
    /// name → (file index, dtype, dims, absolute byte range)
    index: HashMap<String, (usize, DType, Vec<usize>, std::ops::Range<u64>)>,
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
    pub(super) fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let mut f = std::fs::File::open(p).map_err(|e| BeaconError::io(p, e))?;
            let (tensors, _) = safetensors_header(p, &mut f)?;
            for (name, dtype, dims, range) in tensors {
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

    pub(super) fn label(&self) -> String {
        self.label.clone()
    }

    pub(super) fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// `name` converted to `dtype`, `None` if the files have no such tensor.
    pub(super) fn get_dense(&self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
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

    /// `name` in `dtype`, which must exist with `shape`.
    pub(super) fn tensor(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        source::require(self.get_dense(name, dtype)?, &self.label, name, shape)
    }
}

/// Safetensors as a weight source: matrices (and the embedding) in `matrix_dtype`, vectors in f32.
pub(super) struct SafeSource<'a> {
    pub files: &'a SafeFiles,
    pub matrix_dtype: DType,
}

impl WeightSource for SafeSource<'_> {
    fn label(&self) -> String {
        self.files.label()
    }
    fn contains(&self, name: &str) -> bool {
        self.files.contains(name)
    }
    fn matrix(&mut self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        Ok(Weight::Dense(self.files.tensor(
            name,
            self.matrix_dtype,
            &shape,
        )?))
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        self.files.tensor(name, DType::F32, &[len])
    }
    fn embedding(&mut self, name: &str, shape: [usize; 2]) -> Result<Embedding> {
        Ok(Embedding::Dense(self.files.tensor(
            name,
            self.matrix_dtype,
            &shape,
        )?))
    }
    fn head(&mut self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        self.matrix(name, shape)
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

pub(super) fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let hf = HfConfig::from_file(&cfg_path)?;
    let source = cfg_path.display().to_string();
    let mut cfg = hf.model_config(&source)?;
    // generation_config.json's eos ids (may be a list) override config.json's.
    let eos = crate::config::generation_eos_ids(dir)?;
    if !eos.is_empty() {
        cfg.eos_token_ids = eos;
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
    let matrix_dtype = match plan.prefill {
        PrefillWeights::Dense => DType::F32,
        _ => DType::BF16,
    };
    let mut src = SafeSource {
        files: &st,
        matrix_dtype,
    };
    let backbone = source::build_backbone(&mut src, &HF_NAMES, &cfg)?;
    // Beacon parameters: in the checkpoint (released format), else a beacon file, else initialised.
    let (beacons, beacon_source) = if st.contains(source::BEACON_EMBED) && !opts.untrained_beacons {
        let b = beacons::read(&st, &cfg, beacon.params, matrix_dtype)?;
        (b, BeaconSource::Checkpoint)
    } else {
        let files = BeaconFiles::beside(dir, opts);
        beacons::resolve(&cfg, &backbone, &mut beacon, files, opts, matrix_dtype)?
    };
    let model = Model::new(cfg, DType::F32, backbone, beacons)?;
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
