//! The progressive-compression driver (SPEC §2) and the baselines it is compared with.
//!
//! A [`Session`] is one sequence's state: the K/V memory `[sink | beacon memory | open window]` per
//! layer, the window bookkeeping (raw count, interleave remainder, ratio) and statistics. Feeding
//! tokens splits them into steps that never cross a window boundary; each step is one model forward
//! over the step's raw tokens with beacons interleaved (or appended). When a step closes a window,
//! each layer keeps that window's beacon K/V — re-rotated once to their memory positions — and frees
//! its raw K/V right after the layer's attention, so the raw K/V of a window read in one step are
//! never held for all layers at once.
//!
//! Parts: [`layout`] (the window plan and the close rule, pure functions), [`cache`] (one layer's
//! K/V), [`contexts`] (what each layer's attention reads and keeps during a step); this file is the
//! driver that feeds tokens through them, and the baselines' steps.
//!
//! Keys are cached **after** RoPE. This is exact because memory entry j always sits at position
//! `j` of `[sink | memory]` and open-window entries keep their positions until the window closes;
//! only a closing window's beacons move (by a known offset), and rotation composes: R(q) = R(q−p)·R(p).

mod baselines;
mod cache;
mod contexts;
pub mod layout;

use crate::attention::Mask;
use crate::config::{BeaconConfig, ModelConfig};
use crate::error::{BeaconError, Result};
use crate::model::{Chunk, Model};
use crate::schedule::RatioChooser;
use cache::LayerCache;
use candle_core::{DType, Device, Tensor};
pub use contexts::rotate_by;
use contexts::BeaconContext;
pub use layout::{plan_step, Keep, MemoryLayout, StepPlan, WindowClose};
use serde::{Deserialize, Serialize};

/// How the context is kept. All modes run through the same engine and report the same statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Mode {
    /// Activation Beacon: progressive compression of each window into beacon K/V.
    Beacon,
    /// Plain full attention over everything (prefilled in chunks; attention memory O(chunk × context)).
    Full,
    /// StreamingLLM: `sink` first entries plus the most recent `recent` entries; positions re-assigned.
    Streaming { sink: usize, recent: usize },
    /// Keep only the last `keep` input tokens, then full attention.
    Truncate { keep: usize },
    /// No memory at all: the first `sink` entries plus the open window. Windows are `window` raw
    /// tokens counted from the start of the sequence (the first one includes the sink tokens), as in
    /// beacon mode; when a window is full and more tokens come, every entry after the sink is dropped.
    /// Raw tokens of window k ≥ 1 sit at positions `sink, sink + 1, …`, where beacon mode puts them
    /// with zero beacons. The baseline that shows what the beacon memory adds.
    WindowOnly { sink: usize, window: usize },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Beacon => "beacon",
            Mode::Full => "full",
            Mode::Streaming { .. } => "streaming",
            Mode::Truncate { .. } => "truncate",
            Mode::WindowOnly { .. } => "window-only",
        }
    }
}

/// Which raw tokens of a feed need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    None,
    /// The last raw token of the feed (next-token prediction).
    Last,
    /// Raw tokens with index ≥ i in the feed.
    From(usize),
}

/// Options of one feed.
#[derive(Debug, Clone, Copy, Default)]
pub struct FeedOptions {
    /// Training: this feed ends the sample, so its last step gets no beacons (SPEC §2.3), and ratio 0
    /// may only be drawn when a later full window exists.
    pub training_final: bool,
    /// Training: keep the autograd graph through the memory (cat-based cache, differentiable ops).
    pub differentiable: bool,
    /// The ratio of a window this feed opens, instead of asking the session's chooser (training
    /// replays the ratios it drew for the sample).
    pub window_ratio: Option<usize>,
}

/// How an interruptible feed ended.
#[derive(Debug)]
pub struct FeedOutcome {
    /// Logits of the wanted rows that were read.
    pub logits: Option<Tensor>,
    /// Raw tokens of the feed consumed (all of them unless interrupted).
    pub consumed: usize,
    /// The feed stopped early because the caller asked.
    pub interrupted: bool,
}

