//! Shared helpers of the training tests: the reference fixtures (tiny random models).
#![allow(dead_code)]

pub mod settings;

use beacon::config::{BeaconConfig, BeaconKeys};
use beacon::{load, LoadOptions, Loaded};
use candle_core::Device;
use std::path::{Path, PathBuf};

pub fn fixture_root() -> PathBuf {
    match std::env::var("BEACON_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference"),
    }
}

/// Model directories with `expected/cases.json`, sorted.
pub fn model_dirs() -> Vec<PathBuf> {
    let root = fixture_root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixture root {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected/cases.json").exists())
        .collect();
    dirs.sort();
    dirs
}

pub fn cases(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected/cases.json")).unwrap())
        .unwrap()
}

pub fn load_model(dir: &Path) -> Loaded {
    load(dir, &LoadOptions::default()).expect("load fixture model")
}

/// The case's beacon settings over the checkpoint's.
pub fn case_config(loaded: &Loaded, case: &serde_json::Value, tag: &str) -> BeaconConfig {
    let keys: BeaconKeys =
        serde_json::from_value(case["beacon_settings"].clone()).expect("beacon_settings");
    keys.resolve(loaded.beacon.clone(), tag)
        .expect("settings valid")
}

pub fn input_ids(dir: &Path, name: &str) -> Vec<u32> {
    let inputs =
        candle_core::safetensors::load(dir.join("expected/inputs.safetensors"), &Device::Cpu)
            .unwrap();
    beacon::testing::token_ids(&inputs[name])
}

/// Uniform pseudo-random token ids (splitmix64), for synthetic samples.
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = beacon::schedule::SplitMix64(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}
