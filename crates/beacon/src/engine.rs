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
//! Keys are cached **after** RoPE. This is exact because memory entry j always sits at position
//! `j` of `[sink | memory]` and open-window entries keep their positions until the window closes;
//! only a closing window's beacons move (by a known offset), and rotation composes: R(q) = R(q−p)·R(p).

use crate::config::{BeaconAttn, BeaconConfig, BeaconPos, ModelConfig};
use crate::error::{BeaconError, Result};
use crate::model::{apply_rope, rope_tables, AttentionContext, Chunk, Mask, Model};
use crate::schedule::{append_layout, interleave_layout, RatioChooser};
use candle_core::{DType, Device, Tensor};
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

/// One layer's cached `[sink | memory | open window]` K/V. Keys are rotated.
enum LayerCache {
    /// Preallocated buffers `[kv, cap, d]` filled up to `len` (inference).
    Buffer { k: Tensor, v: Tensor, len: usize },
    /// Plain tensors grown by concatenation, keeping the autograd graph (training).
    Graph {
        k: Option<Tensor>,
        v: Option<Tensor>,
    },
}

impl LayerCache {
    fn len(&self) -> usize {
        match self {
            LayerCache::Buffer { len, .. } => *len,
            LayerCache::Graph { k, .. } => k.as_ref().map(|k| k.dim(1).unwrap_or(0)).unwrap_or(0),
        }
    }

    fn view(&self) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match self {
            LayerCache::Buffer { len: 0, .. } | LayerCache::Graph { k: None, .. } => None,
            LayerCache::Buffer { k, v, len } => {
                Some((k.narrow(1, 0, *len)?, v.narrow(1, 0, *len)?))
            }
            LayerCache::Graph {
                k: Some(k),
                v: Some(v),
            } => Some((k.clone(), v.clone())),
            LayerCache::Graph { .. } => None,
        })
    }

    /// Drop everything from entry `keep` on.
    fn truncate(&mut self, keep: usize) -> Result<()> {
        match self {
            LayerCache::Buffer { len, .. } => *len = keep.min(*len),
            LayerCache::Graph { k, v } => {
                if keep == 0 {
                    *k = None;
                    *v = None;
                } else if let (Some(kk), Some(vv)) = (k.as_ref(), v.as_ref()) {
                    *k = Some(kk.narrow(1, 0, keep)?);
                    *v = Some(vv.narrow(1, 0, keep)?);
                }
            }
        }
        Ok(())
    }

    /// Make room for `entries` in total without reallocating (a no-op for graph caches). Full
    /// attention reserves its whole input up front: growing by copies would hold the old and the
    /// new buffer at once (2.5× the K/V at the last growth).
    fn reserve(&mut self, entries: usize) -> Result<()> {
        if let LayerCache::Buffer { k, v, len } = self {
            let cap = k.dim(1)?;
            if entries > cap {
                let want = entries.div_ceil(256) * 256;
                let (kvh, _, d) = k.dims3()?;
                let nk = Tensor::zeros((kvh, want, d), k.dtype(), &Device::Cpu)?;
                let nv = Tensor::zeros((kvh, want, d), v.dtype(), &Device::Cpu)?;
                if *len > 0 {
                    nk.slice_set(&k.narrow(1, 0, *len)?.contiguous()?, 1, 0)?;
                    nv.slice_set(&v.narrow(1, 0, *len)?.contiguous()?, 1, 0)?;
                }
                *k = nk;
                *v = nv;
            }
        }
        Ok(())
    }

    fn append(&mut self, k_new: &Tensor, v_new: &Tensor) -> Result<()> {
        let n = k_new.dim(1)?;
        if n == 0 {
            return Ok(());
        }
        match self {
            LayerCache::Buffer { k, v, len } => {
                let cap = k.dim(1)?;
                if *len + n > cap {
                    // Grow by 1.5× to keep both copies and slack small.
                    let want = (*len + n).max(cap + cap / 2);
                    self.reserve(want)?;
                    return self.append(k_new, v_new);
                }
                // The cache may keep a narrower dtype than the compute dtype (f16 K/V).
                k.slice_set(&k_new.to_dtype(k.dtype())?.contiguous()?, 1, *len)?;
                v.slice_set(&v_new.to_dtype(v.dtype())?.contiguous()?, 1, *len)?;
                *len += n;
            }
            LayerCache::Graph { k, v } => {
                *k = Some(match k.take() {
                    None => k_new.clone(),
                    Some(old) => Tensor::cat(&[&old, k_new], 1)?,
                });
                *v = Some(match v.take() {
                    None => v_new.clone(),
                    Some(old) => Tensor::cat(&[&old, v_new], 1)?,
                });
            }
        }
        Ok(())
    }
}

