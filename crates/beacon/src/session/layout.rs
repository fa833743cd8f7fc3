//! The memory layout `[sink | beacons | raw tail | open window]` as plain values, and the two rules that move
//! it: how the next step is planned ([`plan_step`], SPEC §2.3–2.4) and what survives when a window
//! closes ([`MemoryLayout::close_window`], SPEC §2.7). No tensors: the session applies these plans
//! to the K/V caches, so the arithmetic is tested here without a model.

use crate::config::{BeaconAttn, BeaconConfig, BeaconPos};
use crate::schedule::{append_layout, interleave_layout};
use serde::{Deserialize, Serialize};

/// What one step does.
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

impl StepPlan {
    /// Beacons this step inserts.
    pub fn beacons(&self) -> usize {
        self.slots.iter().filter(|&&b| b).count()
    }

    /// The step's entry in the reference's `_all_beacon_sizes`: beacons inserted, −1 for ratio 0.
    pub fn reference_beacon_size(&self) -> i64 {
        if self.ratio == 0 {
            -1
        } else {
            self.beacons() as i64
        }
    }
}

/// Memory bookkeeping of a session (no tensors).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Entries kept forever at the front (captured from the first window when it closes).
    pub sink: usize,
    /// Beacon (compressed) entries of closed windows; for ratio 0, the window's raw entries.
    pub beacons: usize,
    /// Raw entries of the last closed window kept after the beacons until the next window closes
    /// (`BeaconConfig::raw_tail`; 0 under the reference's rule).
    #[serde(default)]
    pub tail: usize,
    /// Flags of the open window's cached entries (true = beacon), in order.
    pub window_flags: Vec<bool>,
    /// Raw tokens of the open window.
    pub window_raw: usize,
    /// Raw tokens of the open window since its last beacon (interleave).
    pub remainder: usize,
    /// Ratio of the open window; None = no window open.
    pub ratio: Option<usize>,
}

/// Which entries of a closing window become memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The window's beacons (ratio ≥ 1).
    Beacons,
    /// Every entry of the window (ratio 0: "no compression", SPEC §2.7).
    All,
    /// Nothing (the window-only baseline: no memory at all).
    Nothing,
}

impl Keep {
    /// What a beacon window of `ratio` keeps.
    pub fn for_ratio(ratio: usize) -> Keep {
        if ratio == 0 {
            Keep::All
        } else {
            Keep::Beacons
        }
    }
}

/// The result of the close rule: which window entries survive and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowClose {
    /// Indices into the closing window's entries (the cached open-window entries, then the closing
    /// step's chunk) that become memory, in order.
    pub keep: Vec<usize>,
    /// Entries captured as the sink from the front of this window (the first window to close only;
    /// they are at positions `0..new_sink` already).
    pub new_sink: usize,
    /// Memory position of `keep[0]`; `keep[j]` goes to `first_position + j`. The previous raw tail
    /// is dropped, so this is right after the sink and the beacons.
    pub first_position: usize,
    /// The last `tail` entries of `keep` are the new raw tail (raw entries, not beacons).
    pub tail: usize,
}

impl MemoryLayout {
    /// Entries before the open window.
    pub fn memory_len(&self) -> usize {
        self.sink + self.beacons + self.tail
    }
    pub fn context_len(&self) -> usize {
        self.memory_len() + self.window_flags.len()
    }
    /// Raw tokens actually held (raw entries of the open window).
    pub fn raw_entries(&self) -> usize {
        self.window_flags.iter().filter(|&&b| !b).count()
    }

    /// The close rule — the one place that decides what survives a window (SPEC §2.7): the window is
    /// the open window's cached entries followed by the closing step's `chunk` flags; `keep` of them
    /// stay, re-placed contiguously after the sink and the beacons (the previous raw tail, if any, is
    /// dropped); the first window to close also gives its first `sink_size` entries to the sink.
    /// With `raw_tail` > 0 (ours), a beacon window also keeps its last `raw_tail` raw entries (never
    /// its sink entries) after its beacons, as the new tail.
    pub fn close_window(
        &self,
        chunk: &[bool],
        keep: Keep,
        sink_size: usize,
        raw_tail: usize,
    ) -> WindowClose {
        let flags: Vec<bool> = self.window_flags.iter().chain(chunk).copied().collect();
        let n_window = flags.len();
        let new_sink = if self.sink == 0 && self.beacons == 0 && self.tail == 0 {
            sink_size.min(n_window)
        } else {
            0
        };
        let (keep, tail) = match keep {
            Keep::Beacons => {
                let mut keep: Vec<usize> = (0..n_window).filter(|&i| flags[i]).collect();
                let raw_after_sink: Vec<usize> =
                    (new_sink..n_window).filter(|&i| !flags[i]).collect();
                let tail = raw_tail.min(raw_after_sink.len());
                keep.extend_from_slice(&raw_after_sink[raw_after_sink.len() - tail..]);
                (keep, tail)
            }
            Keep::All => ((0..n_window).collect(), 0),
            Keep::Nothing => (Vec::new(), 0),
        };
        WindowClose {
            keep,
            new_sink,
            first_position: self.sink + self.beacons + new_sink,
            tail,
        }
    }

