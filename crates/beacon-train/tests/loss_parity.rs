//! Training-mode loss parity with the reference: every fixture case that has a training loss
//! (`train.loss` tensor or `train_loss` in cases.json) is recomputed through the trainer's own code
//! path (window-level recomputation, fused loss) and must match at 1e-4, with the same number of
//! valid labels and the same beacons per window (`train_step_beacon_sizes`). Data-driven: new cases
//! need no code change.

mod common;

use beacon::schedule::RatioChooser;
use beacon::session::position_budget;
use beacon_train::objective::{plan_windows, sample_gradients, Models, Objective, SampleView};
use beacon_train::params::make_trainable;
use candle_core::Device;

const TOL: f64 = 1e-4;

#[test]
fn training_loss_matches_reference() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for dir in common::model_dirs() {
        let loaded = common::load_model(&dir);
        for (name, case) in common::cases(&dir) {
            let tag = format!("{}/{name}", dir.file_name().unwrap().to_string_lossy());
            let expected = candle_core::safetensors::load(
                dir.join(format!("expected/{name}.safetensors")),
                &Device::Cpu,
            )
            .unwrap();
            let want = match (
                expected.get("train.loss"),
                case.get("train_loss").and_then(|v| v.as_f64()),
            ) {
                (Some(t), _) => t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64,
                (None, Some(v)) => v,
                (None, None) => continue,
            };
            let cfg = common::case_config(&loaded, &case, &tag);
            let input = common::input_ids(&dir, case["input"].as_str().unwrap_or("input_ids"));
            let tm = make_trainable(loaded.model.clone(), cfg.params, None, 0).unwrap();
            let mut chooser = RatioChooser::new(&cfg, position_budget(&tm.plain.cfg));
            let windows = plan_windows(&cfg, &mut chooser, input.len());
            let models = Models {
                train: &tm.train,
                plain: &tm.plain,
            };
            let (res, grads) = sample_gradients(
                &models,
                &cfg,
                &SampleView::plain(&input),
                &windows,
                Objective::Lm,
                &tm.vars(),
                1.0,
            )
            .unwrap();
            let err = (res.loss - want).abs();
            let ok = err <= TOL;
            println!(
                "{} {tag}: loss {:.6} vs {:.6} (|Δ| {:.2e})",
                if ok { "OK    " } else { "NOT OK" },
                res.loss,
                want,
                err
            );
            if !ok {
                failures.push(format!("{tag}: loss {} vs {want}", res.loss));
            }
            if let Some(n) = case.get("train_valid_token_num").and_then(|v| v.as_u64()) {
                if res.valid as u64 != n {
                    failures.push(format!("{tag}: {} valid labels, expected {n}", res.valid));
                }
            }
            if let Some(sizes) = case.get("train_step_beacon_sizes") {
                let want: Vec<i64> = serde_json::from_value(sizes.clone()).unwrap();
                if res.step_beacon_sizes != want {
                    failures.push(format!(
                        "{tag}: beacons per window {:?}, expected {want:?}",
                        res.step_beacon_sizes
                    ));
                }
            }
            // Every trained tensor gets a finite, non-zero gradient, except the last layer's beacon
            // query: it only shapes the last layer's beacon rows, whose outputs nothing reads (memory
            // keeps K/V, and beacon logits are discarded), so its gradient is exactly zero.
            let last_q = format!(
                "model.layers.{}.self_attn.beacon_q_proj",
                tm.plain.cfg.num_layers - 1
            );
            for (p, g) in tm.params.iter().zip(&grads) {
                let n = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                if p.name.starts_with(&last_q) {
                    if n != 0.0 {
                        failures.push(format!("{tag}: gradient of {} should be 0, is {n}", p.name));
                    }
                } else if !(n.is_finite() && n > 0.0) {
                    failures.push(format!("{tag}: gradient of {} is {n}", p.name));
                }
            }
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "no fixture case with a training loss under {}",
        common::fixture_root().display()
    );
    println!("{checked} cases checked");
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}
