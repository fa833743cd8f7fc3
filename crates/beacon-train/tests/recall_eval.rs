//! Held-out recall (`Trainer::evaluate_recall`) on the tiny fixture: the answer NLL it reports with
//! full attention (facts and decoys) and with no memory equals the cached-target views computed
//! independently (`compute_targets`) at the answer positions, decoy samples ask as many answer
//! tokens of a different text, the held-out recall samples do not depend on the
//! run's seed, and `--stop-after 0` with evaluation on measures the starting weights.

mod common;

use beacon_train::data::{Packed, Split};
use beacon_train::recall::RecallMix;
use beacon_train::targets::compute_targets;
use beacon_train::trainer::{Quiet, RecallEval, Settings, Trainer};

/// One token per word (a hash of it): facts and questions fit a short sample.
fn word_encoder(vocab: usize) -> Box<beacon_train::data::Encode<'static>> {
    Box::new(move |s: &str| {
        Ok(s.split_whitespace()
            .map(|w| {
                let h = w
                    .bytes()
                    .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
                h % vocab as u32
            })
            .collect())
    })
}

/// Within the fixture's 256 positions, so full attention is a reference.
const LEN: usize = 256;

fn trainer(out: &std::path::Path, seed: u64) -> Trainer {
    let (loaded, cfg) = common::settings::tiny_llama();
    let cfg = beacon::BeaconConfig { window: 16, ..cfg };
    let vocab = loaded.model.cfg.vocab_size;
    let docs = (0..3)
        .map(|i| (format!("d{i}"), common::random_tokens(2 * LEN, vocab, i)))
        .collect();
    let packed = Packed::new(&Split { docs }, LEN, Some(2)).unwrap();
    let heldout = vec![
        common::random_tokens(LEN, vocab, 91),
        common::random_tokens(LEN, vocab, 92),
    ];
    let settings = Settings {
        recall_mix: 0.5,
        eval_every: 1,
        seed,
        ..common::settings::tiny_settings(LEN, 2, 1e-3)
    };
    let window = cfg.window;
    let mut t = Trainer::new(loaded.model.clone(), cfg, settings, packed, heldout, out).unwrap();
    t.recall = Some(RecallMix::new(0.5, window, seed, word_encoder(vocab)));
    t
}

#[test]
fn recall_eval_matches_the_independent_views_at_the_answers() {
    let dir = std::env::temp_dir().join(format!("beacon-recall-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = trainer(&dir.join("a"), 3);
    let r = t
        .evaluate_recall()
        .unwrap()
        .expect("held-out samples hold recall questions");

    // The same samples, rebuilt by hand, and the full / window-only views from the target module.
    let mix = t.recall.as_ref().unwrap();
    let (mut full, mut full_decoy, mut none, mut n) = (0f64, 0f64, 0f64, 0usize);
    for (i, text) in t.heldout.iter().enumerate() {
        let s = mix.build_heldout(text, i, false).unwrap();
        let d = mix.build_heldout(text, i, true).unwrap();
        let w = s.label_weights.clone().expect("a recall sample");
        let wd = d.label_weights.clone().expect("a decoy sample");
        // The decoy sample asks as many answer tokens of a different text.
        assert_eq!(d.tokens.len(), s.tokens.len());
        assert_ne!(d.tokens, s.tokens);
        let answers = |x: &[f32]| x.iter().filter(|&&v| v > 0.0).count();
        assert_eq!(answers(&w), answers(&wd));
        let (win, sink) = (t.cfg.window, t.cfg.sink_size);
        let views = compute_targets(&t.tm.plain, &s.tokens, win, sink, 2).unwrap();
        let dviews = compute_targets(&t.tm.plain, &d.tokens, win, sink, 2).unwrap();
        for p in (0..w.len()).filter(|&p| w[p] > 0.0) {
            full += views.nll_full[p] as f64;
            none += views.nll_window[p] as f64;
            n += 1;
        }
        for p in (0..wd.len()).filter(|&p| wd[p] > 0.0) {
            full_decoy += dviews.nll_full[p] as f64;
        }
    }
    assert!(n > 0);
    assert_eq!(r.recall_answer_tokens, n);
    let (full, full_decoy, none) = (full / n as f64, full_decoy / n as f64, none / n as f64);
    let got_full = r
        .recall_full_nll
        .expect("the samples fit the native window");
    assert!((got_full - full).abs() < 1e-4, "{got_full} vs {full}");
    let got_decoy = r.recall_full_decoy_nll.unwrap();
    assert!(
        (got_decoy - full_decoy).abs() < 1e-4,
        "{got_decoy} vs {full_decoy}"
    );
    assert!(
        (r.recall_no_memory_nll - none).abs() < 1e-4,
        "{} vs {none}",
        r.recall_no_memory_nll
    );
    let carried = (r.recall_beacon_decoy_nll - r.recall_beacon_nll) / (full_decoy - full);
    assert!((r.recall_carried.unwrap() - carried).abs() < 1e-6);
    assert!(r.recall_beacon_nll.is_finite() && r.recall_beacon_nll > 0.0);

    // Another run seed: the same held-out recall samples, so runs compare like with like.
    let other = trainer(&dir.join("b"), 11);
    let mix2 = other.recall.as_ref().unwrap();
    for (i, text) in t.heldout.iter().enumerate() {
        assert_eq!(
            mix.build_heldout(text, i, false).unwrap(),
            mix2.build_heldout(text, i, false).unwrap()
        );
    }
    // ... while their training recall samples differ (draws whose facts fit this short sample).
    let pairs: Vec<_> = (0..40)
        .filter_map(|step| {
            let a = mix.build(&t.heldout[0], step, 0).ok()?;
            let b = mix2.build(&t.heldout[0], step, 0).ok()?;
            Some((a, b))
        })
        .collect();
    assert!(!pairs.is_empty());
    assert!(pairs.iter().all(|(a, b)| a != b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stop_after_zero_measures_the_starting_weights() {
    let dir = std::env::temp_dir().join(format!("beacon-recall-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut t = trainer(&dir, 3);
    let want = t.evaluate_recall().unwrap().unwrap();
    assert!(t.run_loop(Some(0), &mut Quiet).unwrap().is_empty());
    let lines: Vec<RecallEval> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].step, 0);
    assert_eq!(lines[0].recall_beacon_nll, want.recall_beacon_nll);
    // A second start at the same step does not measure it again.
    t.run_loop(Some(0), &mut Quiet).unwrap();
    let again = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(
        again
            .lines()
            .filter(|l| l.contains("recall_beacon_nll"))
            .count(),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}