/// Counters every mode reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub input_tokens: usize,
    pub windows_closed: usize,
    pub steps: usize,
    /// Peak bytes of K/V held (cached entries of every layer, plus the chunk of the layer being run).
    pub peak_kv_bytes: usize,
    /// Beacon tokens inserted per step (−1 = ratio 0), as the reference's `_all_beacon_sizes`.
    pub step_beacon_sizes: Vec<i64>,
}

/// One sequence's memory and statistics.
///
/// Fields are crate-private: front ends read them through accessors, and the trainer starts a
/// replay with [`Session::replay`] and forces ratios with [`FeedOptions::window_ratio`].
pub struct Session {
    pub(crate) mode: Mode,
    pub(crate) beacon: BeaconConfig,
    pub(crate) chooser: RatioChooser,
    pub(crate) layout: MemoryLayout,
    caches: Vec<LayerCache>,
    /// Every raw token fed so far (the exact prefix this memory has seen).
    pub(crate) tokens: Vec<u32>,
    pub(crate) stats: Stats,
    /// Entry size: K and V of one position over all layers.
    bytes_per_entry: usize,
    /// Chunk length for full/streaming/truncate prefill.
    pub(crate) prefill_chunk: usize,
    dtype: DType,
    /// Dtype of the cached K/V: the compute dtype unless [`Session::set_kv_dtype`] chose another.
    kv_dtype: DType,
    differentiable: bool,
    kv_dtype_bytes: usize,
}

/// Max positions seen by adapt-N: `max_position_embeddings × rope factor`.
pub fn position_budget(cfg: &ModelConfig) -> usize {
    (cfg.max_position_embeddings as f64 * cfg.rope_scaling_factor.unwrap_or(1.0)) as usize
}

impl Session {
    pub fn new(model: &Model, mode: Mode, beacon: BeaconConfig) -> Self {
        let cfg = &model.cfg;
        let kv_dtype_bytes = model.dtype.size_in_bytes();
        let chooser = RatioChooser::new(&beacon, position_budget(cfg));
        let mut s = Session {
            mode,
            beacon,
            chooser,
            layout: MemoryLayout::default(),
            caches: Vec::new(),
            tokens: Vec::new(),
            stats: Stats::default(),
            bytes_per_entry: cfg.num_layers * 2 * cfg.kv_dim() * kv_dtype_bytes,
            prefill_chunk: 512,
            dtype: model.dtype,
            kv_dtype: model.dtype,
            differentiable: false,
            kv_dtype_bytes,
        };
        s.reset_caches(model, false);
        s
    }

    /// A differentiable beacon session that starts at a recorded point of a sample: `layout` and
    /// the `tokens` before it, with `memory` per layer (`(k_rot, v)` `[kv, n, d]`, n =
    /// `layout.context_len()`, possibly 0) **keeping its autograd graph** — e.g. variables standing
    /// for the memory a window reads, so the backward yields the gradient with respect to it
    /// (window-level recomputation in the trainer).
    pub fn replay(
        model: &Model,
        beacon: BeaconConfig,
        layout: MemoryLayout,
        tokens: Vec<u32>,
        memory: Vec<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let layers = model.cfg.num_layers;
        if !memory.is_empty() && memory.len() != layers {
            return Err(BeaconError::invalid(format!(
                "{} memory layers given, the model has {layers}",
                memory.len()
            )));
        }
        for (k, _) in &memory {
            if k.dim(1)? != layout.context_len() {
                return Err(BeaconError::invalid(format!(
                    "replay memory holds {} entries, the layout says {}",
                    k.dim(1)?,
                    layout.context_len()
                )));
            }
        }
        let mut s = Session::new(model, Mode::Beacon, beacon);
        s.differentiable = true;
        s.caches = if memory.is_empty() {
            (0..layers).map(|_| LayerCache::graph(None, None)).collect()
        } else {
            memory
                .into_iter()
                .map(|(k, v)| LayerCache::graph(Some(k), Some(v)))
                .collect()
        };
        s.stats.input_tokens = tokens.len();
        s.layout = layout;
        s.tokens = tokens;
        Ok(s)
    }

    fn reset_caches(&mut self, model: &Model, differentiable: bool) {
        let cfg = &model.cfg;
        self.differentiable = differentiable;
        self.caches = (0..cfg.num_layers)
            .map(|_| {
                if differentiable {
                    LayerCache::graph(None, None)
                } else {
                    LayerCache::buffer(cfg.num_kv_heads, cfg.head_dim, self.kv_dtype)
                        .expect("an empty tensor allocates nothing")
                }
            })
            .collect();
    }

