//! The training loop: samples → per-sample gradients (objective.rs) → accumulation → clipping →
//! AdamW with warm-up and decay → metrics, held-out evaluation, checkpoints, plot, export.

use crate::checkpoint;
use crate::data::{DataPosition, Packed, SampleStream};
use crate::objective::SampleView;
use crate::objective::{self, Models, Objective, WindowPlan};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Decay, Schedule};
use crate::params::{make_trainable, TrainableModel};
use crate::recall::{RecallMix, Sample};
use crate::score::{self, ScoreMetrics, ScoreSet};
use crate::targets::{self, TargetCache};
use anyhow::{bail, Context, Result};
use beacon::config::{BeaconConfig, BeaconKeys, BeaconParams, RatioMix};
use beacon::model::Model;
use beacon::schedule::{RatioChooser, SplitMix64};
use beacon::session::{position_budget, FeedOptions, Mode, Session, Want};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Hyper-parameters of a run (saved in every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Tokens per training sample.
    pub seq_len: usize,
    pub objective: Objective,
    /// Beacon projections as backbone + A·B of this rank (None = full matrices).
    pub rank: Option<usize>,
    pub params: BeaconParams,
    pub schedule: Schedule,
    pub adam: AdamWConfig,
    /// Max global gradient norm (0 = off).
    pub clip: f64,
    /// Samples per optimiser update.
    pub accum: usize,
    pub seed: u64,
    /// Held-out evaluation every this many updates (0 = never).
    pub eval_every: u64,
    /// Checkpoint every this many updates (0 = only on time / at the end).
    pub checkpoint_every: u64,
    /// Also checkpoint when this many minutes passed since the last one (0 = off).
    pub checkpoint_minutes: f64,
    pub keep_checkpoints: usize,
    /// The beacon weights the run started from (`--init-beacons`); None = the backbone copy.
    #[serde(default)]
    pub init_beacons: Option<String>,
    /// Fraction of samples turned into recall samples (`recall.rs`); 0 = plain text only.
    #[serde(default)]
    pub recall_mix: f64,
    /// How plain samples' labels are weighted.
    #[serde(default)]
    pub token_weights: TokenWeights,
    /// Largest long-gain weight.
    #[serde(default = "default_weight_cap")]
    pub weight_cap: f64,
    /// Weight of the first `window_start_span` labels of every window after the first
    /// ([`TokenWeights::WindowStart`]).
    #[serde(default = "default_window_start_weight")]
    pub window_start_weight: f64,
    #[serde(default = "default_window_start_span")]
    pub window_start_span: usize,
}

fn default_weight_cap() -> f64 {
    5.0
}

fn default_window_start_weight() -> f64 {
    3.0
}

fn default_window_start_span() -> usize {
    128
}

/// Label weighting of plain text samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TokenWeights {
    /// Every label weighs 1 (the paper's loss).
    #[default]
    None,
    /// `min(exp(nll_window − nll_full), cap)` from the cached backbone targets: tokens only the far
    /// context predicts dominate (the LongCE / LongPPL idea).
    LongGain,
    /// The first `window_start_span` labels of every window after the first weigh
    /// `window_start_weight`: there the open window holds few raw tokens and the model leans on the
    /// beacons, and that is where compression loses most to truncation (docs/TRAINING.md).
    WindowStart,
}

/// Everything besides tensors that a resumed run needs to continue identically.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Updates done.
    pub step: u64,
    pub data: DataPosition,
    /// State of the per-window ratio draws.
    pub ratio_rng: SplitMix64,
    pub tokens_seen: u64,
    /// Training wall time so far (all sessions).
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub state: TrainState,
    pub settings: Settings,
    pub beacon: BeaconKeys,
    /// Parameter names, in optimiser order.
    pub param_names: Vec<String>,
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub elapsed_s: f64,
    pub peak_rss_mib: f64,
    /// Ratios of the windows of the step's samples.
    pub ratios: Vec<usize>,
    /// Samples of the update that were recall samples (their loss is over answers only).
    #[serde(default)]
    pub recall_samples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: u64,
    pub heldout_loss: f64,
    pub heldout_ppl: f64,
    pub heldout_tokens: usize,
    pub eval_s: f64,
    pub elapsed_s: f64,
}

