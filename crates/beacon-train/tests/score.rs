//! The checkpoint score: spans drawn inside the named held-out documents (named errors otherwise),
//! the score equals the tail perplexity computed by one plain read of the span, and a run scores its
//! starting weights, scores every N updates and keeps the best-scoring weights in `best/`.

mod common;

use beacon::session::{FeedOptions, Mode, Session, Want};
use beacon::BeaconConfig;
use beacon_train::data::{Packed, Split};
use beacon_train::score::{read_scores, ScoreSet, ScoreSpec};
use beacon_train::trainer::{Progress, Trainer};

fn spec(every: u64, len: usize, tail: usize) -> ScoreSpec {
    ScoreSpec {
        every,
        ratio: 4,
        len,
        tail,
    }
}

#[test]
fn spans_come_from_inside_the_named_documents() {
    let a: Vec<u32> = (0..300).collect();
    let held = Split {
        docs: vec![("a".into(), a.clone()), ("b".into(), (0..100).collect())],
    };
    let set = ScoreSet::from_split(&held, &["a".into()], 2, spec(1, 64, 16)).unwrap();
    let starts: Vec<usize> = set.spans.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(starts, vec![78, 157]);
    for (name, s, ids) in &set.spans {
        assert_eq!(name, "a");
        assert_eq!(ids.as_slice(), &a[*s..*s + 64]);
    }
    let missing = ScoreSet::from_split(&held, &["zz".into()], 1, spec(1, 64, 16)).unwrap_err();
    assert!(
        format!("{missing:#}").contains("zz is not a held-out document"),
        "{missing:#}"
    );
    let short = ScoreSet::from_split(&held, &["b".into()], 1, spec(1, 200, 16)).unwrap_err();
    assert!(
        format!("{short:#}").contains("b has 100 tokens"),
        "{short:#}"
    );
    let bad = ScoreSet::from_split(&held, &["a".into()], 1, spec(1, 64, 64)).unwrap_err();
    assert!(format!("{bad:#}").contains("0 < tail < len"), "{bad:#}");
}

/// Tail NLL by one read of the whole span (every logit row at once), at the score's ratio.
fn direct_tail_ppl(
    model: &beacon::model::Model,
    cfg: &BeaconConfig,
    ids: &[u32],
    tail: usize,
) -> f64 {
    let mut s = Session::new(model, Mode::Beacon, cfg.clone());
    let logits = s
        .feed_with(
            model,
            ids,
            Want::From(0),
            FeedOptions::default(),
            &mut |_| {},
        )
        .unwrap()
        .unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    assert_eq!(rows.len(), ids.len());
    let first = ids.len() - tail;
    let nll: f64 = (first..ids.len())
        .map(|t| {
            let row = &rows[t - 1];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            lse - row[ids[t] as usize] as f64
        })
        .sum();
    (nll / tail as f64).exp()
}

struct Notes(Vec<String>);
impl Progress for Notes {
    fn step(&mut self, _m: &beacon_train::trainer::StepMetrics, _total: u64) {}
    fn eval(&mut self, _e: &beacon_train::trainer::EvalMetrics) {}
    fn note(&mut self, msg: &str) {
        self.0.push(msg.to_string());
    }
}

#[test]
fn run_scores_its_start_every_n_updates_and_keeps_the_best() {
    let (loaded, cfg) = common::settings::tiny_llama();
    let vocab = loaded.model.cfg.vocab_size;
    // Train and score on the same repeated text so the score can fall.
    let text = common::random_tokens(200, vocab, 5);
    let held = Split {
        docs: vec![("h".into(), text.clone())],
    };
    let train = Split {
        docs: vec![("t".into(), text[..160].to_vec())],
    };
    let packed = Packed::new(&train, 160, None).unwrap();
    let out = std::env::temp_dir().join(format!("beacon-score-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut t = Trainer::new(
        loaded.model.clone(),
        cfg.clone(),
        common::settings::tiny_settings(160, 6, 3e-2),
        packed,
        Vec::new(),
        &out,
    )
    .unwrap();
    let set = ScoreSet::from_split(&held, &["h".into()], 1, spec(3, 160, 40)).unwrap();
    // Before training: the score equals a direct read of the span at the fixed ratio.
    let m0 = set.score(&t.tm.plain, &cfg, 0, 0.0).unwrap();
    let score_cfg = set.config(&cfg).unwrap();
    assert_eq!(score_cfg.ratios, vec![4]);
    let direct = direct_tail_ppl(&t.tm.plain, &score_cfg, &set.spans[0].2, 40);
    assert!(
        (m0.score_ppl - direct).abs() < 1e-4 * direct,
        "score {} vs direct read {}",
        m0.score_ppl,
        direct
    );
    assert_eq!(m0.score_tokens, 40);

    t.score = Some(set);
    let mut notes = Notes(Vec::new());
    t.run_loop(None, &mut notes).unwrap();
    let scores = read_scores(&out.join("metrics.jsonl"));
    let steps: Vec<u64> = scores.iter().map(|&(s, _)| s).collect();
    assert_eq!(steps, vec![0, 3, 6], "notes: {:?}", notes.0);
    assert!((scores[0].1 - m0.score_ppl).abs() < 1e-9);
    let (best_step, best) =
        scores
            .iter()
            .copied()
            .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/score.json")).unwrap())
            .unwrap();
    assert_eq!(kept["step"].as_u64(), Some(best_step));
    assert!((kept["score_ppl"].as_f64().unwrap() - best).abs() < 1e-9);
    assert!(
        out.join("best/beacon.safetensors").exists()
            && out.join("best/beacon_config.json").exists()
    );
    // Training on the scored text lowers the score.
    assert!(scores[2].1 < scores[0].1, "scores {scores:?}");
    std::fs::remove_dir_all(&out).unwrap();
}
