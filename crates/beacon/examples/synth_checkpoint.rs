//! Writes random-weight checkpoints with the exact shapes of the released `beacon-qwen-2-7b-instruct`
//! (hidden 3584, 28 layers, 28 query / 4 K/V heads, FFN 18944, vocab 152064, beacon q/k/v under the
//! released names and `beacon_*` config keys), to measure memory and speed of a 7B-class model without
//! downloading one. The text such a model writes is noise; what it costs is real.
//!
//! ```sh
//! scripts/make-7b-shaped.sh OUT            # both: OUT/qwen2-7b-bf16/ and OUT/qwen2-7b-q4_k_m.gguf
//! cargo run --release -p beacon --example synth_checkpoint -- OUT hf|gguf [--layers N]
//! ```
//!
//! (a) a Hugging Face directory: `config.json`, bf16 safetensors in ~4 GiB shards with
//!     `model.safetensors.index.json`, beacon tensors inside the checkpoint (the released format),
//!     `tokenizer.json` (the default model's, its vocabulary padded to 152064 entries);
//! (b) a GGUF in the Q4_K_M layout (Q4_K matrices; Q6_K for the LM head and for `attn_v` / `ffn_down`
//!     of the layers llama.cpp gives more bits), tokenizer metadata copied from the default model and
//!     padded the same way. Matrices of one shape share their random values across layers (the engine
//!     cannot tell, and quantizing 7.6 G weights would take longer than running them).
//!
//! Tens of GiB are written: not run by CI. `--layers N` writes a shallower model of the same widths.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const HIDDEN: usize = 3584;
const FFN: usize = 18944;
const HEADS: usize = 28;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 128;
const VOCAB: usize = 152064;
const SHARD_BYTES: u64 = 4 << 30;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
}

/// One tensor of the Hugging Face checkpoint: name, shape, and how its values are made.
struct Spec {
    name: String,
    dims: Vec<usize>,
    /// `None`: all ones (norms); else uniform in ±scale.
    scale: Option<f32>,
}

fn hf_specs(layers: usize) -> Vec<Spec> {
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let w = |name: String, dims: Vec<usize>| Spec {
        scale: Some(if dims.len() == 2 {
            (3.0 / dims[1] as f32).sqrt()
        } else {
            0.02
        }),
        name,
        dims,
    };
    let ones = |name: String| Spec {
        name,
        dims: vec![HIDDEN],
        scale: None,
    };
    let mut v = vec![
        w("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]),
        w("model.beacon_embed_tokens.weight".into(), vec![1, HIDDEN]),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        v.push(ones(format!("{p}.input_layernorm.weight")));
        v.push(ones(format!("{p}.post_attention_layernorm.weight")));
        for prefix in ["", "beacon_"] {
            for (n, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                v.push(w(
                    format!("{p}.self_attn.{prefix}{n}.weight"),
                    vec![out, HIDDEN],
                ));
                v.push(w(format!("{p}.self_attn.{prefix}{n}.bias"), vec![out]));
            }
        }
        v.push(w(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, q]));
        v.push(w(format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
        v.push(w(format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]));
        v.push(w(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]));
    }
    v.push(ones("model.norm.weight".into()));
    v.push(w("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    v
}

fn config_json(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "use_sliding_window": false,
        "sliding_window": 131072,
        "max_window_layers": 28,
        // The default model's tokenizer is padded to this vocabulary: its bos/eos ids.
        "bos_token_id": 1,
        "eos_token_id": 2,
        "beacon_window": 2048,
        "beacon_stride": 2048,
        "beacon_attn": "full-coverage",
        "beacon_ratio": [2, 4, 8, 16, 32],
        "beacon_ratio_mix": "adapt-1024",
        "beacon_param": ["q", "k", "v"],
        "beacon_embed_init": "eos",
        "beacon_sink_size": 0,
        "beacon_attend_prev": true,
        "beacon_pos": "interleave",
        "beacon_parallel_window": 1,
        "synthetic": "random weights with the shapes of namespace-Pt/beacon-qwen-2-7b-instruct; text is noise"
    })
}