    /// Every raw token fed so far (the exact prefix this memory has seen).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }
    pub fn mode(&self) -> &Mode {
        &self.mode
    }
    /// The beacon settings this session compresses with.
    pub fn beacon_config(&self) -> &BeaconConfig {
        &self.beacon
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    /// Chunk length of full / streaming / truncate prefill.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }
    pub fn set_prefill_chunk(&mut self, chunk: usize) {
        self.prefill_chunk = chunk.max(1);
    }

    /// The ratio as a user reads it: the fixed ratio, or the mix's name and what it chose.
    pub fn ratio_label(&self) -> String {
        match self.mode {
            Mode::Beacon if self.beacon.ratios.len() == 1 => self.beacon.ratios[0].to_string(),
            Mode::Beacon => {
                let chosen = self
                    .chooser
                    .cached
                    .map(|r| format!(" (chose {r})"))
                    .unwrap_or_default();
                format!("{}{chosen}", self.beacon.ratio_mix.name())
            }
            _ => "-".into(),
        }
    }

    /// Forget the sequence (the ratio rng keeps running, as in the reference).
    pub fn reset(&mut self, model: &Model) {
        self.layout = MemoryLayout::default();
        self.tokens.clear();
        self.stats = Stats::default();
        self.chooser.reset();
        self.reset_caches(model, false);
    }

    /// Keep the cached K/V in `dtype` (f16 halves the memory and the bytes decode reads per token;
    /// attention still computes in f32). Only before the first token: the caches are reset.
    pub fn set_kv_dtype(&mut self, model: &Model, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(BeaconError::invalid(format!(
                "K/V dtype: expected f32, f16 or bf16, found {dtype:?}"
            )));
        }
        if !self.tokens.is_empty() {
            return Err(BeaconError::invalid(
                "the K/V dtype can only be set before the first token",
            ));
        }
        self.kv_dtype = dtype;
        self.kv_dtype_bytes = dtype.size_in_bytes();
        self.bytes_per_entry = model.cfg.num_layers * 2 * model.cfg.kv_dim() * self.kv_dtype_bytes;
        self.reset_caches(model, false);
        Ok(())
    }

    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// Bytes of one cached entry over all layers (K + V).
    pub fn bytes_per_entry(&self) -> usize {
        self.bytes_per_entry
    }

    pub fn kv_bytes_now(&self) -> usize {
        self.layout.context_len() * self.bytes_per_entry
    }

    /// What full attention would hold for the tokens seen so far.
    pub fn kv_bytes_full(&self) -> usize {
        self.tokens.len() * self.bytes_per_entry
    }

    pub fn kv_dtype_bytes(&self) -> usize {
        self.kv_dtype_bytes
    }

    /// Feed raw tokens; returns the logits `[rows, vocab]` of the raw tokens selected by `want`, in order.
    pub fn feed(&mut self, model: &Model, tokens: &[u32], want: Want) -> Result<Option<Tensor>> {
        self.feed_with(model, tokens, want, FeedOptions::default(), &mut |_| {})
    }

