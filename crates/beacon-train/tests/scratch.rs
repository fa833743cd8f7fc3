mod common;
use beacon::engine::position_budget;
use beacon::schedule::RatioChooser;
use beacon::BeaconConfig;
use beacon_train::objective::{plan_windows, sample_gradients, sample_loss, Models, Objective, WindowPlan};
use beacon_train::params::{make_trainable, TrainableModel};
use candle_core::{Tensor, Var};

fn loss_at(tm: &TrainableModel, cfg: &BeaconConfig, tokens: &[u32], windows: &[WindowPlan], var: &Var, base: &Tensor, dir: &Tensor, h: f64) -> f64 {
    var.set(&(base + (dir * h).unwrap()).unwrap()).unwrap();
    let models = Models { train: &tm.train, plain: &tm.plain };
    let l = sample_loss(&models, cfg, tokens, windows, Objective::Lm).unwrap().loss;
    var.set(base).unwrap();
    l
}

#[test]
fn scratch() {
    for (len, ratios, sink, m) in [(72usize, vec![4usize], 0usize, "llama-tiny"), (40, vec![4], 1, "llama-tiny"), (40, vec![4], 0, "qwen2-tiny")] {
    let dir = common::fixture_root().join(m);
    let loaded = common::load_model(&dir);
    let cfg = BeaconConfig { ratios, sink_size: sink, ..loaded.beacon.clone() };
    let tm = make_trainable(loaded.model.clone(), cfg.params, None, 3).unwrap();
    let tokens = common::random_tokens(len, tm.plain.cfg.vocab_size, 5);
    let mut chooser = RatioChooser::new(&cfg, position_budget(&tm.plain.cfg));
    let windows = plan_windows(&cfg, &mut chooser, tokens.len());
    let models = Models { train: &tm.train, plain: &tm.plain };
    let (_, grads) = sample_gradients(&models, &cfg, &tokens, &windows, Objective::Lm, &tm.vars(), 1.0).unwrap();
    for (p, g) in tm.params.iter().zip(&grads) {
        let gn = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
        if gn == 0.0 { continue; }
        let dir = (g / gn).unwrap();
        let base = p.var.as_tensor().copy().unwrap();
        let h = 0.02;
        let d = |h: f64| (loss_at(&tm, &cfg, &tokens, &windows, &p.var, &base, &dir, h) - loss_at(&tm, &cfg, &tokens, &windows, &p.var, &base, &dir, -h)) / (2.0 * h);
        let fd = (4.0 * d(h / 2.0) - d(h)) / 3.0;
        println!("{m} len {len} sink {sink} {:<55} analytic {gn:.6e} fd {fd:.6e} rel {:.1e}", p.name, (fd-gn).abs()/gn);
    }
    }
}

#[test]
fn scratch2() {
    use beacon::engine::{FeedOptions, Mode, Session, Want};
    use beacon_train::objective::{window_labels, window_loss, Target};
    let dir = common::fixture_root().join("llama-tiny");
    let loaded = common::load_model(&dir);
    let cfg = BeaconConfig { ratios: vec![4], sink_size: 0, ..loaded.beacon.clone() };
    let tm = make_trainable(loaded.model.clone(), cfg.params, None, 3).unwrap();
    let tokens = common::random_tokens(72, tm.plain.cfg.vocab_size, 5);
    let mut chooser = RatioChooser::new(&cfg, position_budget(&tm.plain.cfg));
    let windows = plan_windows(&cfg, &mut chooser, tokens.len());
    let models = Models { train: &tm.train, plain: &tm.plain };
    let (res, grads) = sample_gradients(&models, &cfg, &tokens, &windows, Objective::Lm, &tm.vars(), 1.0).unwrap();
    let mut s = Session::new(&tm.train, Mode::Beacon, cfg.clone());
    let opts = FeedOptions { training_final: true, differentiable: true };
    let logits = s.feed_with(&tm.train, &tokens, Want::From(0), opts, &mut |_| {}).unwrap().unwrap();
    let whole = WindowPlan { start: 0, len: tokens.len(), ratio: 4 };
    let mut labels = window_labels(&tokens, &whole, true);
    if let Some(o) = std::env::var("DBG_ONLY").ok().and_then(|x| x.parse::<usize>().ok()) {
        for (i, l) in labels.iter_mut().enumerate() { if i / 32 != o { *l = None; } }
    }
    let loss = window_loss(&logits, Target::Labels(labels), 1.0 / (tokens.len() - 1) as f32).unwrap();
    let full = loss.backward().unwrap();
    println!("loss {} {}", res.loss, loss.to_scalar::<f32>().unwrap());
    for (p, g) in tm.params.iter().zip(&grads) {
        let gn = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
        if gn == 0.0 { continue; }
        let gf = full.get(p.var.as_tensor()).unwrap();
        let gfn = gf.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
        let dot = (g * gf).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let dir = (g / gn).unwrap();
        let base = p.var.as_tensor().copy().unwrap();
        let h = 0.02;
        let d = |h: f64| (loss_at(&tm, &cfg, &tokens, &windows, &p.var, &base, &dir, h) - loss_at(&tm, &cfg, &tokens, &windows, &p.var, &base, &dir, -h)) / (2.0 * h);
        let fd = (4.0 * d(h / 2.0) - d(h)) / 3.0;
        println!("{:<50} |g_re| {gn:.5e} |g_full| {gfn:.5e} g_full·dir {:.5e} fd {fd:.5e}", p.name, dot / gn);
    }
}