fn write_hf(out: &Path, layers: usize, tokenizer: &beacon::tokenizer::Tokenizer) -> AnyResult<()> {
    std::fs::create_dir_all(out)?;
    let specs = hf_specs(layers);
    // Pack tensors into shards of at most SHARD_BYTES, in order.
    let mut shards: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut size = 0u64;
    for s in &specs {
        let bytes = s.dims.iter().product::<usize>() as u64 * 2;
        if size + bytes > SHARD_BYTES && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(s);
        size += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut rng = Rng(7);
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0u64;
        for s in shard {
            let bytes = s.dims.iter().product::<usize>() as u64 * 2;
            header.insert(
                s.name.clone(),
                serde_json::json!({"dtype": "BF16", "shape": s.dims, "data_offsets": [offset, offset + bytes]}),
            );
            weight_map.insert(s.name.clone(), file.clone().into());
            offset += bytes;
        }
        let mut h = serde_json::to_vec(&header)?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let tmp = out.join(format!(".{file}.tmp"));
        let mut w = BufWriter::with_capacity(8 << 20, std::fs::File::create(&tmp)?);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        let mut buf: Vec<u8> = Vec::with_capacity(8 << 20);
        for s in shard {
            let count: usize = s.dims.iter().product();
            let mut left = count;
            while left > 0 {
                let m = left.min(4 << 20);
                buf.clear();
                for _ in 0..m {
                    let v = match s.scale {
                        None => 1.0,
                        Some(sc) => rng.uniform(sc),
                    };
                    buf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
                }
                w.write_all(&buf)?;
                left -= m;
            }
        }
        w.flush()?;
        drop(w);
        std::fs::rename(&tmp, out.join(&file))?;
        total += offset;
        eprintln!(
            "wrote {file} ({:.2} GiB)",
            offset as f64 / (1u64 << 30) as f64
        );
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index)?,
    )?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_vec_pretty(&config_json(layers))?,
    )?;
    // The default model's tokenizer, its vocabulary padded to the model's with unused entries (a
    // random model samples any id).
    let tok_path = out.join("tokenizer.json");
    tokenizer.save_json(&tok_path)?;
    let mut tok: serde_json::Value = serde_json::from_slice(&std::fs::read(&tok_path)?)?;
    let vocab = tok["model"]["vocab"]
        .as_object_mut()
        .ok_or("tokenizer.json: no model.vocab")?;
    for i in vocab.len()..VOCAB {
        vocab.insert(format!("<|synthetic_{i}|>"), i.into());
    }
    std::fs::write(&tok_path, serde_json::to_vec(&tok)?)?;
    Ok(())
}

/// Layers whose `attn_v` / `ffn_down` llama.cpp's Q4_K_M keeps in Q6_K ("use more bits").
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn random_q(dims: &[usize], dtype: GgmlDType, seed: u64) -> AnyResult<QTensor> {
    let mut rng = Rng(seed);
    let count: usize = dims.iter().product();
    let scale = if dims.len() == 2 {
        (3.0 / dims[1] as f32).sqrt()
    } else {
        0.02
    };
    let v: Vec<f32> = (0..count).map(|_| rng.uniform(scale)).collect();
    let t = Tensor::from_vec(v, dims, &Device::Cpu)?;
    Ok(QTensor::quantize(&t, dtype)?)
}

