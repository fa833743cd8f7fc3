//! Resume: N updates straight vs N/2, stop (as after Ctrl-C or a kill right after a checkpoint),
//! then `resume` from the checkpoint give the same loss sequence, bit for bit. A damaged newest
//! checkpoint is skipped for the previous one.

mod common;

use beacon::BeaconConfig;
use beacon_train::data::{Packed, Split};
use beacon_train::objective::Objective;
use beacon_train::optim::{AdamWConfig, Decay, Schedule};
use beacon_train::trainer::{Quiet, Settings, Trainer};

fn settings(steps: u64) -> Settings {
    Settings {
        seq_len: 80,
        objective: Objective::Lm,
        rank: None,
        params: beacon::config::BeaconParams {
            q: true,
            k: true,
            v: true,
            o: false,
        },
        schedule: Schedule {
            peak: 1e-2,
            warmup: 2,
            total: steps,
            min_ratio: 0.1,
            decay: Decay::Cosine,
        },
        adam: AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        clip: 1.0,
        accum: 2,
        seed: 3,
        eval_every: 3,
        checkpoint_every: 2,
        checkpoint_minutes: 0.0,
        keep_checkpoints: 2,
        init_beacons: None,
        recall_mix: 0.0,
        token_weights: Default::default(),
        weight_cap: 5.0,
    }
}

fn trainer(out: &std::path::Path, steps: u64) -> Trainer {
    let dir = common::fixture_root().join("llama-tiny");
    let loaded = common::load_model(&dir);
    let cfg = BeaconConfig {
        ratios: vec![2, 4, 8],
        sink_size: 1,
        ..loaded.beacon.clone()
    };
    let vocab = loaded.model.cfg.vocab_size;
    let docs = (0..5)
        .map(|i| (format!("d{i}"), common::random_tokens(150, vocab, i)))
        .collect();
    let packed = Packed::new(&Split { docs }, 80, Some(2)).unwrap();
    let heldout = vec![common::random_tokens(80, vocab, 77)];
    Trainer::new(
        loaded.model.clone(),
        cfg,
        settings(steps),
        packed,
        heldout,
        out,
    )
    .unwrap()
}

#[test]
fn resumed_run_repeats_the_uninterrupted_losses() {
    let base = std::env::temp_dir().join(format!("beacon-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let n = 8;
    let straight: Vec<f64> = trainer(&base.join("a"), n)
        .run_loop(None, &mut Quiet)
        .unwrap()
        .iter()
        .map(|m| m.loss)
        .collect();

    let out = base.join("b");
    let first: Vec<f64> = trainer(&out, n)
        .run_loop(Some(n / 2), &mut Quiet)
        .unwrap()
        .iter()
        .map(|m| m.loss)
        .collect();
    // A fresh process: new trainer, resume from the newest checkpoint.
    let mut t = trainer(&out, n);
    assert!(t.resume().unwrap());
    assert_eq!(t.state.step, n / 2);
    let rest: Vec<f64> = t
        .run_loop(None, &mut Quiet)
        .unwrap()
        .iter()
        .map(|m| m.loss)
        .collect();
    let resumed: Vec<f64> = first.into_iter().chain(rest).collect();
    println!("straight {straight:?}\nresumed  {resumed:?}");
    assert_eq!(straight, resumed);
    // The metrics file holds each step once, and the held-out curve too.
    let (train, held) = beacon_train::trainer::read_curves(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        train.iter().map(|p| p.0 as u64).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert_eq!(held.len(), (n / 3) as usize);

    // Damage the newest checkpoint: resume falls back to the one before.
    let ckpts = beacon_train::checkpoint::list(&out.join("checkpoints")).unwrap();
    assert_eq!(ckpts, vec![n, n - 2]);
    let newest = out
        .join("checkpoints")
        .join(format!("ckpt-{n:09}.safetensors"));
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&newest, bytes).unwrap();
    let mut t = trainer(&out, n);
    assert!(t.resume().unwrap());
    assert_eq!(t.state.step, n - 2);
    std::fs::remove_dir_all(&base).unwrap();
}
