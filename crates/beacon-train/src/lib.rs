//! beacon-train — training Activation Beacon's parameters on a frozen backbone (SPEC §3).
//!
//! Data flow: text files / JSONL → [`data`] (tokenize once, cache, pack into samples, held-out split)
//! → [`trainer`] draws each window's ratio → [`objective`] runs the sample window by window (a graph-free
//! pass records the memory, then windows are replayed last to first with gradients flowing back
//! through the memory) → accumulated gradients → [`optim`] (clipping, AdamW, warm-up + decay) →
//! [`checkpoint`] (atomic, verified), metrics JSONL, [`plot`] → exported `beacon.safetensors`.
//!
//! Only the beacon embedding and the beacon projections of `beacon_param` are trained ([`params`]);
//! the backbone's projections run through a frozen matmul whose backward skips the weight gradient.

pub mod checkpoint;
pub mod data;
pub mod objective;
pub mod optim;
pub mod params;
pub mod plot;
pub mod recall;
pub mod score;
pub mod targets;
pub mod trainer;

use anyhow::{bail, Context, Result};
use beacon::config::{BeaconKeys, BeaconParams, RatioMix};
use beacon::{load, LoadOptions};
use candle_core::DType;
use objective::Objective;
use optim::{AdamWConfig, Decay, Schedule};
use std::io::IsTerminal;
use std::path::PathBuf;
use trainer::{EvalMetrics, Progress, Settings, StepMetrics, Trainer};

/// `beacon train`: train the beacon parameters of a model.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Model: Hugging Face directory or GGUF file (default: the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text files, JSONL files (field "text") or directories of them.
    #[arg(long = "data", num_args = 1.., default_values = ["../shared/data/books", "../shared/data/code"])]
    pub data: Vec<PathBuf>,
    /// Documents (file stems) held out for evaluation; they never train.
    #[arg(long, value_delimiter = ',', default_values = data::DEFAULT_HELDOUT)]
    pub heldout: Vec<String>,
    /// Output directory: checkpoints/, metrics.jsonl, loss.png, beacon.safetensors, beacon_config.json.
    #[arg(long, default_value = "runs/beacon-train")]
    pub out: PathBuf,
    /// Continue from the newest valid checkpoint in <out>/checkpoints.
    #[arg(long)]
    pub resume: bool,
    /// Start from these beacon weights (a `beacon.safetensors`, released names) with a fresh optimiser
    /// instead of the backbone-copied initialisation: progress that travels without `runs/`.
    #[arg(long)]
    pub init_beacons: Option<PathBuf>,

    /// Tokens per training sample.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Raw tokens per window (default: the model's beacon_window, else 512).
    #[arg(long)]
    pub window: Option<usize>,
    /// Attention-sink entries (default: the model's beacon_sink_size).
    #[arg(long)]
    pub sink: Option<usize>,
    /// Candidate compression ratios, drawn per window (step-random, seeded).
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4, 8, 16, 32])]
    pub ratios: Vec<usize>,
    /// Projections with separate beacon weights.
    #[arg(long, value_delimiter = ',', default_values = ["q", "k", "v"])]
    pub beacon_param: Vec<String>,
    /// Train beacon projections as backbone + A·B of this rank (0 = full matrices).
    #[arg(long, default_value_t = 0)]
    pub beacon_rank: usize,
    /// Training objective.
    #[arg(long, value_enum, default_value_t = Objective::Lm)]
    pub objective: Objective,
    /// Fraction of samples turned into recall samples: facts planted in early windows and asked for at
    /// the end, or a span to repeat; loss on the answers only (see recall.rs). Each evaluation then
    /// also measures held-out recall: how much of what full attention gains from the planted facts
    /// (against decoys) reading them through the beacons gets.
    #[arg(long, default_value_t = 0.0)]
    pub recall_mix: f64,
    /// Label weighting of plain samples: none, long-gain = min(exp(nll_window − nll_full), cap)
    /// from the cached backbone targets, or window-start (each window's first labels count more).
    #[arg(long, value_enum, default_value_t = trainer::TokenWeights::None)]
    pub token_weights: trainer::TokenWeights,
    /// Largest long-gain weight.
    #[arg(long, default_value_t = 5.0)]
    pub weight_cap: f64,
    /// With `--token-weights window-start`: the weight of each window's first labels.
    #[arg(long, default_value_t = 3.0)]
    pub window_start_weight: f64,
    /// With `--token-weights window-start`: how many labels at each window's start are weighted.
    #[arg(long, default_value_t = 128)]
    pub window_start_span: usize,
    /// Directory of cached backbone targets (shared by runs; entries are keyed by tokens + settings).
    #[arg(long, default_value = "runs/targets")]
    pub target_cache: PathBuf,
    /// Top-k entries of the full view's distribution cached per position (distill-cached).
    #[arg(long, default_value_t = 16)]
    pub topk: usize,

    /// Optimiser updates in the whole run (the schedule's length).
    #[arg(long, default_value_t = 2000)]
    pub steps: u64,
    /// Stop after this many updates in this invocation (checkpointing first).
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    #[arg(long, value_enum, default_value_t = Decay::Cosine)]
    pub decay: Decay,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Max global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Samples per update (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Held-out evaluation every N updates (0 = never). With `--recall-mix`, held-out recall is also
    /// measured for the starting weights, so `--stop-after 0` measures a weight file.
    #[arg(long, default_value_t = 25)]
    pub eval_every: u64,
    /// Held-out samples per evaluation.
    #[arg(long, default_value_t = 4)]
    pub eval_samples: usize,
    /// Checkpoint every N updates (0 = by time only).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Also checkpoint when this many minutes passed since the last one (0 = off).
    #[arg(long, default_value_t = 10.0)]
    pub checkpoint_minutes: f64,
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Score the weights every N updates (and before the first): perplexity of the last
    /// --score-tail tokens of held-out spans read at --score-ratio, as `beacon eval ppl` measures;
    /// the best-scoring weights are exported to <out>/best/ (0 = never).
    #[arg(long, default_value_t = 0)]
    pub score_every: u64,
    /// The fixed compression ratio of the score.
    #[arg(long, default_value_t = 8)]
    pub score_ratio: usize,
    /// Tokens per scored span (read, then the last --score-tail scored).
    #[arg(long, default_value_t = 4096)]
    pub score_len: usize,
    #[arg(long, default_value_t = 1024)]
    pub score_tail: usize,
    /// Held-out documents the score reads (by default not the books the evaluation reports on).
    #[arg(long, value_delimiter = ',', default_values = score::DEFAULT_SCORE_DOCS)]
    pub score_docs: Vec<String>,
    /// Spans per scored document.
    #[arg(long, default_value_t = 1)]
    pub score_spans: usize,
    /// Limit the number of training documents (quick runs).
    #[arg(long)]
    pub max_docs: Option<usize>,
    /// Compute threads (sets RAYON_NUM_THREADS; default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// dtype of the exported beacon weights: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub export_dtype: String,
}

