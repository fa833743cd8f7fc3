//! Cached backbone targets (`targets.rs`) and the objectives that use them, on a tiny fixture model:
//! the cached values equal a direct computation, the cache round-trips and rebuilds a corrupt entry,
//! and distillation from the cached top-k equals distillation from the teacher's logits when k
//! covers the whole vocabulary.

mod common;

use beacon::session::{Mode, Session, Want};
use beacon::BeaconConfig;
use beacon_train::objective::{window_loss, Target};
use beacon_train::targets::{compute_targets, long_gain_weights, TargetCache, TargetSpec};
use candle_core::{Device, Tensor, Var};

fn nll_rows(logits: &Tensor, next: &[Option<u32>]) -> Vec<f32> {
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    rows.iter()
        .zip(next)
        .map(|(r, l)| {
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + r.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
            l.map_or(0.0, |l| lse - r[l as usize])
        })
        .collect()
}

#[test]
fn cached_targets_match_direct_views() {
    let loaded = common::load_model(&common::fixture_root().join("llama-tiny"));
    let model = &loaded.model;
    let (w, sink, k) = (16, 1, 5);
    let tokens = common::random_tokens(50, model.cfg.vocab_size, 5);
    let t = compute_targets(model, &tokens, w, sink, k).unwrap();
    let next: Vec<Option<u32>> = (0..tokens.len())
        .map(|p| tokens.get(p + 1).copied())
        .collect();

    // Full view: one feed of the whole sample.
    let mut s = Session::new(model, Mode::Full, BeaconConfig::default());
    let full = s.feed(model, &tokens, Want::From(0)).unwrap().unwrap();
    let want_full = nll_rows(&full, &next);
    for (a, b) in t.nll_full.iter().zip(&want_full) {
        assert!((a - b).abs() < 1e-4, "full view {a} vs {b}");
    }
    // Top-k: sorted, log-probabilities, and the first is the argmax's.
    let rows: Vec<Vec<f32>> = full.to_vec2().unwrap();
    for (p, row) in rows.iter().enumerate() {
        let ids = &t.topk_ids[p * k..(p + 1) * k];
        let lp = &t.topk_logp[p * k..(p + 1) * k];
        assert!(lp.windows(2).all(|x| x[0] >= x[1]) && lp[0] <= 0.0);
        let best = beacon::generate::argmax(row);
        assert_eq!(row[ids[0] as usize], row[best as usize]);
    }
    // Window view: window 0 as the full view; window 2 = a fresh session over sink + its tokens.
    assert_eq!(&t.nll_window[..w], &t.nll_full[..w]);
    let mut s = Session::new(model, Mode::Full, BeaconConfig::default());
    s.feed(model, &tokens[..sink], Want::None).unwrap();
    let win = s
        .feed(model, &tokens[2 * w..3 * w], Want::From(0))
        .unwrap()
        .unwrap();
    let want_win = nll_rows(&win, &next[2 * w..3 * w]);
    for (a, b) in t.nll_window[2 * w..3 * w].iter().zip(&want_win) {
        assert!((a - b).abs() < 1e-4, "window view {a} vs {b}");
    }
    // Weights: 1 where the views agree, capped.
    let g = long_gain_weights(&t, 3.0);
    assert!(g[..w].iter().all(|&x| (x - 1.0).abs() < 1e-6));
    assert!(g.iter().all(|&x| x > 0.0 && x <= 3.0));
}

#[test]
fn target_cache_round_trips_and_rebuilds_corrupt_entries() {
    let loaded = common::load_model(&common::fixture_root().join("qwen2-tiny"));
    let model = &loaded.model;
    let dir = std::env::temp_dir().join(format!("beacon-targets-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = TargetSpec {
        model_id: "qwen2-tiny".into(),
        window: 16,
        sink: 1,
        k: 4,
    };
    let tokens = common::random_tokens(40, model.cfg.vocab_size, 9);
    let mut cache = TargetCache::new(&dir, spec.clone()).unwrap();
    let built = cache.get_or_build(model, &tokens).unwrap();
    assert_eq!((cache.built, cache.reused), (1, 0));
    let mut again = TargetCache::new(&dir, spec.clone()).unwrap();
    let read = again.get_or_build(model, &tokens).unwrap();
    assert_eq!((again.built, again.reused), (0, 1));
    assert_eq!(read.topk_ids, built.topk_ids);
    assert_eq!(read.nll_full, built.nll_full);
    // Log-probabilities are stored in f16.
    for (a, b) in read.topk_logp.iter().zip(&built.topk_logp) {
        assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0));
    }
    // Flip a byte of the tensor file: the entry no longer verifies and is rebuilt, not trusted.
    let st = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut bytes = std::fs::read(&st).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&st, bytes).unwrap();
    let mut third = TargetCache::new(&dir, spec).unwrap();
    let rebuilt = third.get_or_build(model, &tokens).unwrap();
    assert_eq!((third.built, third.reused), (1, 0));
    assert_eq!(rebuilt.topk_ids, built.topk_ids);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With k = the whole vocabulary, KL to the renormalised top-k is KL to the teacher's softmax:
/// same loss, same gradient (and rows without a label contribute nothing).
#[test]
fn topk_distillation_equals_teacher_distillation_at_full_k() {
    let (n, v) = (6, 40);
    let dev = Device::Cpu;
    let student = Tensor::randn(0f32, 2.0, (n, v), &dev).unwrap();
    let teacher = Tensor::randn(0f32, 2.0, (n, v), &dev).unwrap();
    let rows: Vec<Vec<f32>> = teacher.to_vec2().unwrap();
    let (mut ids, mut logp) = (Vec::new(), Vec::new());
    for r in &rows {
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + r.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
        let mut idx: Vec<u32> = (0..v as u32).collect();
        idx.sort_by(|&a, &b| r[b as usize].total_cmp(&r[a as usize]));
        for i in idx {
            ids.push(i);
            logp.push(r[i as usize] - lse);
        }
    }
    let valid = vec![true, true, false, true, true, true];
    let weights = Some(vec![1.0, 0.5, 1.0, 2.0, 1.0, 0.0]);
    let run = |target: Target| {
        let s = Var::from_tensor(&student).unwrap();
        let loss = window_loss(s.as_tensor(), target, 0.25, weights.clone()).unwrap();
        let g = loss.backward().unwrap();
        (
            loss.to_scalar::<f32>().unwrap(),
            g.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
        )
    };
    let (la, ga) = run(Target::Teacher {
        logits: teacher.clone(),
        valid: valid.clone(),
    });
    let (lb, gb) = run(Target::TopK {
        ids,
        logp,
        k: v,
        valid,
    });
    assert!((la - lb).abs() < 1e-5 * la.abs().max(1.0), "{la} vs {lb}");
    for (ra, rb) in ga.iter().zip(&gb) {
        for (a, b) in ra.iter().zip(rb) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
    assert!(ga[2].iter().all(|&x| x == 0.0) && ga[5].iter().all(|&x| x == 0.0));
}