/// One line of metrics.jsonl: held-out recall (`Trainer::evaluate_recall`), mean NLL per answer token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecallEval {
    pub step: u64,
    pub recall_beacon_nll: f64,
    /// The same with decoys planted instead of the asked facts.
    pub recall_beacon_decoy_nll: f64,
    /// None when the samples are longer than the native window (full attention would extrapolate).
    pub recall_full_nll: Option<f64>,
    pub recall_full_decoy_nll: Option<f64>,
    /// Sink + open window only (the backbone alone: no beacons anywhere).
    pub recall_no_memory_nll: f64,
    /// (beacon decoy − beacon) / (full decoy − full): 0 = reading through the beacons gains nothing
    /// from the planted facts, 1 = as much as full attention over the raw text.
    pub recall_carried: Option<f64>,
    pub recall_answer_tokens: usize,
    pub eval_s: f64,
}

/// Held-out recall samples (facts, decoys, answer tokens) and the sums of answer NLL that do not
/// depend on the beacon weights.
struct RecallSet {
    samples: Vec<(Sample, Sample, usize)>,
    answers: usize,
    /// (facts, decoys) with full attention; None past the native window.
    full: Option<(f64, f64)>,
    no_memory: f64,
}

/// Peak resident set size of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

pub struct Trainer {
    pub tm: TrainableModel,
    pub cfg: BeaconConfig,
    pub settings: Settings,
    pub opt: AdamW,
    pub chooser: RatioChooser,
    pub stream: SampleStream,
    pub heldout: Vec<Vec<u32>>,
    pub state: TrainState,
    pub out_dir: PathBuf,
    /// Builds recall samples when `settings.recall_mix > 0` (needs the tokenizer: set by the caller).
    pub recall: Option<RecallMix>,
    /// Cached backbone targets, when the objective or the weighting needs them (set by the caller).
    pub targets: Option<TargetCache>,
    /// The checkpoint score (`score.rs`), when asked for (set by the caller).
    pub score: Option<ScoreSet>,
    /// dtype of exported weights (`beacon.safetensors`, `best/`).
    pub export_dtype: DType,
    last_checkpoint: Instant,
    /// Built on the first held-out recall evaluation (`recall_set`).
    recall_set: std::sync::OnceLock<Option<RecallSet>>,
}

impl Trainer {
    /// A fresh run. `model` must carry initialised (or loaded) beacon projections.
    pub fn new(
        model: Model,
        cfg: BeaconConfig,
        settings: Settings,
        train: Packed,
        heldout: Vec<Vec<u32>>,
        out_dir: &Path,
    ) -> Result<Self> {
        if train.seq_len != settings.seq_len {
            bail!(
                "packed samples have {} tokens, settings say {}",
                train.seq_len,
                settings.seq_len
            );
        }
        let tm = make_trainable(model, settings.params, settings.rank, settings.seed)?;
        let opt = AdamW::new(&tm.vars(), settings.adam)?;
        let mut chooser = RatioChooser::new(&cfg, position_budget(&tm.plain.cfg));
        chooser.rng = SplitMix64(settings.seed);
        let state = TrainState {
            step: 0,
            data: DataPosition::default(),
            ratio_rng: chooser.rng,
            tokens_seen: 0,
            elapsed_s: 0.0,
        };
        let stream = SampleStream::new(train, settings.seed, state.data)?;
        Ok(Trainer {
            tm,
            cfg,
            settings,
            opt,
            chooser,
            stream,
            heldout,
            state,
            out_dir: out_dir.to_path_buf(),
            recall: None,
            targets: None,
            score: None,
            export_dtype: DType::BF16,
            last_checkpoint: Instant::now(),
            recall_set: std::sync::OnceLock::new(),
        })
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.out_dir.join("checkpoints")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.out_dir.join("metrics.jsonl")
    }

