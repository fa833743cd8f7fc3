//! The baselines' steps, run by the same session so every mode reports the same statistics: full
//! attention, truncation, StreamingLLM (sink + recent, re-rotated on eviction) and window-only (the
//! sink and the open window, no memory: the close rule keeping nothing).

use super::contexts::{rotate_by, PlainContext};
use super::layout::Keep;
use super::{Mode, Session, Want};
use crate::attention::Mask;
use crate::error::Result;
use crate::model::{Chunk, Model};
use candle_core::Tensor;

impl Session {
    /// One step of full / streaming / truncate / window-only: plain causal attention over a growing cache.
    pub(super) fn plain_step(
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
        // The close rule keeping nothing: the first window still gives its first entries, already
        // at positions 0..sink, to the sink.
        let close = self.layout.close_window(&[], Keep::Nothing, sink, 0);
        for cache in self.caches.iter_mut() {
            cache.truncate(close.first_position)?;
        }
        self.layout.apply_close(&close);
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
}
