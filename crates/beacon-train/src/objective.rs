//! The training objective (SPEC §3.1) and the per-sample gradient computation.
//!
//! **Loss.** Labels are the sample shifted left by one (position t predicts token t+1, the last
//! position has none). Every raw token with a label contributes; beacons never do. The loss is the
//! sum over all windows divided by the number of valid labels of the whole sample. In the released
//! recipe (interleave + full-coverage) the first window's labels are kept; in the other layouts the
//! reference masks them. The last window of a sample gets no beacons (the engine's `training_final`).
//!
//! Two objectives share that token set: [`Objective::Lm`], the paper's next-token cross-entropy, and
//! [`Objective::Distill`] (ours), the KL divergence from the same backbone reading the raw context with
//! full attention (the teacher) to the compressed student. Both are one fused op on the logits
//! ([`SoftCrossEntropy`]) whose backward is `softmax(logits) − target`, so the `[n, vocab]` log-softmax
//! intermediates are never kept in the graph.
//!
//! **Memory that does not grow with the sample.** Gradients flow through every window's beacons
//! into all later windows. Instead of keeping one graph over the whole sample, [`sample_gradients`]
//! runs the sample twice (window-level recomputation, like gradient checkpointing at window
//! granularity):
//! 1. a forward without a graph records, at each window start, the memory layout; the memory is
//!    append-only, so the final memory plus the lengths at every window start describe all of them;
//! 2. the windows are replayed **last to first**, each with its input memory as fresh variables:
//!    the backward of `loss_i + ⟨memory_out_i, ∂L/∂memory_in_{i+1}⟩` yields the parameter gradients of
//!    window i and `∂L/∂memory_in_i` for the window before it.
//!
//! Only one window's graph is alive at a time; the chain rule makes the result the exact gradient
//! of the whole-sample loss.

use crate::targets::SampleTargets;
use anyhow::{bail, Context, Result};
use beacon::config::{BeaconAttn, BeaconConfig, BeaconPos};
use beacon::model::Model;
use beacon::schedule::RatioChooser;
use beacon::session::{FeedOptions, Mode, Session, Want};
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, Var};
use serde::{Deserialize, Serialize};

/// What the student is trained to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Next-token cross-entropy on the raw tokens (the paper's compression-based auto-regression).
    Lm,
    /// KL(teacher ‖ student): the teacher is the same backbone with full attention over the raw
    /// context (the sample must fit the native context length).
    Distill,
    /// The same KL against the teacher's cached top-k distribution (`targets.rs`, renormalised over
    /// the k tokens): no teacher forward per update once a sample's targets are cached.
    DistillCached,
}

/// One training sample as the objective sees it.
#[derive(Debug, Clone, Copy)]
pub struct SampleView<'a> {
    pub tokens: &'a [u32],
    /// Weight of the label at each position (None = all 1; 0 = no label).
    pub label_weights: Option<&'a [f32]>,
    /// Cached backbone targets ([`Objective::DistillCached`]).
    pub cached: Option<&'a SampleTargets>,
}

impl<'a> SampleView<'a> {
    pub fn plain(tokens: &'a [u32]) -> Self {
        SampleView {
            tokens,
            label_weights: None,
            cached: None,
        }
    }
}

/// One window of a sample: raw tokens `[start, start + len)` compressed at `ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowPlan {
    pub start: usize,
    pub len: usize,
    pub ratio: usize,
}

/// Cut a sample of `len` tokens into windows and draw each window's ratio (SPEC §2.10 training rules:
/// ratio 0 only once and only if a later full window exists). `chooser` carries the seeded state.
pub fn plan_windows(cfg: &BeaconConfig, chooser: &mut RatioChooser, len: usize) -> Vec<WindowPlan> {
    chooser.reset();
    let w = cfg.window;
    (0..len.div_ceil(w))
        .map(|i| {
            let start = i * w;
            let later_full = start + 2 * w <= len;
            let ratio = chooser.next_window(len, Some(later_full));
            WindowPlan {
                start,
                len: w.min(len - start),
                ratio,
            }
        })
        .collect()
}

/// Label weights that count the first `span` positions of every window after the first `weight`
/// times (the first window has no memory to use, so it keeps weight 1).
pub fn window_start_weights(windows: &[WindowPlan], span: usize, weight: f32) -> Vec<f32> {
    let len = windows.last().map_or(0, |w| w.start + w.len);
    let mut out = vec![1.0; len];
    for w in windows.iter().filter(|w| w.start > 0) {
        out[w.start..w.start + span.min(w.len)].fill(weight);
    }
    out
}