/// What one step does (a plain value, so the window arithmetic is testable without a model).
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    /// Raw tokens of the feed consumed by this step.
    pub n_raw: usize,
    /// Ratio of the window this step belongs to (0 = keep raw).
    pub ratio: usize,
    /// Entry flags of the step's chunk (true = beacon), in order.
    pub slots: Vec<bool>,
    /// This step completes its window.
    pub closes_window: bool,
    /// Remainder after the step.
    pub remainder: usize,
}

/// Memory bookkeeping of a session (no tensors).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Entries kept forever at the front (captured from the first window when it closes).
    pub sink: usize,
    /// Beacon (compressed) entries of closed windows; for ratio 0, the window's raw entries.
    pub beacons: usize,
    /// Flags of the open window's cached entries (true = beacon), in order.
    pub window_flags: Vec<bool>,
    /// Raw tokens of the open window.
    pub window_raw: usize,
    /// Raw tokens of the open window since its last beacon (interleave).
    pub remainder: usize,
    /// Ratio of the open window; None = no window open.
    pub ratio: Option<usize>,
}

impl MemoryLayout {
    /// Entries before the open window.
    pub fn memory_len(&self) -> usize {
        self.sink + self.beacons
    }
    pub fn context_len(&self) -> usize {
        self.memory_len() + self.window_flags.len()
    }
    /// Raw tokens actually held (raw entries of the open window).
    pub fn raw_entries(&self) -> usize {
        self.window_flags.iter().filter(|&&b| !b).count()
    }
}

/// Plan the next beacon-mode step given `remaining` raw tokens in the feed.
pub fn plan_step(
    layout: &MemoryLayout,
    cfg: &BeaconConfig,
    ratio: usize,
    remaining: usize,
    final_step_no_beacons: bool,
) -> StepPlan {
    let w = cfg.window;
    let n = (w - layout.window_raw).min(remaining);
    let closes = layout.window_raw + n == w;
    let last_of_sample = final_step_no_beacons && n == remaining;
    let (slots, remainder) = if ratio == 0 || last_of_sample {
        (vec![false; n], layout.remainder)
    } else {
        match cfg.pos {
            BeaconPos::Interleave => interleave_layout(n, layout.remainder, ratio),
            BeaconPos::Append => {
                let beacons = if closes { w / ratio } else { 0 };
                (append_layout(n, beacons), 0)
            }
        }
    };
    StepPlan {
        n_raw: n,
        ratio,
        slots,
        closes_window: closes,
        remainder,
    }
}

/// One sequence's memory and statistics.
pub struct Session {
    pub mode: Mode,
    pub beacon: BeaconConfig,
    pub chooser: RatioChooser,
    pub layout: MemoryLayout,
    caches: Vec<LayerCache>,
    /// Every raw token fed so far (the exact prefix this memory has seen).
    pub tokens: Vec<u32>,
    pub stats: Stats,
    /// Entry size: K and V of one position over all layers.
    bytes_per_entry: usize,
    /// Chunk length for full/streaming/truncate prefill.
    pub prefill_chunk: usize,
    dtype: DType,
    /// Dtype of the cached K/V: the compute dtype unless [`Session::set_kv_dtype`] chose another.
    kv_dtype: DType,
    differentiable: bool,
    /// Streaming mode: absolute position offset already removed by eviction is implicit; entries
    /// are always at positions 0..len.
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

