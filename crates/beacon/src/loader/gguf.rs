//! GGUF files (llama.cpp's format): the config from the metadata, matrices kept quantized as
//! stored (with a dense or bf16 prefill copy when the memory plan affords one), the tokenizer from
//! the metadata. Beacon weights come from files beside it (GGUF carries none).

use super::beacons::{self, BeaconFiles};
use super::source::{self, WeightSource, GGUF_NAMES};
use super::{fingerprint, LoadOptions, Loaded};
use crate::config::{Arch, BeaconConfig, ModelConfig};
use crate::error::{BeaconError, Result};
use crate::memory_plan::{Checkpoint, PrefillWeights, StoredTensor};
use crate::model::{Embedding, Model, Weight};
use crate::tokenizer::Tokenizer;
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

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

/// The model config from a GGUF's metadata.
fn model_config(content: &gguf_file::Content, file: &str) -> Result<ModelConfig> {
    let file = file.to_string();
    let arch = gguf_meta(content, "general.architecture", &file)?
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
    let hidden = gguf_usize(content, &k("embedding_length"), &file)?;
    let heads = gguf_usize(content, &k("attention.head_count"), &file)?;
    let kv_heads = gguf_usize(content, &k("attention.head_count_kv"), &file).unwrap_or(heads);
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
        intermediate_size: gguf_usize(content, &k("feed_forward_length"), &file)?,
        num_layers: gguf_usize(content, &k("block_count"), &file)?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: gguf_f64(content, &k("attention.layer_norm_rms_epsilon"), &file)?,
        rope_theta: gguf_f64(content, &k("rope.freq_base"), &file).unwrap_or(10000.0),
        rope_scaling_factor: None,
        // llama.cpp's converter permutes llama q/k rows into interleaved pairs; qwen2 keeps halves (NEOX).
        rope_interleaved: arch_kind == Arch::Llama,
        max_position_embeddings: gguf_usize(content, &k("context_length"), &file).unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: tok_ids("tokenizer.ggml.bos_token_id"),
        eos_token_ids: tok_ids("tokenizer.ggml.eos_token_id").into_iter().collect(),
    };
    Ok(cfg)
}

/// A GGUF's tensors: matrices quantized as stored (plus the plan's prefill copy), vectors
/// dequantized to f32.
struct GgufSource<'a> {
    content: &'a gguf_file::Content,
    reader: BufReader<std::fs::File>,
    file: String,
    prefill: PrefillWeights,
}

impl GgufSource<'_> {
    /// `name` as stored, which must have `shape` (GGUF dims are reversed relative to torch —
    /// ne[0] innermost — and candle already flips them).
    fn quantized(&mut self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let t = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|_| BeaconError::MissingTensor {
                file: self.file.clone(),
                name: name.into(),
            })?;
        source::check_shape(t.shape().dims(), &self.file, name, shape)?;
        Ok(t)
    }
}

impl WeightSource for GgufSource<'_> {
    fn label(&self) -> String {
        self.file.clone()
    }
    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
    fn matrix(&mut self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        let w = self.quantized(name, &shape)?;
        decode_friendly(w, self.prefill)
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        Ok(self.quantized(name, &[len])?.dequantize(&Device::Cpu)?)
    }
    fn embedding(&mut self, name: &str, shape: [usize; 2]) -> Result<Embedding> {
        Ok(Embedding::Quantized(Arc::new(
            self.quantized(name, &shape)?,
        )))
    }
    fn head(&mut self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        Weight::quantized(self.quantized(name, &shape)?, PrefillWeights::Quantized)
    }
}

pub(super) fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let file = path.display().to_string();
    let mut reader =
        BufReader::new(std::fs::File::open(path).map_err(|e| BeaconError::io(path, e))?);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| BeaconError::Parse {
        path: file.clone(),
        message: e.to_string(),
    })?;
    let cfg = model_config(&content, &file)?;
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
    let mut src = GgufSource {
        content: &content,
        reader,
        file: file.clone(),
        prefill: plan.prefill,
    };
    let backbone = source::build_backbone(&mut src, &GGUF_NAMES, &cfg)?;
    let tokenizer = Some(Tokenizer::from_gguf(&content, &file)?);
    // GGUF carries no beacon settings: start from the defaults for a model of this context length;
    // beacon files named after the GGUF come first, then those beside it.
    let mut beacon = BeaconConfig::default();
    let beside = path.parent().unwrap_or(Path::new("."));
    let files = BeaconFiles::find(
        opts,
        &[
            path.with_extension("beacon_config.json"),
            beside.join("beacon_config.json"),
        ],
        &[
            path.with_extension("beacon.safetensors"),
            beside.join("beacon.safetensors"),
        ],
    );
    // Quantized matmuls take f32 activations; beacon projections are dense f32.
    let (beacons, beacon_source) =
        beacons::resolve(&cfg, &backbone, &mut beacon, files, opts, DType::F32)?;
    let model = Model::new(cfg, DType::F32, backbone, beacons)?;
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
