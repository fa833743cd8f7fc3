//! Parity with the official implementation (golden outputs on tiny random models).
//!
//! Data-driven: every model directory under the fixture root and every case of its
//! `expected/cases.json` is checked with the case's own `beacon_settings` and `input`, so other
//! shapes, windows, ratios, sinks and case names need no code change. `BEACON_FIXTURES=<dir>`
//! overrides the root (default: the copy in `tests/fixtures/reference`). Finding no case fails.
//!
//! Tolerance: 1e-4 absolute on logits and K/V (the fixtures' own suggestion), ids exact.

use beacon::config::BeaconKeys;
use beacon::session::{Mode, Session, Want};
use beacon::testing::token_ids as ids;
use beacon::{load, LoadOptions};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const ATOL: f32 = 1e-4;

fn fixture_root() -> PathBuf {
    match std::env::var("BEACON_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference"),
    }
}

struct Report {
    checks: usize,
    failures: Vec<String>,
}

impl Report {
    fn close(&mut self, what: &str, got: &Tensor, want: &Tensor) {
        self.checks += 1;
        let got = got
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32");
        let want = want
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32");
        if got.len() != want.len() {
            self.failures.push(format!(
                "{what}: {} values, expected {}",
                got.len(),
                want.len()
            ));
            println!("NOT OK {what}: length {} vs {}", got.len(), want.len());
            return;
        }
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if max.is_nan() || max > ATOL {
            self.failures
                .push(format!("{what}: max |Δ| {max:e} > {ATOL:e}"));
            println!("NOT OK {what}: max |Δ| {max:e}");
        } else {
            println!("OK     {what}: max |Δ| {max:e}");
        }
    }
    fn equal<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        self.checks += 1;
        if got != want {
            self.failures
                .push(format!("{what}: got {got:?}, expected {want:?}"));
            println!("NOT OK {what}: got {got:?}, expected {want:?}");
        } else {
            println!("OK     {what}");
        }
    }
}

