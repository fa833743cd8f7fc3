//! A tiny model overfits a fixed batch: training only the beacon parameters on one fixed sample
//! must at least halve the loss within a few hundred updates (fast enough for CI). A fixed ratio
//! (2) keeps the layout the same at every update; observed: 5.89 → ~1.5 in 400 updates, ~16 s.

mod common;

use beacon::BeaconConfig;
use beacon_train::data::{Packed, Split};
use beacon_train::params::TrainableModel;
use beacon_train::trainer::{Quiet, Trainer};

use common::settings::tiny_settings;

#[test]
fn tiny_model_overfits_a_fixed_sample() {
    let dir = common::fixture_root().join("qwen2-tiny");
    let loaded = common::load_model(&dir);
    let cfg = BeaconConfig {
        ratios: vec![2],
        sink_size: 1,
        ..loaded.beacon.clone()
    };
    // One fixed sample of 4 windows: the packed split holds exactly one sample.
    let tokens = common::random_tokens(128, loaded.model.cfg.vocab_size, 99);
    let split = Split {
        docs: vec![("fixed".into(), tokens)],
    };
    let packed = Packed::new(&split, 128, None).unwrap();
    assert_eq!(packed.len(), 1);
    let out = std::env::temp_dir().join(format!("beacon-overfit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let steps = 400;
    let mut t = Trainer::new(
        loaded.model.clone(),
        cfg,
        tiny_settings(128, steps, 3e-2),
        packed,
        Vec::new(),
        &out,
    )
    .unwrap();
    let _: &TrainableModel = &t.tm;
    let start = std::time::Instant::now();
    let m = t.run_loop(None, &mut Quiet).unwrap();
    let first = m[0].loss;
    let last: f64 = m[m.len() - 10..].iter().map(|x| x.loss).sum::<f64>() / 10.0;
    println!(
        "loss {first:.4} → {last:.4} in {} updates, {:.1} s",
        m.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(last < first / 2.0, "loss fell only from {first} to {last}");
    assert!(out.join("loss.png").exists() && out.join("metrics.jsonl").exists());
    std::fs::remove_dir_all(&out).unwrap();
}
