//! Gradient checks of the beacon parameters on the tiny fixture models.
//!
//! 1. Window-level recomputation (the trainer's path: windows replayed last to first, memory
//!    gradients chained by hand) equals the gradient of one graph over the whole sample.
//! 2. Analytic gradients agree with finite differences. Everything runs in f32 (the engine computes
//!    softmax and norms in f32), so finite differences are taken along directional derivatives with a
//!    Richardson-extrapolated central difference (step chosen so the loss moves by ~1e-2); the stated
//!    bound is a relative error < 1e-3 (observed worst: ~1.5e-4).

mod common;

use beacon::config::BeaconParams;
use beacon::schedule::RatioChooser;
use beacon::session::{position_budget, FeedOptions, Mode, Session, Want};
use beacon::testing::{max_abs, max_rel_diff};
use beacon::BeaconConfig;
use beacon_train::objective::{
    plan_windows, sample_gradients, sample_loss, window_labels, window_loss, Models, Objective,
    SampleView, Target, WindowPlan,
};
use beacon_train::params::{make_trainable, TrainableModel};
use candle_core::{Tensor, Var};

fn setup(
    model_dir: &str,
    ratios: Vec<usize>,
    sink: usize,
    rank: Option<usize>,
) -> (TrainableModel, BeaconConfig) {
    let dir = common::fixture_root().join(model_dir);
    let loaded = common::load_model(&dir);
    let cfg = BeaconConfig {
        ratios,
        sink_size: sink,
        ..loaded.beacon.clone()
    };
    let tm = make_trainable(loaded.model.clone(), cfg.params, rank, 3).unwrap();
    (tm, cfg)
}

/// The fixture's q,k,v beacons plus a `beacon_o_proj`, added the way `beacon train --init-beacons
/// FILE --beacon-param q,k,v,o` adds it: initialise all four from the backbone, then read the
/// projections the file holds. Checks that the file's q,k,v arrive unchanged and o is the copy.
fn setup_with_o(
    model_dir: &str,
    ratios: Vec<usize>,
    sink: usize,
) -> (TrainableModel, BeaconConfig) {
    let dir = common::fixture_root().join(model_dir);
    let loaded = common::load_model(&dir);
    let params = BeaconParams {
        o: true,
        ..loaded.beacon.params
    };
    assert!(
        params.q && params.k && params.v,
        "fixture has q,k,v beacons"
    );
    let cfg = BeaconConfig {
        ratios,
        sink_size: sink,
        params,
        ..loaded.beacon.clone()
    };
    let mut model = loaded.model.clone();
    beacon::loader::init_beacons(&mut model, &cfg).unwrap();
    let kept =
        beacon::loader::load_beacon_weights(&mut model, &dir.join("model.safetensors"), params)
            .unwrap();
    assert_eq!(kept.names(), vec!["o"]);
    for (i, (got, file)) in model.layers.iter().zip(&loaded.model.layers).enumerate() {
        let dense =
            |l: &Option<beacon::model::Linear>| l.as_ref().unwrap().weight.to_dense().unwrap();
        for (which, g, f) in [
            ("q", &got.beacon.q, &file.beacon.q),
            ("k", &got.beacon.k, &file.beacon.k),
            ("v", &got.beacon.v, &file.beacon.v),
        ] {
            let d = max_abs(&(dense(g) - dense(f)).unwrap());
            assert!(
                d == 0.0,
                "layer {i} beacon_{which}: differs from the file by {d}"
            );
        }
        let o = dense(&got.beacon.o);
        let d = max_abs(&(o - got.attn.o_proj.weight.to_dense().unwrap()).unwrap());
        assert!(d == 0.0, "layer {i} beacon_o: not a copy of o_proj ({d})");
    }
    let tm = make_trainable(model, params, None, 3).unwrap();
    (tm, cfg)
}

#[test]
fn recomputation_equals_whole_sample_graph() {
    for (model_dir, sink) in [("qwen2-tiny", 1), ("llama-tiny", 0)] {
        recomputation_case(model_dir, sink, None, false);
    }
}