/// Text → ids with the model's tokenizer.
fn encoder(loaded: &beacon::Loaded) -> Result<Box<data::Encode<'_>>> {
    let Some(tok) = loaded.tokenizer.as_ref() else {
        bail!(
            "{} has no tokenizer; training needs one to read text",
            loaded.path.display()
        );
    };
    tokenize_with(tok)
}

fn tokenize_with(tok: &beacon::tokenizer::Tokenizer) -> Result<Box<data::Encode<'_>>> {
    Ok(Box::new(move |text: &str| Ok(tok.encode(text, false)?)))
}

fn export_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => bail!("--export-dtype: expected bf16, f16 or f32, got {other}"),
    })
}

/// Console progress: a bar on a terminal, one line per update otherwise (e.g. under nohup).
struct Console {
    bar: Option<indicatif::ProgressBar>,
}

impl Console {
    fn new(total: u64, done: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_position(done);
            b
        });
        Console { bar }
    }
}

impl Progress for Console {
    fn step(&mut self, m: &StepMetrics, total: u64) {
        let msg = format!(
            "loss {:.4} | {:.1} tok/s | lr {:.2e} | |g| {:.3}",
            m.loss, m.tokens_per_s, m.lr, m.grad_norm
        );
        match &self.bar {
            Some(b) => {
                b.set_position(m.step);
                b.set_message(msg);
            }
            None => {
                let eta_s = (total - m.step) as f64 * m.step_s;
                eprintln!(
                    "step {}/{} {msg} | {:.0} s/step | ETA {:.1} h | RSS {:.0} MiB",
                    m.step,
                    total,
                    m.step_s,
                    eta_s / 3600.0,
                    m.peak_rss_mib
                );
            }
        }
    }
    fn eval(&mut self, e: &EvalMetrics) {
        self.note(&format!(
            "step {} held-out loss {:.4} (ppl {:.2}) over {} tokens",
            e.step, e.heldout_loss, e.heldout_ppl, e.heldout_tokens
        ));
    }
    fn note(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }
}

