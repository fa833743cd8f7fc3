//! Resume: N updates straight vs N/2, stop (as after Ctrl-C or a kill right after a checkpoint),
//! then `resume` from the checkpoint give the same loss sequence, bit for bit. A damaged newest
//! checkpoint is skipped for the previous one.

mod common;

use beacon_train::data::{Packed, Split};
use beacon_train::optim::{AdamWConfig, Schedule};
use beacon_train::trainer::{Quiet, Settings, Trainer};

/// The tiny-run settings with what this test varies: accumulation, weight decay, evaluation and
/// checkpoints inside the run.
fn settings(steps: u64) -> Settings {
    let base = common::settings::tiny_settings(80, steps, 1e-2);
    Settings {
        schedule: Schedule {
            warmup: 2,
            ..base.schedule
        },
        adam: AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        accum: 2,
        seed: 3,
        eval_every: 3,
        checkpoint_every: 2,
        ..base
    }
}

fn trainer(out: &std::path::Path, steps: u64) -> Trainer {
    let (loaded, cfg) = common::settings::tiny_llama();
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
