//! What a step's forward attends to and keeps, layer by layer ([`AttentionContext`]): plain steps
//! append to the cache; beacon steps apply the close rule right after each layer's attention, so a
//! window's raw K/V are never held for all layers at once.

use super::cache::LayerCache;
use super::layout::{MemoryLayout, WindowClose};
use crate::error::Result;
use crate::model::{apply_rope, rope_tables, AttentionContext, Model};
use candle_core::{Device, Tensor};

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
pub(super) struct PlainContext<'a> {
    pub caches: &'a mut [LayerCache],
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
/// closes the window, keep what `close` says (re-rotated to memory positions) right after this
/// layer's attention.
pub(super) struct BeaconContext<'a> {
    pub caches: &'a mut [LayerCache],
    /// The layout before this step.
    pub layout: &'a MemoryLayout,
    pub slots: &'a [bool],
    pub positions: &'a [i64],
    /// The close rule's decision when this step closes the window.
    pub close: Option<&'a WindowClose>,
    pub model: &'a Model,
    pub differentiable: bool,
    /// Bytes of one entry in one layer (K + V).
    pub bytes_per_layer_entry: usize,
    /// Largest K/V (bytes, all layers) held during this step, for the peak statistic.
    pub peak_bytes: usize,
}

impl AttentionContext for BeaconContext<'_> {
    fn context(&mut self, layer: usize) -> Result<Vec<(Tensor, Tensor)>> {
        Ok(self.caches[layer].view()?.into_iter().collect())
    }

    fn commit(&mut self, layer: usize, k_rot: &Tensor, v: &Tensor) -> Result<()> {
        // At this layer's attention every layer's cache was held, plus this layer's chunk K/V.
        let held: usize = self.caches.iter().map(|c| c.len()).sum::<usize>() + self.slots.len();
        self.peak_bytes = self.peak_bytes.max(held * self.bytes_per_layer_entry);
        let Some(close) = self.close else {
            return self.caches[layer].append(k_rot, v);
        };
        let mem = self.layout.memory_len();
        let win_cached = self.layout.window_flags.len();
        // The whole window: cached open-window entries followed by this chunk.
        let (k_win, v_win) = match self.caches[layer].view()? {
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
        // Window entry positions: contiguous from `mem`, except step-expansion beacons of this
        // chunk, which carry their own positions.
        let mut win_pos: Vec<i64> = (mem..mem + win_cached).map(|p| p as i64).collect();
        win_pos.extend_from_slice(self.positions);
        let keep: Vec<u32> = close.keep.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(keep.as_slice(), &Device::Cpu)?;
        let k_keep = k_win.index_select(&idx, 1)?;
        let v_keep = v_win.index_select(&idx, 1)?;
        let offsets: Vec<i64> = close
            .keep
            .iter()
            .enumerate()
            .map(|(j, &i)| (close.first_position + j) as i64 - win_pos[i])
            .collect();
        let k_keep = if offsets.iter().all(|&o| o == 0) {
            k_keep
        } else {
            rotate_by(self.model, &k_keep, &offsets, self.differentiable)?
        };
        let cache = &mut self.caches[layer];
        if close.new_sink > 0 {
            // The first window: its first entries, already at positions 0..sink, become the sink.
            let sink_k = k_win.narrow(1, 0, close.new_sink)?;
            let sink_v = v_win.narrow(1, 0, close.new_sink)?;
            cache.truncate(0)?;
            cache.append(&sink_k, &sink_v)?;
        } else {
            // Drop the open window and the previous raw tail: the kept entries follow the beacons.
            cache.truncate(close.first_position)?;
        }
        cache.append(&k_keep, &v_keep)
    }
}
