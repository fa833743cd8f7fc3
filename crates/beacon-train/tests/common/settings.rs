//! Settings of the tiny-model runs (overfit.rs, resume.rs, score.rs).
use beacon::{BeaconConfig, Loaded};
use beacon_train::objective::Objective;
use beacon_train::optim::{AdamWConfig, Decay, Schedule};
use beacon_train::trainer::Settings;

pub fn tiny_settings(seq_len: usize, steps: u64, lr: f64) -> Settings {
    Settings {
        seq_len,
        objective: Objective::Lm,
        rank: None,
        params: beacon::config::BeaconParams {
            q: true,
            k: true,
            v: true,
            o: false,
        },
        schedule: Schedule {
            peak: lr,
            warmup: 10,
            total: steps,
            min_ratio: 0.1,
            decay: Decay::Cosine,
        },
        adam: AdamWConfig::default(),
        clip: 1.0,
        accum: 1,
        seed: 7,
        eval_every: 0,
        checkpoint_every: 0,
        checkpoint_minutes: 0.0,
        keep_checkpoints: 2,
        init_beacons: None,
        recall_mix: 0.0,
        token_weights: Default::default(),
        weight_cap: 5.0,
        window_start_weight: 3.0,
        window_start_span: 128,
    }
}

/// The llama-tiny fixture with sink 1 and ratios 2, 4, 8 drawn per window.
pub fn tiny_llama() -> (Loaded, BeaconConfig) {
    let loaded = super::load_model(&super::fixture_root().join("llama-tiny"));
    let cfg = BeaconConfig {
        ratios: vec![2, 4, 8],
        sink_size: 1,
        ..loaded.beacon.clone()
    };
    (loaded, cfg)
}
