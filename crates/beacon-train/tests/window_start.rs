//! `--token-weights window-start`: which labels the weights touch, that the training loss is the
//! weighted mean of the per-label NLLs read through the inference path, and that an exported run
//! records how it was trained in `beacon_config.json` without the loader minding.

mod common;

use beacon::schedule::RatioChooser;
use beacon::session::{position_budget, Mode};
use beacon_train::data::{Packed, Split};
use beacon_train::objective::{
    plan_windows, sample_gradients, window_start_weights, Models, Objective, SampleView, WindowPlan,
};
use beacon_train::params::make_trainable;
use beacon_train::trainer::{labelled_nll, Settings, TokenWeights, Trainer};

fn plan(spans: &[(usize, usize)]) -> Vec<WindowPlan> {
    spans
        .iter()
        .map(|&(start, len)| WindowPlan {
            start,
            len,
            ratio: 2,
        })
        .collect()
}

#[test]
fn weights_cover_each_later_windows_first_labels() {
    let w = window_start_weights(&plan(&[(0, 16), (16, 16), (32, 10), (42, 2)]), 4, 3.0);
    let mut want = vec![1.0f32; 44];
    for p in [16, 17, 18, 19, 32, 33, 34, 35, 42, 43] {
        want[p] = 3.0;
    }
    assert_eq!(w, want);
    assert_eq!(
        window_start_weights(&plan(&[(0, 16)]), 4, 3.0),
        vec![1.0; 16]
    );
}

#[test]
fn weighted_loss_is_the_weighted_mean_of_inference_nlls() {
    let (loaded, cfg) = common::settings::tiny_llama();
    let tokens = common::random_tokens(5 * cfg.window / 2, loaded.model.cfg.vocab_size, 12);
    let tm = make_trainable(loaded.model.clone(), cfg.params, None, 0).unwrap();
    let mut chooser = RatioChooser::new(&cfg, position_budget(&tm.plain.cfg));
    let windows = plan_windows(&cfg, &mut chooser, tokens.len());
    assert!(windows.len() >= 3, "the sample must span several windows");
    let (span, weight) = (cfg.window / 4, 3.0f32);
    let weights = window_start_weights(&windows, span, weight);
    let models = Models {
        train: &tm.train,
        plain: &tm.plain,
    };
    let view = SampleView {
        tokens: &tokens,
        label_weights: Some(&weights),
        cached: None,
    };
    let (res, _) = sample_gradients(
        &models,
        &cfg,
        &view,
        &windows,
        Objective::Lm,
        &tm.vars(),
        1.0,
    )
    .unwrap();

    // The same labels, split into the weighted ones and the rest, read by the inference path.
    let start_mask: Vec<f32> = weights.iter().map(|&x| (x != 1.0) as u8 as f32).collect();
    let rest_mask: Vec<f32> = start_mask.iter().map(|&m| 1.0 - m).collect();
    let nll = |mask: &[f32]| {
        labelled_nll(&tm.plain, &cfg, Mode::Beacon, &tokens, Some(mask), &windows).unwrap()
    };
    let ((start_sum, start_n), (rest_sum, rest_n)) = (nll(&start_mask), nll(&rest_mask));
    assert!(start_n > 0 && rest_n > 0);
    let w = weight as f64;
    let want = (w * start_sum + rest_sum) / (w * start_n as f64 + rest_n as f64);
    let plain_mean = (start_sum + rest_sum) / (start_n + rest_n) as f64;
    assert!(
        (res.loss - want).abs() < 1e-4,
        "weighted loss {} vs {want} (unweighted {plain_mean})",
        res.loss
    );
    assert!(
        (want - plain_mean).abs() > 1e-3,
        "the weights must change the loss for this test to mean anything"
    );
}

#[test]
fn exported_config_records_the_training_settings() {
    let (loaded, cfg) = common::settings::tiny_llama();
    let vocab = loaded.model.cfg.vocab_size;
    let len = 5 * cfg.window / 2;
    let docs = (0..4)
        .map(|i| (format!("d{i}"), common::random_tokens(2 * len, vocab, i)))
        .collect();
    let packed = Packed::new(&Split { docs }, len, Some(2)).unwrap();
    let settings = Settings {
        token_weights: TokenWeights::WindowStart,
        window_start_weight: 2.5,
        window_start_span: 3,
        ..common::settings::tiny_settings(len, 2, 1e-3)
    };
    let dir = std::env::temp_dir().join(format!("beacon-window-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut t = Trainer::new(loaded.model.clone(), cfg, settings, packed, vec![], &dir).unwrap();
    let m = t.train_step().unwrap();
    assert!(m.loss.is_finite());
    t.export(&dir, candle_core::DType::F32).unwrap();

    let path = dir.join("beacon_config.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let training = &json["training"];
    assert_eq!(training["settings"]["token_weights"], "window-start");
    assert_eq!(training["settings"]["window_start_weight"], 2.5);
    assert_eq!(training["settings"]["window_start_span"], 3);
    assert_eq!(training["updates"], 1);
    // The engine reads the beacon keys and ignores the training section.
    let keys = beacon::config::BeaconKeys::from_file(&path).unwrap();
    assert_eq!(keys.beacon_ratio, Some(vec![2, 4, 8]));
    std::fs::remove_dir_all(&dir).unwrap();
}