/// The target rows of one window, for [`SoftCrossEntropy`].
#[derive(Clone)]
pub enum Target {
    /// Next-token ids, `None` = no label (ignored row).
    Labels(Vec<Option<u32>>),
    /// Teacher logits `[n, vocab]` (f32, no graph) and which rows count.
    Teacher { logits: Tensor, valid: Vec<bool> },
    /// The teacher's top-k ids and log-probabilities per row (`[n, k]` row-major), renormalised over
    /// the k tokens, and which rows count.
    TopK {
        ids: Vec<u32>,
        logp: Vec<f32>,
        k: usize,
        valid: Vec<bool>,
    },
}

impl Target {
    fn valid(&self, row: usize) -> bool {
        match self {
            Target::Labels(l) => l[row].is_some(),
            Target::Teacher { valid, .. } | Target::TopK { valid, .. } => valid[row],
        }
    }
}

/// `scale · Σ_rows [logsumexp(s) − Σ_v q_v s_v + Σ_v q_v log q_v]` over valid rows, where q is the
/// one-hot label (cross-entropy) or the teacher's softmax (KL). Backward: `scale · (softmax(s) − q)`.
pub struct SoftCrossEntropy {
    pub target: Target,
    pub scale: f32,
    /// Per-row weights (token weighting, answer-only loss); None = every valid row weighs 1.
    pub row_weights: Option<Vec<f32>>,
}

/// Log-probabilities renormalised to sum to 1 over the given entries.
fn renormalised(logp: &[f32]) -> Vec<f32> {
    let z = logsumexp(logp);
    logp.iter().map(|&l| l - z).collect()
}

/// Row-wise log-sum-exp of a row slice.
pub(crate) fn logsumexp(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = row.iter().map(|&x| (x - m).exp()).sum();
    m + s.ln()
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("soft-cross-entropy: logits must be f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("soft-cross-entropy: logits must be contiguous"),
    }
}

impl SoftCrossEntropy {
    fn teacher_rows(&self) -> candle_core::Result<Option<Vec<f32>>> {
        Ok(match &self.target {
            Target::Labels(_) | Target::TopK { .. } => None,
            Target::Teacher { logits, .. } => Some(logits.flatten_all()?.to_vec1::<f32>()?),
        })
    }

    /// Per-row (loss, gradient of the loss w.r.t. the row) for one logits row.
    fn row(&self, r: usize, s: &[f32], teacher: Option<&[f32]>, grad: Option<&mut [f32]>) -> f32 {
        let lse = logsumexp(s);
        let loss = match (&self.target, teacher) {
            (Target::Labels(l), _) => lse - s[l[r].expect("valid row") as usize],
            (_, Some(t)) => {
                let tl = logsumexp(t);
                // KL = Σ q (log q − log p) = Σ q ((t − tl) − (s − lse))
                t.iter()
                    .zip(s)
                    .map(|(&ti, &si)| (ti - tl).exp() * ((ti - tl) - (si - lse)))
                    .sum()
            }
            (Target::TopK { ids, logp, k, .. }, _) => {
                let (ids, lq) = (
                    &ids[r * k..(r + 1) * k],
                    renormalised(&logp[r * k..(r + 1) * k]),
                );
                ids.iter()
                    .zip(&lq)
                    .map(|(&i, &l)| l.exp() * (l - (s[i as usize] - lse)))
                    .sum()
            }
            _ => unreachable!("teacher rows present for a teacher target"),
        };
        if let Some(g) = grad {
            for (gi, &si) in g.iter_mut().zip(s) {
                *gi = (si - lse).exp();
            }
            match (&self.target, teacher) {
                (Target::Labels(l), _) => g[l[r].expect("valid row") as usize] -= 1.0,
                (Target::TopK { ids, logp, k, .. }, _) => {
                    let lq = renormalised(&logp[r * k..(r + 1) * k]);
                    for (&i, &l) in ids[r * k..(r + 1) * k].iter().zip(&lq) {
                        g[i as usize] -= l.exp();
                    }
                }
                (_, Some(t)) => {
                    let tl = logsumexp(t);
                    for (gi, &ti) in g.iter_mut().zip(t) {
                        *gi -= (ti - tl).exp();
                    }
                }
                _ => {}
            }
            let k = self.scale * self.weight(r);
            for gi in g.iter_mut() {
                *gi *= k;
            }
        }
        loss * self.weight(r)
    }

    fn weight(&self, row: usize) -> f32 {
        self.row_weights.as_ref().map_or(1.0, |w| w[row])
    }
}