    /// Positions of a beacon-mode step's entries (SPEC §2.5) and, for append + step-expansion only,
    /// its additive mask `[entries, context + entries]` (SPEC §2.6); None = plain causal.
    pub fn step_positions(
        &self,
        cfg: &BeaconConfig,
        plan: &StepPlan,
    ) -> (Vec<i64>, Option<Vec<f32>>) {
        let ctx_len = self.context_len();
        let n_entries = plan.slots.len();
        let contiguous: Vec<i64> = (ctx_len..ctx_len + n_entries).map(|p| p as i64).collect();
        let stepexp = cfg.pos == BeaconPos::Append
            && cfg.attn == BeaconAttn::StepExpansion
            && plan.slots.iter().any(|&b| b);
        if !stepexp {
            return (contiguous, None);
        }
        // Append + step-expansion: beacon i summarises raw window tokens [0, (i+1)α).
        let alpha = plan.ratio;
        let mem = self.memory_len();
        let cached_raw = self.window_flags.len(); // append mode caches raw tokens only
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
        (positions, Some(mask))
    }

    /// The window stays open and grows by `plan`'s chunk.
    pub fn extend_window(&mut self, plan: &StepPlan) {
        self.window_flags.extend_from_slice(&plan.slots);
        self.window_raw += plan.n_raw;
        self.remainder = plan.remainder;
    }

    /// The window closed as `close` (from [`MemoryLayout::close_window`] on this layout) says.
    pub fn apply_close(&mut self, close: &WindowClose) {
        self.sink += close.new_sink;
        self.beacons += close.keep.len() - close.tail;
        self.tail = close.tail;
        self.window_flags.clear();
        self.window_raw = 0;
        self.remainder = 0;
        self.ratio = None;
    }

    /// Advance past `plan`'s step: closed with `close`, or still open when `close` is None.
    pub fn advance(&mut self, plan: &StepPlan, close: Option<&WindowClose>) {
        match close {
            Some(c) => self.apply_close(c),
            None => self.extend_window(plan),
        }
    }
}