/// The same with separate beacon output projections (`beacon_param` q,k,v,o, the official default),
/// added to the fixture's q,k,v file as a warm start does.
#[test]
fn recomputation_with_o_projection() {
    recomputation_case("llama-tiny", 1, None, true);
}

/// Per-label weights (token weighting, answer-only recall loss) flow through the recomputation the
/// same way: some labels weigh 0, others up to 3.
#[test]
fn weighted_recomputation_equals_whole_sample_graph() {
    let weights: Vec<f32> = (0..150).map(|i| ((i * 7) % 13) as f32 / 4.0).collect();
    assert!(weights.contains(&0.0));
    recomputation_case("qwen2-tiny", 1, Some(weights), false);
}

fn recomputation_case(model_dir: &str, sink: usize, weights: Option<Vec<f32>>, with_o: bool) {
    {
        let (tm, cfg) = if with_o {
            setup_with_o(model_dir, vec![4], sink)
        } else {
            setup(model_dir, vec![4], sink, None)
        };
        if with_o {
            assert!(tm.params.iter().any(|p| p.name.contains("beacon_o_proj")));
        }
        let tokens = common::random_tokens(150, tm.plain.cfg.vocab_size, 11);
        let mut chooser = RatioChooser::new(&cfg, position_budget(&tm.plain.cfg));
        let windows = plan_windows(&cfg, &mut chooser, tokens.len());
        let models = Models {
            train: &tm.train,
            plain: &tm.plain,
        };
        let (res, grads) = sample_gradients(
            &models,
            &cfg,
            &SampleView {
                label_weights: weights.as_deref(),
                ..SampleView::plain(&tokens)
            },
            &windows,
            Objective::Lm,
            &tm.vars(),
            1.0,
        )
        .unwrap();

        // One graph over the whole sample: every window's memory stays in the graph.
        let mut s = Session::new(&tm.train, Mode::Beacon, cfg.clone());
        let opts = FeedOptions {
            training_final: true,
            differentiable: true,
            window_ratio: None,
        };
        let logits = s
            .feed_with(&tm.train, &tokens, Want::From(0), opts, &mut |_| {})
            .unwrap()
            .unwrap();
        let whole = WindowPlan {
            start: 0,
            len: tokens.len(),
            ratio: 4,
        };
        let labels = window_labels(&tokens, &whole, true, weights.as_deref());
        let weight_sum: f32 = match &weights {
            None => (tokens.len() - 1) as f32,
            Some(w) => w[..tokens.len() - 1].iter().sum(),
        };
        let loss = window_loss(
            &logits,
            Target::Labels(labels),
            1.0 / weight_sum,
            weights.clone(),
        )
        .unwrap();
        let full = loss.backward().unwrap();
        let l_full = loss.to_scalar::<f32>().unwrap() as f64;
        println!(
            "{model_dir}: loss recomputed {:.7} whole-graph {:.7}",
            res.loss, l_full
        );
        assert!((res.loss - l_full).abs() < 1e-5);
        for (p, g) in tm.params.iter().zip(&grads) {
            let Some(gf) = full.get(p.var.as_tensor()) else {
                let n = max_abs(g);
                assert!(
                    n == 0.0,
                    "{}: no whole-graph gradient but recomputed max {n}",
                    p.name
                );
                continue;
            };
            // |gf − g| / max |gf|
            let r = max_rel_diff(g, gf);
            println!("  {:<55} rel max |Δ| {r:.2e}", p.name);
            assert!(
                r < 1e-4,
                "{model_dir} {}: recomputed gradient differs by {r:e}",
                p.name
            );
        }
    }
}

/// One sample's loss as a function of the parameters.
struct Problem<'a> {
    tm: &'a TrainableModel,
    cfg: &'a BeaconConfig,
    tokens: &'a [u32],
    windows: &'a [WindowPlan],
}