fn argmax(row: &Tensor) -> u32 {
    row.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

fn check_case(
    report: &mut Report,
    model_dir: &Path,
    name: &str,
    case: &serde_json::Value,
    inputs: &HashMap<String, Tensor>,
) {
    let tag = format!(
        "{}/{name}",
        model_dir.file_name().unwrap().to_string_lossy()
    );
    let loaded = load(model_dir, &LoadOptions::default()).expect("load model");
    let model = &loaded.model;
    let keys: BeaconKeys =
        serde_json::from_value(case["beacon_settings"].clone()).expect("beacon_settings");
    let cfg = keys
        .resolve(loaded.beacon.clone(), &tag)
        .expect("settings valid");
    let expected = candle_core::safetensors::load(
        model_dir.join(format!("expected/{name}.safetensors")),
        &Device::Cpu,
    )
    .expect("expected tensors");
    let input_name = case["input"].as_str().unwrap_or("input_ids");
    let input = ids(&inputs[input_name]);

    // One forward over the whole input on a fresh memory.
    let mut s = Session::new(model, Mode::Beacon, cfg.clone());
    let first = case["logits_last_chunk_token_positions"][0]
        .as_u64()
        .unwrap_or(0) as usize;
    let logits = s
        .feed(model, &input, Want::From(first))
        .expect("forward")
        .expect("logits");
    if let Some(want) = expected.get("logits_last_chunk") {
        report.close(&format!("{tag} logits_last_chunk"), &logits, want);
    }
    if let Some(want) = expected.get("logits_last") {
        let n = logits.dim(0).unwrap();
        report.close(
            &format!("{tag} logits_last"),
            &logits.get(n - 1).unwrap(),
            want,
        );
    }
    if let Some(a) = case.get("argmax_last").and_then(|v| v.as_u64()) {
        let n = logits.dim(0).unwrap();
        report.equal(
            &format!("{tag} argmax_last"),
            argmax(&logits.get(n - 1).unwrap()) as u64,
            a,
        );
    }
    if let Some(sizes) = case.get("step_beacon_sizes") {
        let want: Vec<i64> = serde_json::from_value(sizes.clone()).unwrap();
        report.equal(
            &format!("{tag} step_beacon_sizes"),
            s.stats().step_beacon_sizes.clone(),
            want,
        );
    }
    let l = &s.layout();
    let ours = [l.sink as i64, l.beacons as i64, l.window_flags.len() as i64];
    if let Some(want) = expected.get("memory_sizes") {
        let want: Vec<Vec<i64>> = want.to_vec2().unwrap();
        for (layer, row) in want.iter().enumerate() {
            report.equal(
                &format!("{tag} memory_sizes layer{layer}"),
                ours.to_vec(),
                row.clone(),
            );
        }
    }
    for layer in 0..model.cfg.num_layers {
        let parts = s.memory_pre_rope(model, layer).expect("memory");
        for (pi, part) in ["sink", "beacon", "raw"].iter().enumerate() {
            for (kv, which) in ["key", "value"].iter().enumerate() {
                let key = format!("memory.layer{layer}.{part}_{which}");
                match (expected.get(&key), &parts[pi]) {
                    (Some(want), Some(got)) => {
                        let got = if kv == 0 { &got.0 } else { &got.1 };
                        report.close(&format!("{tag} {key}"), &got.unsqueeze(0).unwrap(), want)
                    }
                    (Some(_), None) => report.equal(&format!("{tag} {key} present"), false, true),
                    (None, _) => {}
                }
            }
        }
    }

    // Token-by-token feeding, as generation proceeds.
    if let Some(want) = expected.get("logits_stream") {
        let mut s = Session::new(model, Mode::Beacon, cfg.clone());
        let rows: Vec<Tensor> = input
            .iter()
            .map(|&t| s.feed(model, &[t], Want::Last).unwrap().unwrap())
            .collect();
        report.close(
            &format!("{tag} logits_stream"),
            &Tensor::cat(&rows, 0).unwrap(),
            want,
        );
    }

    // Greedy generation from the prompt.
    if let Some(want_ids) = expected.get("gen.output_ids") {
        let prompt = ids(&inputs["prompt_ids"]);
        let want_ids = ids(want_ids);
        let mut s = Session::new(model, Mode::Beacon, cfg.clone());
        let mut logits = s.feed(model, &prompt, Want::Last).unwrap().unwrap();
        let mut got = Vec::new();
        let mut step_logits = Vec::new();
        for _ in 0..want_ids.len() {
            let row = logits.get(0).unwrap();
            let next = argmax(&row);
            step_logits.push(row);
            got.push(next);
            logits = s.feed(model, &[next], Want::Last).unwrap().unwrap();
        }
        report.equal(&format!("{tag} gen.output_ids"), got, want_ids);
        if let Some(want) = expected.get("gen.step_logits") {
            report.close(
                &format!("{tag} gen.step_logits"),
                &Tensor::stack(&step_logits, 0).unwrap(),
                want,
            );
        }
    }
}

#[test]
fn parity_with_reference_fixtures() {
    let root = fixture_root();
    let mut report = Report {
        checks: 0,
        failures: Vec::new(),
    };
    let mut cases = 0;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixture root {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected/cases.json").exists())
        .collect();
    dirs.sort();
    for dir in &dirs {
        let cases_json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected/cases.json")).unwrap(),
        )
        .unwrap();
        let inputs =
            candle_core::safetensors::load(dir.join("expected/inputs.safetensors"), &Device::Cpu)
                .unwrap();
        for (name, case) in &cases_json {
            check_case(&mut report, dir, name, case, &inputs);
            cases += 1;
        }
    }
    assert!(cases > 0, "no fixture case found under {}", root.display());
    println!(
        "{cases} cases, {} checks, {} failures",
        report.checks,
        report.failures.len()
    );
    assert!(
        report.failures.is_empty(),
        "parity failures:\n{}",
        report.failures.join("\n")
    );
}