    fn models(&self) -> Models<'_> {
        Models {
            train: &self.tm.train,
            plain: &self.tm.plain,
        }
    }

    /// Continue from the newest valid checkpoint, if any. Metrics lines past it are dropped (those
    /// steps will be redone). Returns whether a checkpoint was loaded.
    pub fn resume(&mut self) -> Result<bool> {
        let Some((env, tensors)) =
            checkpoint::load_latest::<CheckpointMeta>(&self.checkpoint_dir())?
        else {
            return Ok(false);
        };
        let meta = env.meta;
        let names: Vec<String> = self.tm.params.iter().map(|p| p.name.clone()).collect();
        if meta.param_names != names {
            bail!("checkpoint parameters differ from this model's (different --beacon-rank or beacon_param?)");
        }
        let (a, b) = (&meta.settings, &self.settings);
        if a.seq_len != b.seq_len
            || a.objective != b.objective
            || a.recall_mix != b.recall_mix
            || a.token_weights != b.token_weights
            || (a.token_weights == TokenWeights::WindowStart
                && (a.window_start_weight != b.window_start_weight
                    || a.window_start_span != b.window_start_span))
        {
            let window_start = if a.token_weights == TokenWeights::WindowStart {
                format!(
                    " (weight {} over the first {} labels)",
                    a.window_start_weight, a.window_start_span
                )
            } else {
                String::new()
            };
            bail!(
                "checkpoint was trained with seq_len {} / {:?} / recall mix {} / token weights {:?}{window_start}; resume with the same settings",
                a.seq_len,
                a.objective,
                a.recall_mix,
                a.token_weights
            );
        }
        let get = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .with_context(|| format!("checkpoint lacks {k}"))
        };
        let mut m = Vec::new();
        let mut v = Vec::new();
        for p in &self.tm.params {
            p.var.set(&get(format!("param/{}", p.name))?)?;
            m.push(get(format!("adam_m/{}", p.name))?);
            v.push(get(format!("adam_v/{}", p.name))?);
        }
        self.opt.restore(meta.state.step, m, v)?;
        self.state = meta.state;
        self.chooser.rng = self.state.ratio_rng;
        self.stream = SampleStream::new(
            self.stream.packed.clone(),
            self.settings.seed,
            self.state.data,
        )?;
        truncate_metrics(&self.metrics_path(), self.state.step)?;
        self.last_checkpoint = Instant::now();
        Ok(true)
    }

    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let mut map = HashMap::new();
        for (i, p) in self.tm.params.iter().enumerate() {
            map.insert(format!("param/{}", p.name), p.var.as_tensor().clone());
            map.insert(format!("adam_m/{}", p.name), self.opt.m[i].clone());
            map.insert(format!("adam_v/{}", p.name), self.opt.v[i].clone());
        }
        let meta = CheckpointMeta {
            state: self.state.clone(),
            settings: self.settings.clone(),
            beacon: BeaconKeys::from_config(&self.cfg),
            param_names: self.tm.params.iter().map(|p| p.name.clone()).collect(),
        };
        let p = checkpoint::save(
            &self.checkpoint_dir(),
            self.state.step,
            &map,
            &meta,
            self.settings.keep_checkpoints,
        )?;
        self.last_checkpoint = Instant::now();
        Ok(p)
    }

    /// One optimiser update over `accum` samples.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let vars = self.tm.vars();
        let accum = self.settings.accum.max(1);
        let mut sum: Option<Vec<Tensor>> = None;
        let mut loss = 0.0;
        let mut ratios = Vec::new();
        let mut tokens = 0u64;
        let mut recall_samples = 0;
        for k in 0..accum {
            let text = self.stream.next_sample();
            let sample = match &self.recall {
                Some(r) if r.chosen(self.state.step, k) => {
                    recall_samples += 1;
                    r.build(&text, self.state.step, k)?
                }
                _ => Sample::plain(text),
            };
            let windows =
                objective::plan_windows(&self.cfg, &mut self.chooser, sample.tokens.len());
            ratios.extend(windows.iter().map(|w| w.ratio));
            // Backbone targets for plain samples when the objective or the weighting needs them
            // (recall samples keep their answer-only loss).
            let cached = match &mut self.targets {
                Some(cache) if sample.label_weights.is_none() => {
                    Some(cache.get_or_build(&self.tm.plain, &sample.tokens)?)
                }
                _ => None,
            };
            // Label weights of a plain sample (recall samples carry their own).
            let plain_weights = match (&cached, self.settings.token_weights) {
                (Some(c), TokenWeights::LongGain) => Some(targets::long_gain_weights(
                    c,
                    self.settings.weight_cap as f32,
                )),
                (_, TokenWeights::WindowStart) if sample.label_weights.is_none() => {
                    Some(objective::window_start_weights(
                        &windows,
                        self.settings.window_start_span,
                        self.settings.window_start_weight as f32,
                    ))
                }
                _ => None,
            };
            let objective =
                if cached.is_none() && self.settings.objective == Objective::DistillCached {
                    Objective::Lm // recall samples: answers as labels
                } else {
                    self.settings.objective
                };
            let view = SampleView {
                tokens: &sample.tokens,
                label_weights: sample.label_weights.as_deref().or(plain_weights.as_deref()),
                cached: cached.as_ref(),
            };
            let (res, grads) = objective::sample_gradients(
                &self.models(),
                &self.cfg,
                &view,
                &windows,
                objective,
                &vars,
                1.0 / accum as f64,
            )?;
            loss += res.loss / accum as f64;
            tokens += sample.tokens.len() as u64;
            sum = Some(match sum {
                None => grads,
                Some(acc) => acc
                    .iter()
                    .zip(&grads)
                    .map(|(a, g)| a + g)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads = sum.expect("accum ≥ 1");
        let grad_norm = clip_grad_norm(&mut grads, self.settings.clip)?;
        let lr = self.settings.schedule.lr(self.state.step);
        if grad_norm.is_finite() {
            self.opt.update(&vars, &grads, lr)?;
        } else {
            eprintln!(
                "warning: non-finite gradient norm at step {}; update skipped",
                self.state.step + 1
            );
        }
        self.state.step += 1;
        self.state.data = self.stream.pos;
        self.state.ratio_rng = self.chooser.rng;
        self.state.tokens_seen += tokens;
        let step_s = t0.elapsed().as_secs_f64();
        self.state.elapsed_s += step_s;
        Ok(StepMetrics {
            step: self.state.step,
            loss,
            lr,
            grad_norm,
            tokens: self.state.tokens_seen,
            tokens_per_s: tokens as f64 / step_s,
            step_s,
            elapsed_s: self.state.elapsed_s,
            peak_rss_mib: peak_rss_mib(),
            ratios,
            recall_samples,
        })
    }

    /// Mean next-token loss on the held-out samples under compression, with ratios drawn by a fixed
    /// seed (the same draws at every evaluation, so the curve compares like with like).
    pub fn evaluate(&self) -> Result<(f64, usize)> {
        let mut chooser = RatioChooser::new(&self.cfg, position_budget(&self.tm.plain.cfg));
        chooser.rng = SplitMix64(0xe7a1);
        let (mut total, mut count) = (0f64, 0usize);
        for sample in &self.heldout {
            let windows = objective::plan_windows(&self.cfg, &mut chooser, sample.len());
            let (l, n) = heldout_nll(&self.tm.plain, &self.cfg, sample, &windows)?;
            total += l;
            count += n;
        }
        Ok((
            if count > 0 {
                total / count as f64
            } else {
                f64::NAN
            },
            count,
        ))
    }

    /// Held-out recall (needs `--recall-mix`): every held-out sample turned into a recall sample with
    /// the same draws in every run (`RecallMix::build_heldout`), and the mean NLL of its answer tokens
    /// read through the beacons (ratios drawn by a fixed seed) and with full attention over the raw
    /// sample, each once with the asked facts planted and once with decoys in their place. The decoy
    /// minus fact difference is what reading the facts is worth; the beacons' share of full
    /// attention's difference says how much of the planted facts they carry. (Against a no-memory
    /// reading alone the share would also count answer-format priors that trained beacons add from
    /// the open window; the no-memory NLL is reported beside it.)
    pub fn evaluate_recall(&self) -> Result<Option<RecallEval>> {
        let t = Instant::now();
        let Some(set) = self.recall_set()? else {
            return Ok(None);
        };
        let mut chooser = RatioChooser::new(&self.cfg, position_budget(&self.tm.plain.cfg));
        chooser.rng = SplitMix64(0x4eca11);
        let (mut beacon, mut beacon_decoy) = (0f64, 0f64);
        for (i, (facts, decoys, answers)) in set.samples.iter().enumerate() {
            let windows = objective::plan_windows(&self.cfg, &mut chooser, facts.tokens.len());
            for (sum, sample) in [(&mut beacon, facts), (&mut beacon_decoy, decoys)] {
                let (l, n) = labelled_nll(
                    &self.tm.plain,
                    &self.cfg,
                    Mode::Beacon,
                    &sample.tokens,
                    sample.label_weights.as_deref(),
                    &windows,
                )?;
                if n != *answers {
                    bail!("held-out recall sample {i}: {n} answer tokens read through the beacons, {answers} without");
                }
                *sum += l;
            }
        }
        let per_token = |x: f64| x / set.answers as f64;
        let (beacon, beacon_decoy) = (per_token(beacon), per_token(beacon_decoy));
        let full = set.full.map(|(f, fd)| (per_token(f), per_token(fd)));
        Ok(Some(RecallEval {
            step: self.state.step,
            recall_beacon_nll: beacon,
            recall_beacon_decoy_nll: beacon_decoy,
            recall_full_nll: full.map(|(f, _)| f),
            recall_full_decoy_nll: full.map(|(_, fd)| fd),
            recall_no_memory_nll: per_token(set.no_memory),
            recall_carried: full.map(|(f, fd)| (beacon_decoy - beacon) / (fd - f)),
            recall_answer_tokens: set.answers,
            eval_s: t.elapsed().as_secs_f64(),
        }))
    }

    /// The held-out recall samples and the readings that do not depend on the beacon weights (full
    /// attention and no memory: the backbone is frozen), built on the first evaluation and kept.
    /// None without a recall mix or when no held-out sample holds a question.
    fn recall_set(&self) -> Result<Option<&RecallSet>> {
        let Some(mix) = &self.recall else {
            return Ok(None);
        };
        if let Some(set) = self.recall_set.get() {
            return Ok(set.as_ref());
        }
        // Full attention past the native window extrapolates positions: not a reference then.
        let full_fits = self
            .heldout
            .iter()
            .all(|t| t.len() <= position_budget(&self.tm.plain.cfg));
        let no_memory = Mode::WindowOnly {
            sink: self.cfg.sink_size,
            window: self.cfg.window,
        };
        let mut chooser = RatioChooser::new(&self.cfg, position_budget(&self.tm.plain.cfg));
        let (mut full, mut full_decoy, mut none) = (0f64, 0f64, 0f64);
        let mut samples = Vec::new();
        for (i, text) in self.heldout.iter().enumerate() {
            let facts = mix.build_heldout(text, i, false)?;
            if facts.label_weights.is_none() {
                continue; // too short to hold a recall question
            }
            let decoys = mix.build_heldout(text, i, true)?;
            // Window bounds only: these modes ignore the ratios.
            let windows = objective::plan_windows(&self.cfg, &mut chooser, facts.tokens.len());
            let mut readings = vec![(&mut none, &facts, no_memory.clone())];
            if full_fits {
                readings.push((&mut full, &facts, Mode::Full));
                readings.push((&mut full_decoy, &decoys, Mode::Full));
            }
            let mut counts = Vec::new();
            for (sum, sample, mode) in readings {
                let (l, n) = labelled_nll(
                    &self.tm.plain,
                    &self.cfg,
                    mode,
                    &sample.tokens,
                    sample.label_weights.as_deref(),
                    &windows,
                )?;
                *sum += l;
                counts.push(n);
            }
            if counts.iter().any(|&n| n != counts[0]) {
                bail!(
                    "held-out recall sample {i}: answer counts differ between readings: {counts:?}"
                );
            }
            samples.push((facts, decoys, counts[0]));
        }
        let answers = samples.iter().map(|s| s.2).sum();
        let set = (answers > 0).then(|| RecallSet {
            samples,
            answers,
            full: full_fits.then_some((full, full_decoy)),
            no_memory: none,
        });
        Ok(self.recall_set.get_or_init(|| set).as_ref())
    }

    /// Write `beacon.safetensors` (released tensor names; low-rank merged) and `beacon_config.json`
    /// (the training settings with `adapt-1024` ratio choice for inference, as the reference evaluates).
    pub fn export(&self, dir: &Path, dtype: DType) -> Result<()> {
        beacon::loader::save_beacon_weights(
            &self.tm.plain,
            &dir.join("beacon.safetensors"),
            dtype,
        )?;
        let cfg = BeaconConfig {
            ratio_mix: RatioMix::Adapt(1024),
            ..self.cfg.clone()
        };
        // The beacon keys the engine reads, plus a `training` section (ignored by the loader) that
        // says how the weights were made.
        let mut json = serde_json::to_value(BeaconKeys::from_config(&cfg))?;
        json["training"] = serde_json::json!({
            "trainer": "beacon-train",
            "settings": &self.settings,
            "updates": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "elapsed_s": self.state.elapsed_s,
        });
        let text = serde_json::to_string_pretty(&json)?;
        beacon::util::atomic_write(&dir.join("beacon_config.json"), text.as_bytes())?;
        Ok(())
    }
}

/// Sum of next-token NLL and label count of one sample under compression, inference kernels only
/// (one forward, window by window with the given ratios).
pub fn heldout_nll(
    model: &Model,
    cfg: &BeaconConfig,
    sample: &[u32],
    windows: &[WindowPlan],
) -> Result<(f64, usize)> {
    labelled_nll(model, cfg, Mode::Beacon, sample, None, windows)
}

/// Sum of next-token NLL and count of the labels of `sample` whose weight is positive (all labels
/// when `label_weights` is None), read in `mode` window by window: beacon mode replays the given
/// ratios; the other modes take the same feeds and ignore them.
pub fn labelled_nll(
    model: &Model,
    cfg: &BeaconConfig,
    mode: Mode,
    sample: &[u32],
    label_weights: Option<&[f32]>,
    windows: &[WindowPlan],
) -> Result<(f64, usize)> {
    let beacon = mode == Mode::Beacon;
    let mut s = Session::new(model, mode, cfg.clone());
    let first_labels = objective::first_window_trained(cfg);
    let (mut total, mut count) = (0f64, 0usize);
    for (i, w) in windows.iter().enumerate() {
        let opts = FeedOptions {
            training_final: beacon && i + 1 == windows.len(),
            window_ratio: beacon.then_some(w.ratio),
            ..FeedOptions::default()
        };
        let logits = s
            .feed_with(
                model,
                &sample[w.start..w.start + w.len],
                Want::From(0),
                opts,
                &mut |_| {},
            )?
            .context("no logits")?;
        let labels = objective::window_labels(sample, w, first_labels, label_weights);
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        for (row, label) in rows.iter().zip(&labels) {
            if let Some(l) = label {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = m as f64
                    + row
                        .iter()
                        .map(|&x| ((x - m) as f64).exp())
                        .sum::<f64>()
                        .ln();
                total += lse - row[*l as usize] as f64;
                count += 1;
            }
        }
    }
    Ok((total, count))
}

/// Steps with a held-out recall line in metrics.jsonl.
fn read_recall_steps(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<RecallEval>(l).ok())
        .map(|r| r.step)
        .collect()
}