/// Run `beacon train`.
pub fn run(args: TrainArgs) -> Result<()> {
    if let Some(n) = args.threads {
        // candle's GEMM and rayon pool both read this; set before the first tensor op.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => beacon::fetch::default_model_path()?,
    };
    // Train from the backbone's initialisation unless resuming (the checkpoint then restores the values).
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        untrained_beacons: true,
        // Training multiplies whole samples through the frozen backbone: dense copies, always.
        prefill_weights: Some(beacon::memory_plan::PrefillWeights::Dense),
        ..Default::default()
    };
    let mut loaded =
        load(&model_path, &opts).with_context(|| format!("loading {}", model_path.display()))?;
    let param_names: Vec<String> = args.beacon_param.clone();
    let keys = BeaconKeys {
        beacon_window: Some(args.window.unwrap_or(if loaded.beacon.window == 1024 {
            512
        } else {
            loaded.beacon.window
        })),
        beacon_stride: None,
        beacon_ratio: Some(args.ratios.clone()),
        beacon_ratio_mix: Some(RatioMix::StepRandom.name()),
        beacon_param: Some(param_names.clone()),
        beacon_sink_size: args.sink.or(Some(loaded.beacon.sink_size)),
        ..Default::default()
    };
    let mut keys = keys;
    keys.beacon_stride = keys.beacon_window;
    if loaded.beacon.raw_tail > 0 {
        // The two-pass gradient (objective.rs) reads each window's memory as a prefix of the final
        // one, which a raw tail (replaced at every close) breaks; scripts/train_gpu.py trains with it.
        eprintln!(
            "note: the model's beacon_raw_tail {} is not used in training here (the Rust trainer's \
             memory only grows); scripts/train_gpu.py --raw-tail trains with it",
            loaded.beacon.raw_tail
        );
    }
    keys.beacon_raw_tail = Some(0);
    let cfg = keys.resolve(loaded.beacon.clone(), "beacon train arguments")?;
    let params = BeaconParams::parse(&param_names, "--beacon-param")?;
    let mut model = loaded.model.clone();
    let init_cfg = beacon::BeaconConfig {
        params,
        ..cfg.clone()
    };
    beacon::loader::init_beacons(&mut model, &init_cfg)?;
    if let Some(file) = &args.init_beacons {
        let kept = beacon::loader::load_beacon_weights(&mut model, file, params)
            .with_context(|| format!("--init-beacons {}", file.display()))?;
        eprintln!("beacon parameters initialised from {}", file.display());
        if kept != BeaconParams::default() {
            eprintln!(
                "  {} has no beacon_{{{}}}_proj: those start as copies of the backbone's (SPEC §1.3)",
                file.display(),
                kept.names().join(",")
            );
        }
    }

    std::fs::create_dir_all(&args.out)?;
    let encode = encoder(&loaded)?;
    let cache = args.out.join("token-cache");
    std::fs::create_dir_all(&cache)?;
    let tok_id = format!(
        "{}:{}",
        model_path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        model.cfg.vocab_size
    );
    let t = std::time::Instant::now();
    let (train, held) = data::load_splits(
        &args.data,
        &args.heldout,
        &*encode,
        Some(&cache),
        &tok_id,
        args.max_docs,
        &mut |f| {
            tracing::debug!("reading {}", f.display());
        },
    )?;
    eprintln!(
        "data: {} training documents ({} tokens), {} held-out ({} tokens), read in {:.0} s",
        train.docs.len(),
        train.tokens(),
        held.docs.len(),
        held.tokens(),
        t.elapsed().as_secs_f64()
    );
    drop(encode);
    let eos = model.cfg.eos_token_ids.first().copied();
    let packed = data::Packed::new(&train, args.seq_len, eos)?;
    let score_set = if args.score_every > 0 {
        Some(score::ScoreSet::from_split(
            &held,
            &args.score_docs,
            args.score_spans,
            score::ScoreSpec {
                every: args.score_every,
                ratio: args.score_ratio,
                len: args.score_len,
                tail: args.score_tail,
            },
        )?)
    } else {
        None
    };
    let held_packed = data::Packed::new(&held, args.seq_len, eos)?;
    let heldout: Vec<Vec<u32>> = held_packed
        .spread(args.eval_samples)
        .into_iter()
        .map(|i| held_packed.sample(i).to_vec())
        .collect();

    let settings = Settings {
        seq_len: args.seq_len,
        objective: args.objective,
        rank: (args.beacon_rank > 0).then_some(args.beacon_rank),
        params,
        schedule: Schedule {
            peak: args.lr,
            warmup: args.warmup,
            total: args.steps,
            min_ratio: args.min_lr_ratio,
            decay: args.decay,
        },
        adam: AdamWConfig {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        clip: args.clip,
        accum: args.accum,
        seed: args.seed,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        checkpoint_minutes: args.checkpoint_minutes,
        keep_checkpoints: args.keep_checkpoints,
        init_beacons: args.init_beacons.as_ref().map(|p| p.display().to_string()),
        recall_mix: args.recall_mix,
        token_weights: args.token_weights,
        weight_cap: args.weight_cap,
        window_start_weight: args.window_start_weight,
        window_start_span: args.window_start_span,
    };
    if args.token_weights == trainer::TokenWeights::WindowStart
        && !(args.window_start_weight > 0.0 && args.window_start_weight.is_finite())
    {
        bail!(
            "--window-start-weight: expected a positive number, got {}",
            args.window_start_weight
        );
    }
    if !(0.0..=1.0).contains(&args.recall_mix) {
        bail!(
            "--recall-mix: expected a fraction in [0, 1], got {}",
            args.recall_mix
        );
    }
    let mut trainer = Trainer::new(model, cfg.clone(), settings, packed, heldout, &args.out)?;
    trainer.score = score_set;
    trainer.export_dtype = export_dtype(&args.export_dtype)?;
    if args.objective == Objective::DistillCached
        || args.token_weights == trainer::TokenWeights::LongGain
    {
        let spec = targets::TargetSpec {
            model_id: tok_id.clone(),
            window: cfg.window,
            sink: cfg.sink_size,
            k: args.topk,
        };
        trainer.targets = Some(targets::TargetCache::new(&args.target_cache, spec)?);
    }
    if args.recall_mix > 0.0 {
        let tok = loaded
            .tokenizer
            .take()
            .context("--recall-mix needs the model's tokenizer")?;
        trainer.recall = Some(recall::RecallMix::new(
            args.recall_mix,
            cfg.window,
            args.seed,
            Box::new(move |s: &str| Ok(tok.encode(s, false)?)),
        ));
    }
    if args.resume {
        if trainer.resume()? {
            eprintln!(
                "resumed at step {} (data epoch {}, sample {})",
                trainer.state.step, trainer.state.data.epoch, trainer.state.data.index
            );
        } else {
            eprintln!(
                "no checkpoint in {}: starting fresh",
                trainer.checkpoint_dir().display()
            );
        }
    } else if !checkpoint::list(&trainer.checkpoint_dir())?.is_empty() {
        bail!(
            "{} already holds checkpoints: pass --resume to continue, or choose another --out",
            trainer.checkpoint_dir().display()
        );
    }
    eprintln!(
        "training {} values ({} tensors) of {}: seq {} W {} sink {} ratios {:?} objective {:?} threads {}",
        trainer.tm.num_values(),
        trainer.tm.params.len(),
        model_path.display(),
        args.seq_len,
        cfg.window,
        cfg.sink_size,
        cfg.ratios,
        args.objective,
        candle_core::utils::get_num_threads()
    );
    trainer::install_signal_handler();
    let mut console = Console::new(args.steps, trainer.state.step);
    trainer.run_loop(args.stop_after, &mut console)?;
    if let Some(c) = &trainer.targets {
        eprintln!(
            "backbone targets: {} built in {:.0} s ({:.2} s per 1K tokens), {} reused, in {}",
            c.built,
            c.build_seconds,
            c.build_seconds / (c.built.max(1) * args.seq_len) as f64 * 1000.0,
            c.reused,
            c.dir.display()
        );
    }
    trainer.export(&args.out, trainer.export_dtype)?;
    eprintln!(
        "exported {} and {}",
        args.out.join("beacon.safetensors").display(),
        args.out.join("beacon_config.json").display()
    );
    Ok(())
}