/// Plan the next beacon-mode step given `remaining` raw tokens in the feed. With
/// `final_step_no_beacons` (training), the step that ends the sample gets no beacons (SPEC §2.3).
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

    /// Feed `n` raw tokens at `ratio` through the real rules (plan, close, advance).
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
            let close = p.closes_window.then(|| {
                layout.close_window(&p.slots, Keep::for_ratio(ratio), c.sink_size, c.raw_tail)
            });
            layout.advance(&p, close.as_ref());
            plans.push(p);
        }
        plans
    }

    #[test]
    fn spec_interleave_placement_examples() {
        // SPEC §2.4, α = 4: ρ=0, n=10 → `r r r r B r r r r B r r`, ρ=2; then ρ=2, n=3 → `r r B r`, ρ=1.
        let c = cfg(32, BeaconPos::Interleave);
        let mut l = MemoryLayout::default();
        let p = plan_step(&l, &c, 4, 10, false);
        let b: Vec<usize> = (0..p.slots.len()).filter(|&i| p.slots[i]).collect();
        assert_eq!((p.slots.len(), b, p.remainder), (12, vec![4, 9], 2));
        l.advance(&p, None);
        let p = plan_step(&l, &c, 4, 3, false);
        assert_eq!(
            (p.slots.clone(), p.remainder),
            (vec![false, false, true, false], 1)
        );
    }

    #[test]
    fn spec_worked_example_positions() {
        // SPEC §2.5 (W=2048, α=8, 5000 tokens): inputs at 0…2303, 256…2559, 512…1528; memory 512
        // beacons and 1017 cached entries; the next token at position 1529.
        let c = cfg(2048, BeaconPos::Interleave);
        let mut l = MemoryLayout::default();
        let mut starts = Vec::new();
        let mut left = 5000;
        while left > 0 {
            let p = plan_step(&l, &c, 8, left, false);
            starts.push((l.context_len(), l.context_len() + p.slots.len() - 1));
            left -= p.n_raw;
            let close = p
                .closes_window
                .then(|| l.close_window(&p.slots, Keep::Beacons, 0, 0));
            l.advance(&p, close.as_ref());
        }
        assert_eq!(starts, vec![(0, 2303), (256, 2559), (512, 1528)]);
        assert_eq!(
            (l.beacons, l.window_flags.len(), l.context_len()),
            (512, 1017, 1529)
        );
    }

    #[test]
    fn close_rule_keeps_beacons_sink_and_raw_windows() {
        // A window of 8 raw tokens at α=4 fed as 5 + 3: beacons at window entries 4 and 9.
        let c = BeaconConfig {
            sink_size: 1,
            ..cfg(8, BeaconPos::Interleave)
        };
        let mut l = MemoryLayout::default();
        let p = plan_step(&l, &c, 4, 5, false);
        l.advance(&p, None);
        let p = plan_step(&l, &c, 4, 3, false);
        assert!(p.closes_window);
        let close = l.close_window(&p.slots, Keep::Beacons, c.sink_size, 0);
        // the first window gives its first entry to the sink; beacons go right after it
        assert_eq!(
            close,
            WindowClose {
                keep: vec![4, 9],
                new_sink: 1,
                first_position: 1,
                tail: 0
            }
        );
        l.advance(&p, Some(&close));
        assert_eq!(
            (l.sink, l.beacons, l.context_len(), l.ratio),
            (1, 2, 3, None)
        );
        // a later window captures no sink; ratio 0 keeps all of its entries
        let p = plan_step(&l, &c, 0, 8, false);
        let close = l.close_window(&p.slots, Keep::for_ratio(0), c.sink_size, 0);
        assert_eq!(
            (close.keep, close.new_sink, close.first_position),
            ((0..8).collect(), 0, 3)
        );
        // window-only keeps nothing but still captures the sink of the first window
        let fresh = MemoryLayout {
            window_flags: vec![false; 8],
            window_raw: 8,
            ..Default::default()
        };
        let close = fresh.close_window(&[], Keep::Nothing, 2, 0);
        assert_eq!((close.keep.len(), close.new_sink), (0, 2));
    }

    #[test]
    fn raw_tail_keeps_the_last_raw_entries_until_the_next_close() {
        // W=8, α=4, tail 3, sink 1: window entries `r r r r B r r r r B` (raw at 0-3, 5-8).
        let c = BeaconConfig {
            sink_size: 1,
            raw_tail: 3,
            ..cfg(8, BeaconPos::Interleave)
        };
        let mut l = MemoryLayout::default();
        let p = plan_step(&l, &c, 4, 8, false);
        let close = l.close_window(&p.slots, Keep::Beacons, c.sink_size, c.raw_tail);
        // beacons first, then the last three raw entries; all after the new sink
        assert_eq!(
            close,
            WindowClose {
                keep: vec![4, 9, 6, 7, 8],
                new_sink: 1,
                first_position: 1,
                tail: 3
            }
        );
        l.advance(&p, Some(&close));
        assert_eq!((l.sink, l.beacons, l.tail, l.memory_len()), (1, 2, 3, 6));
        // the next close drops the old tail: new beacons go right after the old beacons
        let p = plan_step(&l, &c, 4, 8, false);
        let close = l.close_window(&p.slots, Keep::Beacons, c.sink_size, c.raw_tail);
        assert_eq!(
            (close.first_position, close.tail, close.keep.len()),
            (3, 3, 5)
        );
        l.advance(&p, Some(&close));
        assert_eq!((l.sink, l.beacons, l.tail, l.context_len()), (1, 4, 3, 8));
        // ratio 0 keeps the whole window raw and no separate tail
        let p = plan_step(&l, &c, 0, 8, false);
        let close = l.close_window(&p.slots, Keep::All, c.sink_size, c.raw_tail);
        l.advance(&p, Some(&close));
        assert_eq!((l.beacons, l.tail), (12, 0));
        // a tail never takes the sink's entries: a 2-entry first window with sink 1 keeps 1 raw
        let tiny = MemoryLayout {
            window_flags: vec![false, false],
            window_raw: 2,
            ..Default::default()
        };
        let close = tiny.close_window(&[], Keep::Beacons, 1, 5);
        assert_eq!((close.keep, close.new_sink, close.tail), (vec![1], 1, 1));
    }

    #[test]
    fn raw_tail_memory_in_the_steady_state() {
        // 200 tokens, W=32, α=8, tail 16: memory = all beacons + one tail, open window as before.
        let c = BeaconConfig {
            ratios: vec![8],
            raw_tail: 16,
            ..cfg(32, BeaconPos::Interleave)
        };
        let mut l = MemoryLayout::default();
        run(&mut l, &c, 8, 200);
        assert_eq!((l.beacons, l.tail, l.window_raw), (24, 16, 8));
        assert_eq!(l.context_len(), 24 + 16 + 9);
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
            let sizes: Vec<usize> = plans.iter().map(StepPlan::beacons).collect();
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
        assert_eq!(plans[0].beacons(), 8);
        assert!(plans[0].slots[..32].iter().all(|&b| !b));
        assert!(plans[1].slots.iter().all(|&b| !b));
        assert_eq!((l.beacons, l.window_raw), (8, 8));
    }

    #[test]
    fn training_final_step_has_no_beacons() {
        let c = cfg(32, BeaconPos::Interleave);
        let l = MemoryLayout::default();
        let p = plan_step(&l, &c, 4, 32, true);
        assert!(p.slots.iter().all(|&b| !b));
        let p = plan_step(&l, &c, 4, 40, true);
        assert_eq!(p.beacons(), 8);
    }
}