    fn reset_caches(&mut self, model: &Model, differentiable: bool) {
        let cfg = &model.cfg;
        self.differentiable = differentiable;
        self.caches = (0..cfg.num_layers)
            .map(|_| {
                if differentiable {
                    LayerCache::Graph { k: None, v: None }
                } else {
                    let z = || {
                        Tensor::zeros(
                            (cfg.num_kv_heads, 0, cfg.head_dim),
                            self.kv_dtype,
                            &Device::Cpu,
                        )
                    };
                    LayerCache::Buffer {
                        k: z().expect("empty"),
                        v: z().expect("empty"),
                        len: 0,
                    }
                }
            })
            .collect();
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
        if tokens.is_empty() {
            return Ok(None);
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
                return self.feed_with(model, &tokens[cut..], offset_want, opts, progress);
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
        while done < tokens.len() {
            let remaining = tokens.len() - done;
            let out = match self.mode {
                Mode::Beacon => self.beacon_step(model, tokens, done, want, opts, start_total)?,
                _ => self.plain_step(model, tokens, done, want)?,
            };
            done += out.0;
            if let Some(l) = out.1 {
                logits.push(l);
            }
            debug_assert!(done <= tokens.len() && remaining > 0);
            progress(done);
        }
        Ok(match logits.len() {
            0 => None,
            1 => logits.pop(),
            _ => Some(Tensor::cat(&logits, 0)?),
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
        let ratio = match self.layout.ratio {
            Some(r) => r,
            None => {
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
        let ctx_len = self.layout.context_len();
        let (positions, mask) = self.positions_and_mask(&plan, ctx_len)?;
        let wanted = Self::wanted(want, done, n, tokens.len());
        let rows: Vec<usize> = wanted.iter().map(|&i| raw_rows[i - done]).collect();
        let n_beacons = plan.slots.iter().filter(|&&b| b).count() as i64;
        self.stats
            .step_beacon_sizes
            .push(if ratio == 0 { -1 } else { n_beacons });
        self.stats.steps += 1;

        let closing = plan.closes_window && !(opts.training_final && n == remaining);
        let mut ctx = BeaconContext {
            session: self,
            slots: &plan.slots,
            positions: &positions,
            closing,
            ratio,
            model,
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
        let l = &mut self.layout;
        if closing {
            let mut flags = std::mem::take(&mut l.window_flags);
            flags.extend_from_slice(&plan.slots);
            let kept = if ratio == 0 {
                flags.len()
            } else {
                flags.iter().filter(|&&b| b).count()
            };
            if l.sink == 0 && l.beacons == 0 && cfg.sink_size > 0 {
                l.sink = cfg.sink_size.min(flags.len());
            }
            l.beacons += kept;
            l.window_raw = 0;
            l.remainder = 0;
            l.ratio = None;
            self.stats.windows_closed += 1;
        } else {
            l.window_flags.extend_from_slice(&plan.slots);
            l.window_raw += n;
            l.remainder = plan.remainder;
        }
        self.note_peak(peak_bytes);
        Ok((n, logits))
    }

    /// Record the peak K/V bytes: what a step held at its worst moment, and what remains after it.
    fn note_peak(&mut self, step_peak_bytes: usize) {
        let now = self.kv_bytes_now().max(step_peak_bytes);
        self.stats.peak_kv_bytes = self.stats.peak_kv_bytes.max(now);
    }

    /// Positions and mask of a beacon-mode step (SPEC §2.5, §2.6).
    fn positions_and_mask(&self, plan: &StepPlan, ctx_len: usize) -> Result<(Vec<i64>, Mask)> {
        let cfg = &self.beacon;
        let n_entries = plan.slots.len();
        let contiguous: Vec<i64> = (ctx_len..ctx_len + n_entries).map(|p| p as i64).collect();
        let stepexp = cfg.pos == BeaconPos::Append
            && cfg.attn == BeaconAttn::StepExpansion
            && plan.slots.iter().any(|&b| b);
        if !stepexp {
            return Ok((contiguous, Mask::Causal));
        }
        // Append + step-expansion: beacon i summarises raw window tokens [0, (i+1)α).
        let alpha = plan.ratio;
        let mem = self.layout.memory_len();
        let cached_raw = self.layout.window_flags.len(); // append mode caches raw tokens only
        let base = mem as i64; // position of raw window token 0
        let mut positions = contiguous;
        let total = ctx_len + n_entries;
        let mut mask = vec![0f32; n_entries * total];
        let mut beacon_i = 0usize;
        for (row, &is_b) in plan.slots.iter().enumerate() {
            let line = &mut mask[row * total..(row + 1) * total];
            // causal among the chunk
            line[(ctx_len + row + 1)..total].fill(f32::NEG_INFINITY);
            if !is_b {
                continue;
            }
            let i = beacon_i;
            beacon_i += 1;
            let covered = (i + 1) * alpha;
            positions[row] =
                base + covered as i64 - 1 + if cfg.attend_prev { (i + 1) as i64 } else { 1 };
            // window raw columns: cached raw entries, then this chunk's raw rows
            for j in 0..cached_raw {
                if j >= covered {
                    line[mem + j] = f32::NEG_INFINITY;
                }
            }
            let mut raw_j = cached_raw;
            for (c, &cb) in plan.slots.iter().enumerate() {
                let col = ctx_len + c;
                if !cb {
                    if raw_j >= covered {
                        line[col] = f32::NEG_INFINITY;
                    }
                    raw_j += 1;
                }
            }
            // beacon columns: earlier beacons of the window (attend_prev) or only itself
            let mut bk = 0usize;
            for (c, &cb) in plan.slots.iter().enumerate() {
                if cb {
                    let visible = if cfg.attend_prev { bk <= i } else { bk == i };
                    line[ctx_len + c] = if visible { 0.0 } else { f32::NEG_INFINITY };
                    bk += 1;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (n_entries, total), &Device::Cpu)?;
        Ok((positions, Mask::Explicit(mask)))
    }

    /// One step of full / streaming / truncate / window-only: plain causal attention over a growing cache.
    fn plain_step(
        &mut self,
        model: &Model,
        tokens: &[u32],
        done: usize,
        want: Want,
    ) -> Result<(usize, Option<Tensor>)> {
        let mut n = self.prefill_chunk.max(1).min(tokens.len() - done);
        if let Mode::WindowOnly { sink, window } = self.mode {
            let window = window.max(1);
            if self.layout.window_raw >= window {
                self.close_window_only(sink)?;
            }
            // A chunk never crosses a window boundary.
            n = n.min(window - self.layout.window_raw);
        }
        if let Mode::Streaming { sink, recent } = self.mode {
            // A chunk never exceeds the recent window; evict the oldest non-sink entries so the context
            // plus this chunk fits sink + recent, at least 64 at a time so re-rotation is amortised.
            n = n.min(recent.max(1));
            let len = self.layout.context_len();
            if len + n > sink + recent {
                let count = (len + n - (sink + recent))
                    .max(64)
                    .min(len.saturating_sub(sink));
                self.evict(model, sink, count)?;
            }
        }
        let ctx_len = self.layout.context_len();
        let positions: Vec<i64> = (ctx_len..ctx_len + n).map(|p| p as i64).collect();
        let slots = vec![false; n];
        let rows: Vec<usize> = Self::wanted(want, done, n, tokens.len())
            .iter()
            .map(|&i| i - done)
            .collect();
        let mut ctx = PlainContext {
            caches: &mut self.caches,
        };
        let chunk = Chunk {
            ids: &tokens[done..done + n],
            is_beacon: &slots,
            positions: &positions,
            mask: Mask::Causal,
            logits_rows: &rows,
            differentiable: false,
        };
        let logits = model.forward(&chunk, &mut ctx)?;
        // Worst moment: the last layer's attention, all other layers already extended.
        let step_peak = ctx_len * self.bytes_per_entry + n * self.bytes_per_entry;
        self.layout.window_flags.extend_from_slice(&slots);
        self.layout.window_raw += n;
        self.stats.steps += 1;
        self.stats.step_beacon_sizes.push(0);
        self.note_peak(step_peak);
        Ok((n, logits))
    }

    /// Window-only: the open window is full and more tokens come; keep only the first `sink` entries
    /// (already at positions 0..sink, so nothing moves) and open the next window after them.
    fn close_window_only(&mut self, sink: usize) -> Result<()> {
        let l = &mut self.layout;
        if l.sink == 0 && l.beacons == 0 {
            // The first window closes: its first entries become the sink.
            l.sink = sink.min(l.window_flags.len());
        }
        let keep = l.sink;
        for cache in self.caches.iter_mut() {
            cache.truncate(keep)?;
        }
        l.window_flags.clear();
        l.window_raw = 0;
        l.remainder = 0;
        self.stats.windows_closed += 1;
        Ok(())
    }

    /// Streaming: drop `count` entries after the first `sink`, re-rotating the rest to close the gap.
    fn evict(&mut self, model: &Model, sink: usize, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let len = self.layout.context_len();
        let keep_from = sink + count;
        let moved = len - keep_from;
        let delta: Vec<i64> = vec![-(count as i64); moved];
        for cache in self.caches.iter_mut() {
            let (k, v) = cache.view()?.expect("non-empty");
            let k_tail = k.narrow(1, keep_from, moved)?.to_dtype(self.dtype)?;
            let k_tail = rotate_by(model, &k_tail, &delta, false)?;
            let v_tail = v.narrow(1, keep_from, moved)?.contiguous()?;
            cache.truncate(sink)?;
            cache.append(&k_tail, &v_tail)?;
        }
        self.layout.window_flags.truncate(len - count);
        Ok(())
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
            .map(|c| {
                Ok(match c.view()? {
                    Some((k, v)) => (k.contiguous()?, v.contiguous()?),
                    None => {
                        let (kvh, d) = match c {
                            LayerCache::Buffer { k, .. } => (k.dim(0)?, k.dim(2)?),
                            _ => (0, 0),
                        };
                        let z = Tensor::zeros((kvh, 0, d), self.kv_dtype, &Device::Cpu)?;
                        (z.clone(), z)
                    }
                })
            })
            .collect()
    }

    /// Training (window-level recomputation): replace the caches by per-layer `(k_rot, v)`
    /// `[kv, len, d]` tensors **keeping their autograd graph** (e.g. variables standing for the memory
    /// a window reads, so the backward yields the gradient with respect to that memory), and put the
    /// session in differentiable mode. The caller sets `layout` to match.
    pub fn set_graph_caches(&mut self, caches: Vec<(Tensor, Tensor)>) -> Result<()> {
        if caches.len() != self.caches.len() {
            return Err(BeaconError::invalid(format!(
                "{} cache layers given, the model has {}",
                caches.len(),
                self.caches.len()
            )));
        }
        self.differentiable = true;
        self.caches = caches
            .into_iter()
            .map(|(k, v)| {
                if k.dim(1).unwrap_or(0) == 0 {
                    LayerCache::Graph { k: None, v: None }
                } else {
                    LayerCache::Graph {
                        k: Some(k),
                        v: Some(v),
                    }
                }
            })
            .collect();
        Ok(())
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

/// Rotate keys `[kv, n, d]` by per-entry position offsets (may be negative).
pub fn rotate_by(
    model: &Model,
    k: &Tensor,
    offsets: &[i64],
    differentiable: bool,
) -> Result<Tensor> {
    if offsets.is_empty() {
        return Ok(k.clone());
    }
    let (cos, sin) = rope_tables(model.inv_freq(), offsets)?;
    apply_rope(
        &k.contiguous()?,
        &cos,
        &sin,
        model.cfg.rope_interleaved,
        differentiable,
    )
}

/// Attention context of a plain step: attend to the whole cache, then append the chunk.
struct PlainContext<'a> {
    caches: &'a mut Vec<LayerCache>,
}

impl AttentionContext for PlainContext<'_> {
    fn context(&mut self, layer: usize) -> Result<Vec<(Tensor, Tensor)>> {
        Ok(self.caches[layer].view()?.into_iter().collect())
    }
    fn commit(&mut self, layer: usize, k_rot: &Tensor, v: &Tensor) -> Result<()> {
        self.caches[layer].append(k_rot, v)
    }
}

/// Attention context of a beacon step: attend to `[sink | memory | open window]`; when the step
/// closes the window, keep only the window's beacons (re-rotated to their memory positions) right
/// after this layer's attention.
struct BeaconContext<'a> {
    session: &'a mut Session,
    slots: &'a [bool],
    positions: &'a [i64],
    closing: bool,
    ratio: usize,
    model: &'a Model,
    /// Largest K/V (bytes, all layers) held during this step, for the peak statistic.
    peak_bytes: usize,
}

impl AttentionContext for BeaconContext<'_> {
    fn context(&mut self, layer: usize) -> Result<Vec<(Tensor, Tensor)>> {
        Ok(self.session.caches[layer].view()?.into_iter().collect())
    }

    fn commit(&mut self, layer: usize, k_rot: &Tensor, v: &Tensor) -> Result<()> {
        let s = &mut *self.session;
        let per_layer_entry = s.bytes_per_entry / s.caches.len();
        // At this layer's attention every layer's cache was held, plus this layer's chunk K/V.
        let held: usize = s.caches.iter().map(|c| c.len()).sum::<usize>() + self.slots.len();
        self.peak_bytes = self.peak_bytes.max(held * per_layer_entry);
        if !self.closing {
            return s.caches[layer].append(k_rot, v);
        }
        let l = &s.layout;
        let mem = l.memory_len();
        let win_cached = l.window_flags.len();
        // The whole window: cached open-window entries followed by this chunk.
        let (k_win, v_win) = match s.caches[layer].view()? {
            Some((ck, cv)) if win_cached > 0 => (
                // Re-rotation and selection run in the compute dtype (the cache may be f16).
                Tensor::cat(
                    &[
                        &ck.narrow(1, mem, win_cached)?.to_dtype(k_rot.dtype())?,
                        k_rot,
                    ],
                    1,
                )?,
                Tensor::cat(
                    &[&cv.narrow(1, mem, win_cached)?.to_dtype(v.dtype())?, v],
                    1,
                )?,
            ),
            _ => (k_rot.clone(), v.clone()),
        };
        let mut flags = l.window_flags.clone();
        flags.extend_from_slice(self.slots);
        let n_win = flags.len();
        // Window entry positions: they were contiguous from `mem`, except step-expansion beacons of
        // this chunk, which carry their own positions.
        let mut win_pos: Vec<i64> = (mem..mem + win_cached).map(|p| p as i64).collect();
        win_pos.extend_from_slice(self.positions);
        let keep: Vec<u32> = if self.ratio == 0 {
            (0..n_win as u32).collect()
        } else {
            (0..n_win as u32).filter(|&i| flags[i as usize]).collect()
        };
        // Sink: the first entries of the first window, already at positions 0..sink.
        let new_sink = if l.sink == 0 && l.beacons == 0 && s.beacon.sink_size > 0 {
            s.beacon.sink_size.min(n_win)
        } else {
            0
        };
        let base = mem + new_sink;
        let idx = Tensor::new(keep.as_slice(), &Device::Cpu)?;
        let k_keep = k_win.index_select(&idx, 1)?;
        let v_keep = v_win.index_select(&idx, 1)?;
        let offsets: Vec<i64> = keep
            .iter()
            .enumerate()
            .map(|(j, &i)| (base + j) as i64 - win_pos[i as usize])
            .collect();
        let k_keep = if offsets.iter().all(|&o| o == 0) {
            k_keep
        } else {
            rotate_by(self.model, &k_keep, &offsets, s.differentiable)?
        };
        let cache = &mut s.caches[layer];
        if new_sink > 0 {
            let sink_k = k_win.narrow(1, 0, new_sink)?;
            let sink_v = v_win.narrow(1, 0, new_sink)?;
            cache.truncate(0)?;
            cache.append(&sink_k, &sink_v)?;
        } else {
            cache.truncate(mem)?;
        }
        cache.append(&k_keep, &v_keep)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(window: usize, pos: BeaconPos) -> BeaconConfig {
        BeaconConfig {
            window,
            stride: window,
            pos,
            ratios: vec![4],
            ..Default::default()
        }
    }

    fn run(
        layout: &mut MemoryLayout,
        c: &BeaconConfig,
        ratio: usize,
        mut n: usize,
    ) -> Vec<StepPlan> {
        let mut plans = Vec::new();
        while n > 0 {
            let p = plan_step(layout, c, ratio, n, false);
            n -= p.n_raw;
            if p.closes_window {
                let cached = layout.window_flags.iter().filter(|&&b| b).count();
                layout.beacons += cached + p.slots.iter().filter(|&&b| b).count();
                layout.window_flags.clear();
                layout.window_raw = 0;
                layout.remainder = 0;
            } else {
                layout.window_flags.extend_from_slice(&p.slots);
                layout.window_raw += p.n_raw;
                layout.remainder = p.remainder;
            }
            plans.push(p);
        }
        plans
    }

    #[test]
    fn memory_after_windows_is_sum_w_over_alpha() {
        // 200 tokens, W=32, α=2/4/8 → (beacons, raw entries) as in the reference fixtures.
        for (ratio, beacons, raw) in [(2, 96, 12), (4, 48, 10), (8, 24, 9)] {
            let c = BeaconConfig {
                ratios: vec![ratio],
                ..cfg(32, BeaconPos::Interleave)
            };
            let mut l = MemoryLayout::default();
            let plans = run(&mut l, &c, ratio, 200);
            assert_eq!(plans.len(), 7);
            assert_eq!(l.beacons, beacons);
            assert_eq!(l.window_flags.len(), raw);
            let sizes: Vec<usize> = plans
                .iter()
                .map(|p| p.slots.iter().filter(|&&b| b).count())
                .collect();
            assert_eq!(sizes[..6], [32 / ratio; 6]);
            assert_eq!(sizes[6], 8 / ratio);
        }
    }

    #[test]
    fn lengths_around_window_boundaries() {
        let (w, a) = (32usize, 4usize);
        let c = cfg(w, BeaconPos::Interleave);
        for n in [1, a - 1, a, w - 1, w, w + 1, 2 * w + a + 1] {
            let mut l = MemoryLayout::default();
            run(&mut l, &c, a, n);
            assert_eq!(l.beacons, (n / w) * (w / a), "n={n}");
            assert_eq!(l.window_raw, n % w, "n={n}");
            assert_eq!(l.window_flags.len(), n % w + (n % w) / a, "n={n}");
        }
    }

    #[test]
    fn token_by_token_matches_one_shot_layout() {
        let c = cfg(32, BeaconPos::Interleave);
        let mut one = MemoryLayout::default();
        run(&mut one, &c, 4, 77);
        let mut stream = MemoryLayout::default();
        for _ in 0..77 {
            run(&mut stream, &c, 4, 1);
        }
        assert_eq!(one, stream);
    }

    #[test]
    fn append_mode_only_full_windows_get_beacons() {
        let c = cfg(32, BeaconPos::Append);
        let mut l = MemoryLayout::default();
        let plans = run(&mut l, &c, 4, 40);
        assert_eq!(plans[0].slots.iter().filter(|&&b| b).count(), 8);
        assert!(plans[0].slots[..32].iter().all(|&b| !b));
        assert!(plans[1].slots.iter().all(|&b| !b));
        assert_eq!((l.beacons, l.window_raw), (8, 8));
    }

    /// The tiny Llama fixture (vocab 256, beacon window 32, 3 layers).
    fn tiny() -> crate::Loaded {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/reference/llama-tiny");
        crate::load(&dir, &crate::LoadOptions::default()).expect("the tiny fixture loads")
    }

    fn ids(n: usize, mul: usize) -> Vec<u32> {
        (0..n).map(|i| (i * mul % 251 + 3) as u32).collect()
    }

    /// Logits of `feeds` (each with its `Want`) in a fresh session, as one flat vector per feed.
    fn logits_of(
        l: &crate::Loaded,
        mode: Mode,
        chunk: usize,
        feeds: &[(&[u32], Want)],
    ) -> (Vec<Vec<f32>>, Session) {
        let m = &l.model;
        let mut s = Session::new(m, mode, l.beacon.clone());
        s.prefill_chunk = chunk;
        let out = feeds
            .iter()
            .filter_map(|(t, w)| s.feed(m, t, *w).unwrap())
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (out, s)
    }

    #[test]
    fn window_only_within_one_window_is_full_attention() {
        let l = tiny();
        let w = l.beacon.window;
        assert_eq!(w, 32);
        let x = ids(w, 37);
        for sink in [0, 2] {
            let mode = Mode::WindowOnly { sink, window: w };
            // up to and including a full window (it closes only when more tokens come)
            for n in [1, 5, w - 1, w] {
                let feeds: [(&[u32], Want); 2] =
                    [(&x[..n / 2], Want::From(0)), (&x[n / 2..n], Want::From(0))];
                let (full, _) = logits_of(&l, Mode::Full, 512, &feeds);
                let (wo, s) = logits_of(&l, mode.clone(), 512, &feeds);
                assert_eq!(wo, full, "sink {sink}, {n} tokens");
                assert_eq!(s.layout.context_len(), n);
                assert_eq!((s.layout.sink, s.stats.windows_closed), (0, 0));
                assert_eq!(s.stats.peak_kv_bytes, n * s.bytes_per_entry());
            }
        }
    }

    #[test]
    fn window_only_after_a_close_is_full_attention_over_sink_and_window() {
        let l = tiny();
        let w = l.beacon.window;
        let x = ids(3 * w + 11, 53);
        for sink in [0, 2] {
            let mode = Mode::WindowOnly { sink, window: w };
            for (closed, extra) in [(1, 1), (1, 20), (2, 11)] {
                let start = closed * w;
                let total = start + extra;
                // window-only reads everything; the reference reads only [sink tokens] + the open window
                let (wo, s) = logits_of(&l, mode.clone(), 512, &[(&x[..total], Want::From(start))]);
                let mut reference = x[..sink].to_vec();
                reference.extend_from_slice(&x[start..total]);
                let (full, _) = logits_of(&l, Mode::Full, 512, &[(&reference, Want::From(sink))]);
                let (a, b) = (&wo[0], &full[0]);
                assert_eq!(a.len(), extra * 256);
                if sink == 0 {
                    // the same chunks over the same K/V: bit for bit
                    assert_eq!(a, b, "{closed} closed + {extra}");
                }
                // with a sink, its K/V were computed in a longer chunk here (the first window) than
                // in the reference: equal up to f32 summation order
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    worst <= 1e-5 * scale,
                    "sink {sink}, {closed} closed + {extra}: max |Δ logit| {worst} (scale {scale})"
                );
                // bookkeeping: sink + open window held; the peak is the first window, or the sink
                // plus a later full window
                let lay = &s.layout;
                assert_eq!((lay.sink, lay.beacons, lay.window_raw), (sink, 0, extra));
                assert_eq!(lay.context_len(), sink + extra);
                assert_eq!(s.stats.windows_closed, closed);
                assert_eq!(s.kv_bytes_now(), (sink + extra) * s.bytes_per_entry());
                let peak = if closed >= 2 { sink + w } else { w };
                assert_eq!(s.stats.peak_kv_bytes, peak * s.bytes_per_entry());
                assert_eq!(s.stats.input_tokens, total);
            }
        }
    }

    #[test]
    fn window_only_chunks_stop_at_window_boundaries() {
        let l = tiny();
        let w = l.beacon.window;
        let x = ids(2 * w + 9, 29);
        let mode = Mode::WindowOnly { sink: 2, window: w };
        let (one, a) = logits_of(&l, mode.clone(), 512, &[(&x, Want::From(0))]);
        // small chunks, and token by token: same memory, same logits up to summation order
        for chunk in [7, 1] {
            let (many, b) = logits_of(&l, mode.clone(), chunk, &[(&x, Want::From(0))]);
            assert_eq!(a.layout, b.layout, "chunk {chunk}");
            assert_eq!(
                a.stats.peak_kv_bytes, b.stats.peak_kv_bytes,
                "chunk {chunk}"
            );
            let worst = one[0]
                .iter()
                .zip(&many[0])
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst < 1e-4, "chunk {chunk}: {worst}");
        }
        // one step per window at chunk 512: [0, w), [w, 2w), [2w, 2w + 9)
        assert_eq!(a.stats.steps, 3);
        let mut c = Session::new(&l.model, mode, l.beacon.clone());
        for t in &x {
            c.feed(&l.model, &[*t], Want::Last).unwrap();
        }
        assert_eq!(c.layout, a.layout);
        assert_eq!(c.stats.windows_closed, 2);
        assert_eq!(
            Mode::WindowOnly { sink: 1, window: 8 }.name(),
            "window-only"
        );
    }

    #[test]
    fn training_final_step_has_no_beacons() {
        let c = cfg(32, BeaconPos::Interleave);
        let l = MemoryLayout::default();
        let p = plan_step(&l, &c, 4, 32, true);
        assert!(p.slots.iter().all(|&b| !b));
        let p = plan_step(&l, &c, 4, 40, true);
        assert_eq!(p.slots.iter().filter(|&&b| b).count(), 8);
    }
}
