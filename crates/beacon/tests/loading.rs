//! Loading: other architectures, dtypes, sharded checkpoints, separate beacon files, and bad input
//! that must give a clear error (file/key, expected vs found), never a panic.

use beacon::session::{Mode, Session, Want};
use beacon::testing::max_abs_diff;
use beacon::{load, LoadOptions};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/reference")
        .join(name)
}

/// A scratch copy of a tiny model directory.
fn copy_model(name: &str) -> tempdir::Dir {
    let d = tempdir::Dir::new(name);
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(tiny(name).join(f), d.path.join(f)).unwrap();
    }
    d
}

mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "beacon-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn logits(dir: &Path, opts: &LoadOptions) -> Tensor {
    let l = load(dir, opts).unwrap();
    let mut cfg = l.beacon.clone();
    cfg.ratios = vec![4];
    let mut s = Session::new(&l.model, Mode::Beacon, cfg);
    let ids: Vec<u32> = (0..100).map(|i| (i * 37 % 256) as u32).collect();
    s.feed(&l.model, &ids, Want::Last).unwrap().unwrap()
}

fn err_of(dir: &Path) -> String {
    match load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("expected an error for {}", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mistral_is_llama_without_bias() {
    let d = copy_model("llama-tiny");
    edit_config(&d.path, |v| {
        v["model_type"] = "mistral".into();
        v["sliding_window"] = serde_json::Value::Null;
    });
    let a = logits(&tiny("llama-tiny"), &LoadOptions::default());
    let b = logits(&d.path, &LoadOptions::default());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn bf16_tracks_f32() {
    let a = logits(&tiny("qwen2-tiny"), &LoadOptions::default());
    let b = logits(
        &tiny("qwen2-tiny"),
        &LoadOptions {
            dtype: Some(DType::BF16),
            ..Default::default()
        },
    );
    let d = max_abs_diff(&a, &b);
    // bf16 keeps 8 bits of mantissa; logits are O(1), so a few 1e-2 is the expected drift.
    assert!(d < 0.15, "bf16 drift {d}");
    assert!(d > 0.0, "bf16 run should not be bit-identical to f32");
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let d = copy_model("llama-tiny");
    let all =
        candle_core::safetensors::load(d.path.join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(d.path.join("model.safetensors")).unwrap();
    let (mut a, mut b): (HashMap<String, Tensor>, HashMap<String, Tensor>) =
        (HashMap::new(), HashMap::new());
    let mut index = serde_json::Map::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let shard = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        index.insert(k.clone(), shard.into());
        if i % 2 == 0 {
            a.insert(k, v);
        } else {
            b.insert(k, v);
        }
    }
    candle_core::safetensors::save(&a, d.path.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, d.path.join("model-00002-of-00002.safetensors")).unwrap();
    let idx = serde_json::json!({ "metadata": {}, "weight_map": index });
    std::fs::write(d.path.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    assert_eq!(
        max_abs_diff(
            &logits(&tiny("llama-tiny"), &LoadOptions::default()),
            &logits(&d.path, &LoadOptions::default())
        ),
        0.0
    );
}

#[test]
fn separate_beacon_file_equals_checkpoint() {
    // Split the checkpoint into a backbone without beacon tensors + beacon.safetensors beside it.
    let d = copy_model("qwen2-tiny");
    let all =
        candle_core::safetensors::load(d.path.join("model.safetensors"), &Device::Cpu).unwrap();
    let (beacon, backbone): (HashMap<_, _>, HashMap<_, _>) =
        all.into_iter().partition(|(k, _)| k.contains("beacon"));
    assert!(!beacon.is_empty());
    candle_core::safetensors::save(&backbone, d.path.join("model.safetensors")).unwrap();
    candle_core::safetensors::save(&beacon, d.path.join("beacon.safetensors")).unwrap();
    let l = load(&d.path, &LoadOptions::default()).unwrap();
    assert!(matches!(
        l.beacon_source,
        beacon::loader::BeaconSource::File(_)
    ));
    assert_eq!(
        max_abs_diff(
            &logits(&tiny("qwen2-tiny"), &LoadOptions::default()),
            &logits(&d.path, &LoadOptions::default())
        ),
        0.0
    );
    // Without it, the beacons are initialised from the backbone, which changes the output.
    std::fs::remove_file(d.path.join("beacon.safetensors")).unwrap();
    let l = load(&d.path, &LoadOptions::default()).unwrap();
    assert_eq!(l.beacon_source, beacon::loader::BeaconSource::Initialised);
    assert!(
        max_abs_diff(
            &logits(&tiny("qwen2-tiny"), &LoadOptions::default()),
            &logits(&d.path, &LoadOptions::default())
        ) > 1e-2
    );
}

/// A beacon file holding `beacon_o_proj` (a `--beacon-param q,k,v,o` export) is read with the
/// `beacon_config.json` beside it; read under settings that omit o it is refused, not half-used.
#[test]
fn beacon_file_with_o_uses_its_settings() {
    let d = copy_model("qwen2-tiny");
    let all =
        candle_core::safetensors::load(d.path.join("model.safetensors"), &Device::Cpu).unwrap();
    let n_layers = all
        .keys()
        .filter(|k| k.ends_with("self_attn.o_proj.weight"))
        .count();
    let (mut beacon, backbone): (HashMap<_, _>, HashMap<_, _>) =
        all.into_iter().partition(|(k, _)| k.contains("beacon"));
    for i in 0..n_layers {
        let o = &backbone[&format!("model.layers.{i}.self_attn.o_proj.weight")];
        beacon.insert(
            format!("model.layers.{i}.self_attn.beacon_o_proj.weight"),
            (o * 1.5).unwrap(),
        );
    }
    candle_core::safetensors::save(&backbone, d.path.join("model.safetensors")).unwrap();
    let w = tempdir::Dir::new("qkvo-export");
    let file = w.path.join("beacon.safetensors");
    candle_core::safetensors::save(&beacon, &file).unwrap();
    let opts = LoadOptions {
        beacon_weights: Some(file.clone()),
        ..Default::default()
    };

    // The model's own settings say q,k,v: the file's o would be dropped, so it is an error.
    let err = match load(&d.path, &opts) {
        Ok(_) => panic!("a q,k,v,o file read with q,k,v settings must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("beacon_o_proj") && err.contains("--beacon-config"),
        "{err}"
    );

    // With the export's settings beside it, o is read and used.
    std::fs::write(
        w.path.join("beacon_config.json"),
        r#"{"beacon_param": ["q", "k", "v", "o"]}"#,
    )
    .unwrap();
    let l = load(&d.path, &opts).unwrap();
    assert!(l.beacon.params.o);
    let layer = &l.model.layers[0];
    let got = layer.beacon.o.as_ref().unwrap().weight.to_dense().unwrap();
    let want = (layer.attn.o_proj.weight.to_dense().unwrap() * 1.5).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-6);
    // ... and changes the output against the same q,k,v without it.
    assert!(
        max_abs_diff(
            &logits(&tiny("qwen2-tiny"), &LoadOptions::default()),
            &logits(&d.path, &opts)
        ) > 1e-3
    );
}

#[test]
fn init_copies_backbone_and_eos_embedding() {
    let l = load(
        &tiny("llama-tiny"),
        &LoadOptions {
            untrained_beacons: true,
            ..Default::default()
        },
    )
    .unwrap();
    let eos = l.model.cfg.eos_token_ids[0];
    let row = l.model.embed_tokens.row(eos).unwrap();
    assert_eq!(
        max_abs_diff(&l.model.beacon_embed.squeeze(0).unwrap(), &row),
        0.0
    );
    let layer = &l.model.layers[1];
    let q = layer.beacon.q.as_ref().unwrap().weight.to_dense().unwrap();
    assert_eq!(
        max_abs_diff(&q, &layer.attn.q_proj.weight.to_dense().unwrap()),
        0.0
    );
    assert!(layer.beacon.o.is_none());
}

#[test]
fn bad_inputs_give_clear_errors() {
    // unknown architecture
    let d = copy_model("llama-tiny");
    edit_config(&d.path, |v| v["model_type"] = "gpt_neox".into());
    let e = err_of(&d.path);
    assert!(
        e.contains("model_type") && e.contains("gpt_neox") && e.contains("config.json"),
        "{e}"
    );

    // ratio that does not divide the window
    let d = copy_model("llama-tiny");
    edit_config(&d.path, |v| v["beacon_ratio"] = serde_json::json!([3]));
    let e = err_of(&d.path);
    assert!(e.contains("beacon_ratio") && e.contains('3'), "{e}");

    // interleave with stride != window
    let d = copy_model("llama-tiny");
    edit_config(&d.path, |v| v["beacon_stride"] = 16.into());
    let e = err_of(&d.path);
    assert!(e.contains("beacon_stride"), "{e}");

    // modes the reference breaks on
    for (k, val) in [
        ("beacon_attn", "step-expansion"),
        ("beacon_attn", "segmentation"),
    ] {
        let d = copy_model("llama-tiny");
        edit_config(&d.path, |v| v[k] = val.into());
        let e = err_of(&d.path);
        assert!(e.contains(k) && e.contains(val), "{e}");
    }

    // wrong shape: pretend the hidden size is different
    let d = copy_model("llama-tiny");
    edit_config(&d.path, |v| v["intermediate_size"] = 100.into());
    let e = err_of(&d.path);
    assert!(
        e.contains("expected shape") && e.contains("100") && e.contains("128"),
        "{e}"
    );

    // missing tensor
    let d = copy_model("llama-tiny");
    let mut all =
        candle_core::safetensors::load(d.path.join("model.safetensors"), &Device::Cpu).unwrap();
    all.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&all, d.path.join("model.safetensors")).unwrap();
    let e = err_of(&d.path);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );

    // truncated weights file
    let d = copy_model("llama-tiny");
    let bytes = std::fs::read(d.path.join("model.safetensors")).unwrap();
    std::fs::write(d.path.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(&d.path);
    assert!(e.contains("model.safetensors"), "{e}");

    // malformed config
    let d = copy_model("llama-tiny");
    std::fs::write(d.path.join("config.json"), "{ not json").unwrap();
    let e = err_of(&d.path);
    assert!(e.contains("config.json") && e.contains("parse"), "{e}");

    // not a model at all
    let e = match load(
        Path::new("/definitely/not/here.gguf"),
        &LoadOptions::default(),
    ) {
        Ok(_) => panic!("loaded a missing file"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("/definitely/not/here.gguf"), "{e}");
    let d = tempdir::Dir::new("garbage");
    let g = d.path.join("x.gguf");
    std::fs::write(&g, b"GGUF but not really").unwrap();
    let e = match load(&g, &LoadOptions::default()) {
        Ok(_) => panic!("loaded garbage"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("x.gguf"), "{e}");
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let l = load(&tiny("llama-tiny"), &LoadOptions::default()).unwrap();
    let mut s = Session::new(&l.model, Mode::Beacon, l.beacon.clone());
    let e = s
        .feed(&l.model, &[1, 2, 9999], Want::Last)
        .unwrap_err()
        .to_string();
    assert!(e.contains("9999") && e.contains("256"), "{e}");
}

#[test]
fn modes_agree_where_they_should() {
    let l = load(&tiny("llama-tiny"), &LoadOptions::default()).unwrap();
    let m = &l.model;
    let ids: Vec<u32> = (0..150).map(|i| (i * 53 % 256) as u32).collect();
    let run = |mode: Mode, feed_by: usize| {
        let mut s = Session::new(m, mode, l.beacon.clone());
        s.set_prefill_chunk(64);
        let mut last = None;
        for piece in ids.chunks(feed_by) {
            last = s.feed(m, piece, Want::Last).unwrap();
        }
        (last.unwrap(), s)
    };
    // full attention: chunked prefill = one token at a time
    let (a, sa) = run(Mode::Full, 150);
    let (b, _) = run(Mode::Full, 1);
    assert!(max_abs_diff(&a, &b) < 1e-4);
    assert_eq!(sa.stats().peak_kv_bytes, sa.kv_bytes_full());
    // truncate to 150 keeps everything = full
    let (c, _) = run(Mode::Truncate { keep: 150 }, 150);
    assert!(max_abs_diff(&a, &c) < 1e-5);
    // truncate to 40 = full attention over the last 40 tokens (positions restart at 0)
    let (d, sd) = run(Mode::Truncate { keep: 40 }, 150);
    let mut s = Session::new(m, Mode::Full, l.beacon.clone());
    let e = s.feed(m, &ids[110..], Want::Last).unwrap().unwrap();
    assert!(max_abs_diff(&d, &e) < 1e-5);
    assert_eq!(sd.layout().context_len(), 40);
    // streaming keeps sink + recent entries and never more than that plus one chunk
    let (_, ss) = run(
        Mode::Streaming {
            sink: 4,
            recent: 60,
        },
        1,
    );
    assert!(
        ss.layout().context_len() <= 64,
        "{}",
        ss.layout().context_len()
    );
    // chunks longer than the recent window, and a window smaller than the eviction block
    let (_, ss) = run(
        Mode::Streaming {
            sink: 2,
            recent: 10,
        },
        150,
    );
    assert!(
        ss.layout().context_len() <= 12,
        "{}",
        ss.layout().context_len()
    );
    let (_, ss) = run(Mode::Streaming { sink: 0, recent: 1 }, 7);
    assert!(ss.layout().context_len() <= 1);
    // streaming with a window larger than the input = full attention
    let (f, _) = run(
        Mode::Streaming {
            sink: 4,
            recent: 1000,
        },
        150,
    );
    assert!(max_abs_diff(&a, &f) < 1e-5);
}