/// Loss with parameter `var` moved to `base + h·dir`.
fn loss_at(p: &Problem, var: &Var, base: &Tensor, dir: &Tensor, h: f64) -> f64 {
    var.set(&(base + (dir * h).unwrap()).unwrap()).unwrap();
    let models = Models {
        train: &p.tm.train,
        plain: &p.tm.plain,
    };
    let l = sample_loss(&models, p.cfg, p.tokens, p.windows, Objective::Lm)
        .unwrap()
        .loss;
    var.set(base).unwrap();
    l
}

fn check_fd(model_dir: &str, rank: Option<usize>, with_o: bool, objective_note: &str) {
    let (tm, cfg) = if with_o {
        setup_with_o(model_dir, vec![2, 4, 8], 1)
    } else {
        setup(model_dir, vec![2, 4, 8], 1, rank)
    };
    let tokens = common::random_tokens(96, tm.plain.cfg.vocab_size, 5);
    let mut chooser = RatioChooser::new(&cfg, position_budget(&tm.plain.cfg));
    let windows = plan_windows(&cfg, &mut chooser, tokens.len());
    let models = Models {
        train: &tm.train,
        plain: &tm.plain,
    };
    let (_, grads) = sample_gradients(
        &models,
        &cfg,
        &SampleView::plain(&tokens),
        &windows,
        Objective::Lm,
        &tm.vars(),
        1.0,
    )
    .unwrap();
    let mut worst = 0f64;
    for (p, g) in tm.params.iter().zip(&grads) {
        let gn = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64;
        if gn == 0.0 {
            continue; // the last layer's beacon query (see the loss-parity test)
        }
        // Direction of steepest ascent: the directional derivative is |g|.
        let dir = (g / gn).unwrap();
        let base = p.var.as_tensor().copy().unwrap();
        let h = (1e-2 / gn).clamp(1e-3, 0.2); // moves the loss by ~1e-2: well above f32 rounding, small curvature error
        let pr = Problem {
            tm: &tm,
            cfg: &cfg,
            tokens: &tokens,
            windows: &windows,
        };
        let d = |h: f64| {
            (loss_at(&pr, &p.var, &base, &dir, h) - loss_at(&pr, &p.var, &base, &dir, -h))
                / (2.0 * h)
        };
        let fd = (4.0 * d(h / 2.0) - d(h)) / 3.0; // Richardson: cancels the h² term
        let rel = (fd - gn).abs() / gn;
        worst = worst.max(rel);
        println!(
            "{model_dir} {objective_note} {:<55} analytic {gn:.6e} fd {fd:.6e} rel {rel:.1e}",
            p.name
        );
    }
    assert!(
        worst < 1e-3,
        "{model_dir} {objective_note}: worst relative error {worst:e}"
    );
}

#[test]
fn finite_differences_full_rank() {
    check_fd("qwen2-tiny", None, false, "full");
}

#[test]
fn finite_differences_with_o_projection() {
    check_fd("qwen2-tiny", None, true, "qkvo");
}

#[test]
fn finite_differences_low_rank() {
    check_fd("llama-tiny", Some(4), false, "rank4");
}

/// A raw tail (`beacon_raw_tail`) is replaced at every close, so a window's memory is no longer a
/// prefix of the final one, which the two-pass gradient assumes: the objective refuses it by name
/// instead of returning a wrong gradient (scripts/train_gpu.py trains with a tail).
#[test]
fn objective_refuses_a_raw_tail_by_name() {
    let (tm, cfg) = setup("llama-tiny", vec![4], 1, None);
    let cfg = BeaconConfig { raw_tail: 2, ..cfg };
    let tokens = common::random_tokens(150, tm.plain.cfg.vocab_size, 11);
    let mut chooser = RatioChooser::new(&cfg, position_budget(&tm.plain.cfg));
    let windows = plan_windows(&cfg, &mut chooser, tokens.len());
    assert!(windows.len() > 1, "the sample must close a window");
    let models = Models {
        train: &tm.train,
        plain: &tm.plain,
    };
    let Err(err) = sample_loss(&models, &cfg, &tokens, &windows, Objective::Lm) else {
        panic!("a raw tail must be refused");
    };
    let msg = format!("{err:#}");
    assert!(msg.contains("beacon_raw_tail 2"), "{msg}");
}