    /// [`Session::feed`] with options and a progress callback (raw tokens consumed so far in this feed).
    pub fn feed_with(
        &mut self,
        model: &Model,
        tokens: &[u32],
        want: Want,
        opts: FeedOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Option<Tensor>> {
        let out = self.feed_until(model, tokens, want, opts, &mut |done| {
            progress(done);
            true
        })?;
        Ok(out.logits)
    }

    /// A feed that asks `keep_going(consumed so far)` after every step and stops when it says no;
    /// the session then holds exactly the consumed prefix, as if only it had been fed.
    pub fn feed_until(
        &mut self,
        model: &Model,
        tokens: &[u32],
        want: Want,
        opts: FeedOptions,
        keep_going: &mut dyn FnMut(usize) -> bool,
    ) -> Result<FeedOutcome> {
        if tokens.is_empty() {
            return Ok(FeedOutcome {
                logits: None,
                consumed: 0,
                interrupted: false,
            });
        }
        let vocab = model.cfg.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(BeaconError::invalid(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        if opts.differentiable != self.differentiable {
            if !self.tokens.is_empty() {
                return Err(BeaconError::invalid(
                    "cannot switch a started session between training and inference",
                ));
            }
            self.reset_caches(model, opts.differentiable);
        }
        let tokens: &[u32] = match &self.mode {
            Mode::Truncate { keep } if self.tokens.is_empty() && tokens.len() > *keep => {
                // The prefix beyond `keep` is never read; report only what is kept.
                let cut = tokens.len() - keep;
                let offset_want = match want {
                    Want::From(i) => Want::From(i.saturating_sub(cut)),
                    w => w,
                };
                let mut out =
                    self.feed_until(model, &tokens[cut..], offset_want, opts, keep_going)?;
                out.consumed += cut;
                return Ok(out);
            }
            _ => tokens,
        };
        if matches!(self.mode, Mode::Full) {
            // Room for the whole input and a few hundred generated tokens.
            for cache in &mut self.caches {
                let entries = cache.len() + tokens.len() + 256;
                cache.reserve(entries)?;
            }
        }
        if let Mode::WindowOnly { sink, window } = self.mode {
            // Never more than the sink and one window.
            for cache in &mut self.caches {
                let entries = (cache.len() + tokens.len()).min(sink.min(window) + window);
                cache.reserve(entries)?;
            }
        }
        let start_total = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.stats.input_tokens = self.tokens.len();
        let mut logits = Vec::new();
        let mut done = 0;
        let mut interrupted = false;
        while done < tokens.len() {
            let out = match self.mode {
                Mode::Beacon => self.beacon_step(model, tokens, done, want, opts, start_total)?,
                _ => self.plain_step(model, tokens, done, want)?,
            };
            done += out.0;
            if let Some(l) = out.1 {
                logits.push(l);
            }
            if !keep_going(done) && done < tokens.len() {
                interrupted = true;
                break;
            }
        }
        if interrupted {
            self.tokens.truncate(start_total + done);
            self.stats.input_tokens = self.tokens.len();
        }
        let logits = match logits.len() {
            0 => None,
            1 => logits.pop(),
            _ => Some(Tensor::cat(&logits, 0)?),
        };
        Ok(FeedOutcome {
            logits,
            consumed: done,
            interrupted,
        })
    }

    /// Raw-token indices (into the feed) of `[from, from+n)` that `want` selects.
    fn wanted(want: Want, from: usize, n: usize, feed_len: usize) -> Vec<usize> {
        (from..from + n)
            .filter(|&i| match want {
                Want::None => false,
                Want::Last => i + 1 == feed_len,
                Want::From(s) => i >= s,
            })
            .collect()
    }

    /// One beacon-mode step. Returns (raw tokens consumed, logits of wanted rows).
    fn beacon_step(
        &mut self,
        model: &Model,
        tokens: &[u32],
        done: usize,
        want: Want,
        opts: FeedOptions,
        start_total: usize,
    ) -> Result<(usize, Option<Tensor>)> {
        let cfg = self.beacon.clone();
        let remaining = tokens.len() - done;
        // A new window chooses its ratio (SPEC §2.10).
        let ratio = match (self.layout.ratio, opts.window_ratio) {
            (Some(r), _) => r,
            (None, Some(r)) => {
                self.layout.ratio = Some(r);
                self.layout.remainder = 0;
                r
            }
            (None, None) => {
                let known = start_total + tokens.len();
                let later_full = if opts.training_final || opts.differentiable {
                    // a full window after this one exists within the sample
                    Some(start_total + done + 2 * cfg.window <= known)
                } else {
                    None
                };
                let r = self.chooser.next_window(known, later_full);
                self.layout.ratio = Some(r);
                self.layout.remainder = 0;
                r
            }
        };
        let plan = plan_step(&self.layout, &cfg, ratio, remaining, opts.training_final);
        let n = plan.n_raw;
        let raw_ids = &tokens[done..done + n];
        let beacon_id = model.cfg.beacon_token_id();
        let mut ids = Vec::with_capacity(plan.slots.len());
        let mut raw_rows = Vec::with_capacity(n); // chunk row of each raw token
        let mut it = raw_ids.iter();
        for (i, &b) in plan.slots.iter().enumerate() {
            if b {
                ids.push(beacon_id);
            } else {
                raw_rows.push(i);
                ids.push(*it.next().expect("slot count matches raw tokens"));
            }
        }
        let (positions, explicit) = self.layout.step_positions(&cfg, &plan);
        let mask = match explicit {
            None => Mask::Causal,
            Some(m) => {
                let total = self.layout.context_len() + plan.slots.len();
                Mask::Explicit(Tensor::from_vec(
                    m,
                    (plan.slots.len(), total),
                    &Device::Cpu,
                )?)
            }
        };
        let wanted = Self::wanted(want, done, n, tokens.len());
        let rows: Vec<usize> = wanted.iter().map(|&i| raw_rows[i - done]).collect();
        self.stats
            .step_beacon_sizes
            .push(plan.reference_beacon_size());
        self.stats.steps += 1;

        // The step that ends a training sample leaves its window open (it has no beacons).
        let closing = plan.closes_window && !(opts.training_final && n == remaining);
        let close = closing.then(|| {
            self.layout.close_window(
                &plan.slots,
                Keep::for_ratio(ratio),
                cfg.sink_size,
                cfg.raw_tail,
            )
        });
        let mut ctx = BeaconContext {
            caches: &mut self.caches,
            layout: &self.layout,
            slots: &plan.slots,
            positions: &positions,
            close: close.as_ref(),
            model,
            differentiable: self.differentiable,
            bytes_per_layer_entry: self.bytes_per_entry / model.cfg.num_layers,
            peak_bytes: 0,
        };
        let chunk = Chunk {
            ids: &ids,
            is_beacon: &plan.slots,
            positions: &positions,
            mask,
            logits_rows: &rows,
            differentiable: opts.differentiable,
        };
        let logits = model.forward(&chunk, &mut ctx)?;
        let peak_bytes = ctx.peak_bytes;
        // Bookkeeping after all layers ran.
        self.layout.advance(&plan, close.as_ref());
        if close.is_some() {
            self.stats.windows_closed += 1;
        }
        self.note_peak(peak_bytes);
        Ok((n, logits))
    }

    /// Record the peak K/V bytes: what a step held at its worst moment, and what remains after it.
    fn note_peak(&mut self, step_peak_bytes: usize) {
        let now = self.kv_bytes_now().max(step_peak_bytes);
        self.stats.peak_kv_bytes = self.stats.peak_kv_bytes.max(now);
    }

    /// The cached K/V per layer split into (sink, beacon, raw), keys **un-rotated** (pre-RoPE), for
    /// comparison with the reference's memory dumps. Each part `[kv, n, d]` or None when empty.
    #[allow(clippy::type_complexity)]
    pub fn memory_pre_rope(
        &self,
        model: &Model,
        layer: usize,
    ) -> Result<[Option<(Tensor, Tensor)>; 3]> {
        let l = &self.layout;
        let (k, v) = match self.caches[layer].view()? {
            Some(kv) => kv,
            None => return Ok([None, None, None]),
        };
        let (k, v) = (k.to_dtype(self.dtype)?, v.to_dtype(self.dtype)?);
        let len = k.dim(1)?;
        let positions: Vec<i64> = (0..len as i64).map(|p| -p).collect();
        let k = rotate_by(model, &k, &positions, false)?;
        let part = |start: usize, n: usize| -> Result<Option<(Tensor, Tensor)>> {
            Ok(if n == 0 {
                None
            } else {
                Some((k.narrow(1, start, n)?, v.narrow(1, start, n)?))
            })
        };
        Ok([
            part(0, l.sink)?,
            part(l.sink, l.beacons)?,
            part(l.memory_len(), l.window_flags.len())?,
        ])
    }

    /// Export the per-layer caches (rotated keys, values), for saved contexts.
    pub fn export_caches(&self) -> Result<Vec<(Tensor, Tensor)>> {
        self.caches
            .iter()
            .map(|c| c.export(self.kv_dtype))
            .collect()
    }

    /// Replace the caches with saved ones (shapes checked by the caller against the layout).
    pub fn import_caches(&mut self, model: &Model, caches: Vec<(Tensor, Tensor)>) -> Result<()> {
        self.reset_caches(model, false);
        if caches.len() != self.caches.len() {
            return Err(BeaconError::invalid(format!(
                "saved context has {} layers, the model has {}",
                caches.len(),
                self.caches.len()
            )));
        }
        for (cache, (k, v)) in self.caches.iter_mut().zip(caches) {
            cache.append(&k, &v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