fn write_gguf(out: &Path, layers: usize, default_gguf: &Path) -> AnyResult<()> {
    use gguf_file::Value;
    let mut f = std::fs::File::open(default_gguf)?;
    let src = gguf_file::Content::read(&mut f)?;
    let arch = "qwen2";
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String("synthetic qwen2-7b-shaped (random weights)".into()),
        ),
        ("general.file_type".into(), Value::U32(15)), // MOSTLY_Q4_K_M
        (format!("{arch}.context_length"), Value::U32(32768)),
        (
            format!("{arch}.embedding_length"),
            Value::U32(HIDDEN as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(FFN as u32),
        ),
        (format!("{arch}.block_count"), Value::U32(layers as u32)),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(1_000_000.0)),
    ];
    // Tokenizer: the default model's, padded to the model's vocabulary with unused entries.
    for (k, v) in &src.metadata {
        if !k.starts_with("tokenizer.") {
            continue;
        }
        let v = match (k.as_str(), v) {
            ("tokenizer.ggml.tokens", Value::Array(a)) => {
                let mut a = a.clone();
                let have = a.len();
                a.extend((have..VOCAB).map(|i| Value::String(format!("<|synthetic_{i}|>"))));
                Value::Array(a)
            }
            ("tokenizer.ggml.token_type", Value::Array(a)) => {
                let mut a = a.clone();
                a.resize(VOCAB, Value::I32(5)); // unused
                Value::Array(a)
            }
            ("tokenizer.ggml.scores", Value::Array(a)) => {
                let mut a = a.clone();
                a.resize(VOCAB, Value::F32(0.0));
                Value::Array(a)
            }
            _ => v.clone(),
        };
        md.push((k.clone(), v));
    }
    // One random matrix per (shape, type), shared by every layer.
    let mut cache: HashMap<(Vec<usize>, GgmlDType), QTensor> = HashMap::new();
    let mut names: Vec<(String, Vec<usize>, GgmlDType)> = vec![
        (
            "token_embd.weight".into(),
            vec![VOCAB, HIDDEN],
            GgmlDType::Q4K,
        ),
        ("output_norm.weight".into(), vec![HIDDEN], GgmlDType::F32),
        ("output.weight".into(), vec![VOCAB, HIDDEN], GgmlDType::Q6K),
    ];
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for i in 0..layers {
        let p = format!("blk.{i}");
        let big = if more_bits(i, layers) {
            GgmlDType::Q6K
        } else {
            GgmlDType::Q4K
        };
        for (n, dims, t) in [
            ("attn_norm.weight", vec![HIDDEN], GgmlDType::F32),
            ("ffn_norm.weight", vec![HIDDEN], GgmlDType::F32),
            ("attn_q.weight", vec![q, HIDDEN], GgmlDType::Q4K),
            ("attn_q.bias", vec![q], GgmlDType::F32),
            ("attn_k.weight", vec![kv, HIDDEN], GgmlDType::Q4K),
            ("attn_k.bias", vec![kv], GgmlDType::F32),
            ("attn_v.weight", vec![kv, HIDDEN], big),
            ("attn_v.bias", vec![kv], GgmlDType::F32),
            ("attn_output.weight", vec![HIDDEN, q], GgmlDType::Q4K),
            ("ffn_gate.weight", vec![FFN, HIDDEN], GgmlDType::Q4K),
            ("ffn_up.weight", vec![FFN, HIDDEN], GgmlDType::Q4K),
            ("ffn_down.weight", vec![HIDDEN, FFN], big),
        ] {
            names.push((format!("{p}.{n}"), dims, t));
        }
    }
    for (k, (_, dims, t)) in names.iter().enumerate() {
        if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry((dims.clone(), *t)) {
            eprintln!("quantizing a random {dims:?} matrix to {t:?}");
            let qt = if *t == GgmlDType::F32 && dims.len() == 1 {
                // Norm weights 1, biases small.
                let v = vec![1f32; dims[0]];
                QTensor::quantize(&Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?, *t)?
            } else {
                random_q(dims, *t, 100 + k as u64)?
            };
            slot.insert(qt);
        }
    }
    let tensors: Vec<(&str, &QTensor)> = names
        .iter()
        .map(|(n, dims, t)| (n.as_str(), &cache[&(dims.clone(), *t)]))
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = out.with_extension("gguf.tmp");
    let mut w = BufWriter::with_capacity(8 << 20, std::fs::File::create(&tmp)?);
    gguf_file::write(&mut w, &md_refs, &tensors)?;
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn main() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: synth_checkpoint OUT_DIR hf|gguf [--layers N]";
    let out = PathBuf::from(args.first().ok_or(usage)?);
    let what = args.get(1).ok_or(usage)?.as_str();
    let layers = match args.iter().position(|a| a == "--layers") {
        Some(i) => args.get(i + 1).ok_or(usage)?.parse()?,
        None => 28,
    };
    let default_gguf = beacon::fetch::default_model_path()?;
    std::fs::create_dir_all(&out)?;
    let suffix = if layers == 28 {
        String::new()
    } else {
        format!("-{layers}l")
    };
    match what {
        "hf" => {
            let content = gguf_file::Content::read(&mut std::fs::File::open(&default_gguf)?)?;
            let tok = beacon::tokenizer::Tokenizer::from_gguf(
                &content,
                &default_gguf.display().to_string(),
            )?;
            write_hf(&out.join(format!("qwen2-7b-bf16{suffix}")), layers, &tok)
        }
        "gguf" => write_gguf(
            &out.join(format!("qwen2-7b-q4_k_m{suffix}.gguf")),
            layers,
            &default_gguf,
        ),
        _ => Err(usage.into()),
    }
}