impl candle_core::CustomOp1 for SoftCrossEntropy {
    fn name(&self) -> &'static str {
        "soft-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let data = contiguous_f32(s, l)?;
        let teacher = self.teacher_rows()?;
        let mut total = 0f64;
        for r in (0..n).filter(|&r| self.target.valid(r)) {
            let t = teacher.as_ref().map(|t| &t[r * v..(r + 1) * v]);
            total += self.row(r, &data[r * v..(r + 1) * v], t, None) as f64;
        }
        Ok((
            CpuStorage::F32(vec![(total * self.scale as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let g_out = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let arg = arg.contiguous()?;
        let (storage, layout) = arg.storage_and_layout();
        let data = match &*storage {
            candle_core::Storage::Cpu(s) => contiguous_f32(s, layout)?,
            _ => candle_core::bail!("soft-cross-entropy: logits must be on the CPU"),
        };
        let teacher = self.teacher_rows()?;
        let mut grad = vec![0f32; n * v];
        for r in (0..n).filter(|&r| self.target.valid(r)) {
            let t = teacher.as_ref().map(|t| &t[r * v..(r + 1) * v]);
            self.row(
                r,
                &data[r * v..(r + 1) * v],
                t,
                Some(&mut grad[r * v..(r + 1) * v]),
            );
        }
        if g_out != 1.0 {
            grad.iter_mut().for_each(|x| *x *= g_out);
        }
        Ok(Some(Tensor::from_vec(grad, (n, v), arg.device())?))
    }
}

/// The loss of one window's logits `[n, vocab]` against `target`, each row weighted by `row_weights`
/// (None = 1) and the sum scaled by `scale` (1 / the sample's total label weight).
pub fn window_loss(
    logits: &Tensor,
    target: Target,
    scale: f32,
    row_weights: Option<Vec<f32>>,
) -> Result<Tensor> {
    Ok(logits.contiguous()?.apply_op1(SoftCrossEntropy {
        target,
        scale,
        row_weights,
    })?)
}

/// Whether the reference keeps the first window's labels (SPEC §3.1).
pub fn first_window_trained(cfg: &BeaconConfig) -> bool {
    cfg.pos == BeaconPos::Interleave && cfg.attn == BeaconAttn::FullCoverage
}

/// Labels of the raw tokens `[start, start+len)` of a sample: the next token, if any, not in an
/// untrained first window, and not weighted 0 by `label_weights`.
pub fn window_labels(
    tokens: &[u32],
    w: &WindowPlan,
    first_window_labels: bool,
    label_weights: Option<&[f32]>,
) -> Vec<Option<u32>> {
    (w.start..w.start + w.len)
        .map(|p| {
            if (w.start == 0 && !first_window_labels)
                || label_weights.is_some_and(|lw| lw[p] <= 0.0)
            {
                None
            } else {
                tokens.get(p + 1).copied()
            }
        })
        .collect()
}

/// The two views of the model the trainer keeps: `train` has the beacon parameters as variables
/// (forward builds a graph), `plain` shares their storage without a graph (fast inference kernels).
pub struct Models<'a> {
    pub train: &'a Model,
    pub plain: &'a Model,
}

/// Result of one sample.
#[derive(Debug, Clone)]
pub struct SampleResult {
    /// The objective's value (mean over valid labels).
    pub loss: f64,
    /// Valid labels of the sample.
    pub valid: usize,
    /// Beacons inserted per window, in order (−1 = ratio 0), as the reference's `_all_beacon_sizes`.
    pub step_beacon_sizes: Vec<i64>,
    pub windows: Vec<WindowPlan>,
}

/// Teacher logits `[len, vocab]` for every position of `tokens`: the backbone with full attention.
pub fn teacher_logits(plain: &Model, tokens: &[u32]) -> Result<Tensor> {
    let limit = plain.cfg.max_position_embeddings;
    if tokens.len() > limit {
        bail!(
            "self-distillation needs samples within the native context ({} tokens > {limit}); use a shorter --seq-len",
            tokens.len()
        );
    }
    let mut s = Session::new(plain, Mode::Full, beacon::BeaconConfig::default());
    s.feed(plain, tokens, Want::From(0))?
        .context("teacher produced no logits")
}

fn single_ratio(cfg: &BeaconConfig, ratio: usize) -> BeaconConfig {
    BeaconConfig {
        ratios: vec![ratio],
        ..cfg.clone()
    }
}

/// Forward + backward of one sample with window-level recomputation (see the module docs).
/// Returns the loss and the gradient of every variable in `params` (zeros where unused),
/// each scaled by `grad_scale` (e.g. 1 / accumulation steps).
pub fn sample_gradients(
    models: &Models,
    cfg: &BeaconConfig,
    sample: &SampleView,
    windows: &[WindowPlan],
    objective: Objective,
    params: &[Var],
    grad_scale: f64,
) -> Result<(SampleResult, Vec<Tensor>)> {
    let (res, grads) = run_sample(models, cfg, sample, windows, objective, Some(params))?;
    let grads = grads
        .into_iter()
        .map(|g| {
            if grad_scale == 1.0 {
                Ok(g)
            } else {
                Ok((g * grad_scale)?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((res, grads))
}

/// The loss of one sample without gradients (same code path, no backward).
pub fn sample_loss(
    models: &Models,
    cfg: &BeaconConfig,
    tokens: &[u32],
    windows: &[WindowPlan],
    objective: Objective,
) -> Result<SampleResult> {
    Ok(run_sample(
        models,
        cfg,
        &SampleView::plain(tokens),
        windows,
        objective,
        None,
    )?
    .0)
}

fn run_sample(
    models: &Models,
    cfg: &BeaconConfig,
    sample: &SampleView,
    windows: &[WindowPlan],
    objective: Objective,
    params: Option<&[Var]>,
) -> Result<(SampleResult, Vec<Tensor>)> {
    let (tokens, label_weights) = (sample.tokens, sample.label_weights);
    if tokens.len() < 2 {
        bail!("a training sample needs at least 2 tokens");
    }
    if label_weights.is_some_and(|w| w.len() != tokens.len()) {
        bail!("label weights must cover every token of the sample");
    }
    if cfg.raw_tail > 0 {
        bail!(
            "beacon_raw_tail {} in training: the two-pass gradient needs a memory that only grows \
             (train with scripts/train_gpu.py --raw-tail, or set the tail to 0)",
            cfg.raw_tail
        );
    }
    let first_labels = first_window_trained(cfg);
    let (mut valid, mut weight_sum) = (0usize, 0f64);
    for w in windows {
        for (j, l) in window_labels(tokens, w, first_labels, label_weights)
            .iter()
            .enumerate()
        {
            if l.is_some() {
                valid += 1;
                weight_sum += label_weights.map_or(1.0, |lw| lw[w.start + j] as f64);
            }
        }
    }
    if valid == 0 {
        bail!("the sample has no trainable label");
    }
    // The loss is the weighted mean over valid labels (the plain mean without weights).
    let scale = (1.0 / weight_sum) as f32;
    let teacher = match objective {
        Objective::Lm | Objective::DistillCached => None,
        Objective::Distill => Some(teacher_logits(models.plain, tokens)?),
    };
    let cached = match (objective, sample.cached) {
        (Objective::DistillCached, None) => {
            bail!("--objective distill-cached needs the sample's cached targets")
        }
        (Objective::DistillCached, Some(c)) => Some(c),
        _ => None,
    };
    let n = windows.len();

    // Pass 1: memory layout at every window start, without a graph.
    let mut s = Session::new(models.plain, Mode::Beacon, cfg.clone());
    let mut layouts = Vec::with_capacity(n);
    for w in &windows[..n - 1] {
        layouts.push(s.layout().clone());
        let opts = FeedOptions {
            window_ratio: Some(w.ratio),
            ..FeedOptions::default()
        };
        s.feed_with(
            models.plain,
            &tokens[w.start..w.start + w.len],
            Want::None,
            opts,
            &mut |_| {},
        )?;
    }
    layouts.push(s.layout().clone());
    let final_memory = s.export_caches()?; // per layer (k_rot, v) `[kv, mem, d]`
    drop(s);

    // Pass 2: windows last to first.
    let mut param_grads: Option<Vec<Tensor>> = None;
    let mut grad_memory: Option<Vec<(Tensor, Tensor)>> = None; // ∂L/∂(memory read by window i+1)
    let mut loss_total = 0f64;
    let mut sizes = vec![0i64; n];
    for (i, w) in windows.iter().enumerate().rev() {
        let mem_len = layouts[i].context_len();
        let memory_vars: Vec<(Var, Var)> = if mem_len == 0 || params.is_none() {
            Vec::new()
        } else {
            final_memory
                .iter()
                .map(|(k, v)| {
                    Ok((
                        Var::from_tensor(&k.narrow(1, 0, mem_len)?)?,
                        Var::from_tensor(&v.narrow(1, 0, mem_len)?)?,
                    ))
                })
                .collect::<Result<_>>()?
        };
        let model = if params.is_some() {
            models.train
        } else {
            models.plain
        };
        let memory: Vec<(Tensor, Tensor)> = if mem_len == 0 {
            Vec::new()
        } else if memory_vars.is_empty() {
            final_memory
                .iter()
                .map(|(k, v)| Ok((k.narrow(1, 0, mem_len)?, v.narrow(1, 0, mem_len)?)))
                .collect::<Result<_>>()?
        } else {
            memory_vars
                .iter()
                .map(|(k, v)| (k.as_tensor().clone(), v.as_tensor().clone()))
                .collect()
        };
        let mut s = Session::replay(
            model,
            single_ratio(cfg, w.ratio),
            layouts[i].clone(),
            tokens[..w.start].to_vec(),
            memory,
        )?;
        let last = i + 1 == n;
        let opts = FeedOptions {
            training_final: last,
            differentiable: true,
            window_ratio: None,
        };
        let logits = s
            .feed_with(
                model,
                &tokens[w.start..w.start + w.len],
                Want::From(0),
                opts,
                &mut |_| {},
            )?
            .context("window produced no logits")?;
        // logits: [len, vocab]. A window never spans two steps, so the replay of window i is
        // exactly one step.
        sizes[i] = s.stats().step_beacon_sizes.first().copied().unwrap_or(0);
        let labels = window_labels(tokens, w, first_labels, label_weights);
        let row_weights = label_weights.map(|lw| lw[w.start..w.start + w.len].to_vec());
        let target = match (&teacher, cached) {
            (Some(t), _) => Target::Teacher {
                logits: t.narrow(0, w.start, w.len)?,
                valid: labels.iter().map(|l| l.is_some()).collect(),
            },
            (None, Some(c)) => Target::TopK {
                ids: c.topk_ids[w.start * c.k..(w.start + w.len) * c.k].to_vec(),
                logp: c.topk_logp[w.start * c.k..(w.start + w.len) * c.k].to_vec(),
                k: c.k,
                valid: labels.iter().map(|l| l.is_some()).collect(),
            },
            (None, None) => Target::Labels(labels),
        };
        let has_labels = labels_any(&target, w.len);
        let loss = if has_labels {
            Some(window_loss(&logits, target, scale, row_weights)?)
        } else {
            None
        };
        if let Some(l) = &loss {
            loss_total += l.to_scalar::<f32>()? as f64;
        }
        let Some(params) = params else { continue };
        // Surrogate whose gradient is this window's contribution plus what later windows send back
        // through the memory this window wrote.
        let mut surrogate = loss;
        if let Some(gm) = &grad_memory {
            let out = s.export_caches()?;
            for ((k, v), (gk, gv)) in out.iter().zip(gm) {
                let term = ((k * gk)?.sum_all()? + (v * gv)?.sum_all()?)?;
                surrogate = Some(match surrogate {
                    None => term,
                    Some(acc) => (acc + term)?,
                });
            }
        }
        let Some(surrogate) = surrogate else { continue };

        let grads = surrogate.backward()?;
        let mut acc = match param_grads.take() {
            Some(a) => a,
            None => params
                .iter()
                .map(|p| p.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        for (a, p) in acc.iter_mut().zip(params) {
            if let Some(g) = grads.get(p.as_tensor()) {
                *a = (&*a + g)?;
            }
        }
        param_grads = Some(acc);
        grad_memory = if memory_vars.is_empty() {
            None
        } else {
            Some(
                memory_vars
                    .iter()
                    .map(|(k, v)| {
                        // candle's backward returns gradients that can still reference the forward
                        // graph (e.g. `grad · Wᵀ` with W a variable); fed into the previous window's
                        // surrogate they would add spurious second-order terms. Detach them.
                        let gk = grads
                            .get(k.as_tensor())
                            .map(|g| g.detach())
                            .map(Ok)
                            .unwrap_or_else(|| k.as_tensor().zeros_like())?;
                        let gv = grads
                            .get(v.as_tensor())
                            .map(|g| g.detach())
                            .map(Ok)
                            .unwrap_or_else(|| v.as_tensor().zeros_like())?;
                        Ok((gk, gv))
                    })
                    .collect::<Result<_>>()?,
            )
        };
    }
    let grads = match (param_grads, params) {
        (Some(g), _) => g,
        (None, Some(p)) => p
            .iter()
            .map(|p| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?,
        (None, None) => Vec::new(),
    };
    Ok((
        SampleResult {
            loss: loss_total,
            valid,
            step_beacon_sizes: sizes,
            windows: windows.to_vec(),
        },
        grads,
    ))
}

fn labels_any(t: &Target, n: usize) -> bool {
    (0..n).any(|r| t.valid(r))
}