/// Keep only the metrics lines of steps ≤ `step` (after a resume).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    beacon::util::atomic_write(path, kept.as_bytes())?;
    Ok(())
}

/// Append one JSON line.
pub fn append_metrics<T: Serialize>(path: &Path, line: &T) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(line)?)?;
    Ok(())
}

/// Read back (step, loss) of training lines and (step, held-out loss) of evaluation lines.
#[allow(clippy::type_complexity)]
pub fn read_curves(path: &Path) -> Result<(Vec<(f64, f64)>, Vec<(f64, f64)>)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let step = v.get("step").and_then(|s| s.as_f64()).unwrap_or(0.0);
        if let Some(x) = v.get("heldout_loss").and_then(|x| x.as_f64()) {
            held.push((step, x));
        } else if let Some(x) = v.get("loss").and_then(|x| x.as_f64()) {
            train.push((step, x));
        }
    }
    Ok((train, held))
}

/// Set by SIGINT/SIGTERM: finish the current update, checkpoint, stop.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // Second signal: leave at once (the last checkpoint is intact by construction).
        // SAFETY: `_exit` is async-signal-safe and takes no pointers.
        unsafe { libc::_exit(130) };
    }
}

/// Install the SIGINT/SIGTERM handler that sets [`STOP`].
pub fn install_signal_handler() {
    // SAFETY: the handler only touches an atomic and calls the async-signal-safe `_exit`.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// How a [`Trainer::run_loop`] reports progress.
pub trait Progress {
    fn step(&mut self, m: &StepMetrics, total: u64);
    fn eval(&mut self, e: &EvalMetrics);
    fn note(&mut self, msg: &str);
}

/// Silent progress (tests).
pub struct Quiet;
impl Progress for Quiet {
    fn step(&mut self, _m: &StepMetrics, _total: u64) {}
    fn eval(&mut self, _e: &EvalMetrics) {}
    fn note(&mut self, _msg: &str) {}
}

impl Trainer {
    /// Train until `schedule.total` updates (or `stop_after` more in this call, or a stop signal),
    /// with metrics, evaluation, checkpoints and the plot. Returns the step metrics of this call.
    pub fn run_loop(
        &mut self,
        stop_after: Option<u64>,
        progress: &mut dyn Progress,
    ) -> Result<Vec<StepMetrics>> {
        std::fs::create_dir_all(&self.out_dir)?;
        let total = self.settings.schedule.total;
        let start_step = self.state.step;
        let mut out = Vec::new();
        // Score the starting weights once (the init file, or a resumed step never scored), so
        // every later score has the run's own starting point beside it.
        if self.score.as_ref().is_some_and(|s| s.spec.every > 0)
            && !score::read_scores(&self.metrics_path())
                .iter()
                .any(|&(s, _)| s == self.state.step)
        {
            self.score_and_keep_best(progress)?;
        }
        // Held-out recall of the starting weights too (so `--stop-after 0` measures a weight file).
        if self.settings.eval_every > 0
            && !read_recall_steps(&self.metrics_path()).contains(&self.state.step)
        {
            self.recall_eval_and_log(progress)?;
        }
        while self.state.step < total && stop_after.is_none_or(|n| self.state.step - start_step < n)
        {
            let m = self.train_step()?;
            append_metrics(&self.metrics_path(), &m)?;
            progress.step(&m, total);
            out.push(m);
            let step = self.state.step;
            let s = &self.settings;
            if s.eval_every > 0 && step.is_multiple_of(s.eval_every) && !self.heldout.is_empty() {
                let t = Instant::now();
                let (loss, n) = self.evaluate()?;
                let e = EvalMetrics {
                    step,
                    heldout_loss: loss,
                    heldout_ppl: loss.exp(),
                    heldout_tokens: n,
                    eval_s: t.elapsed().as_secs_f64(),
                    elapsed_s: self.state.elapsed_s,
                };
                append_metrics(&self.metrics_path(), &e)?;
                progress.eval(&e);
                self.recall_eval_and_log(progress)?;
                self.plot()?;
            }
            if self.score.as_ref().is_some_and(|sc| {
                sc.spec.every > 0 && (step.is_multiple_of(sc.spec.every) || step == total)
            }) {
                self.score_and_keep_best(progress)?;
            }
            let s = &self.settings;
            let by_steps = s.checkpoint_every > 0 && step.is_multiple_of(s.checkpoint_every);
            let by_time = s.checkpoint_minutes > 0.0
                && self.last_checkpoint.elapsed().as_secs_f64() >= s.checkpoint_minutes * 60.0;
            let stopping = STOP.load(Ordering::SeqCst);
            if by_steps || by_time || stopping || step == total {
                let p = self.save_checkpoint()?;
                progress.note(&format!("checkpoint {}", p.display()));
            }
            if stopping {
                progress.note("stop requested: checkpoint written, exiting");
                break;
            }
        }
        self.plot()?;
        Ok(out)
    }

    /// Held-out recall (when the run has a recall mix), appended to the metrics and reported.
    fn recall_eval_and_log(&mut self, progress: &mut dyn Progress) -> Result<()> {
        if let Some(r) = self.evaluate_recall()? {
            append_metrics(&self.metrics_path(), &r)?;
            let full = match (r.recall_full_nll, r.recall_full_decoy_nll, r.recall_carried) {
                (Some(f), Some(fd), Some(c)) => format!(
                    "; full attention {f:.3} (decoys {fd:.3}): the beacons carry {:.0} % of what reading the facts is worth",
                    100.0 * c
                ),
                _ => String::new(),
            };
            progress.note(&format!(
                "held-out recall at step {}: answer NLL through beacons {:.3} (decoys {:.3}){full}; no memory {:.3} ({} answer tokens, {:.0} s)",
                r.step,
                r.recall_beacon_nll,
                r.recall_beacon_decoy_nll,
                r.recall_no_memory_nll,
                r.recall_answer_tokens,
                r.eval_s
            ));
        }
        Ok(())
    }

    /// Score the current weights, append the score line, and export them to `<out>/best/` when no
    /// earlier step of the run (metrics.jsonl, so resumes count) scored lower.
    pub fn score_and_keep_best(&mut self, progress: &mut dyn Progress) -> Result<ScoreMetrics> {
        let set = self.score.as_ref().context("no score set")?;
        let earlier = score::read_scores(&self.metrics_path());
        let m = set.score(
            &self.tm.plain,
            &self.cfg,
            self.state.step,
            self.state.elapsed_s,
        )?;
        append_metrics(&self.metrics_path(), &m)?;
        let best_before = earlier
            .iter()
            .filter(|&&(s, _)| s != m.step)
            .map(|&(_, p)| p)
            .fold(f64::INFINITY, f64::min);
        let is_best = m.score_ppl < best_before;
        progress.note(&format!(
            "score at step {}: ×{} tail ppl {:.3} over {} tokens ({:.0} s){}",
            m.step,
            m.score_ratio,
            m.score_ppl,
            m.score_tokens,
            m.score_s,
            if is_best {
                " — best so far, exported to best/"
            } else {
                ""
            }
        ));
        if is_best {
            let dir = self.out_dir.join("best");
            std::fs::create_dir_all(&dir)?;
            self.export(&dir, self.export_dtype)?;
            let note = serde_json::json!({
                "step": m.step,
                "score_ppl": m.score_ppl,
                "score_ratio": m.score_ratio,
                "score_len": m.score_len,
                "score_tokens": m.score_tokens,
                "tokens_seen": self.state.tokens_seen,
                "init_beacons": self.settings.init_beacons,
            });
            beacon::util::atomic_write(
                &dir.join("score.json"),
                serde_json::to_string_pretty(&note)?.as_bytes(),
            )?;
        }
        Ok(m)
    }

    pub fn plot(&self) -> Result<()> {
        let (train, held) = read_curves(&self.metrics_path())?;
        let title = format!(
            "beacon training: seq {} / W {} / {:?}",
            self.settings.seq_len, self.cfg.window, self.settings.objective
        );
        crate::plot::loss_curve(&self.out_dir.join("loss.png"), &title, &train, &held)
    }
}

/// The settings a fresh `Schedule` needs when only the peak and totals are known.
pub fn schedule(peak: f64, warmup: u64, total: u64, min_ratio: f64, decay: Decay) -> Schedule {
    Schedule {
        peak,
        warmup,
        total,
        min_ratio,
        decay,
    }
}
