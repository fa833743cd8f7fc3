//! Tensors seen as per-head slices of their CPU storage, borrowed for one kernel call.

use candle_core::{CpuStorage, Storage, Tensor};

use super::kernels::widen_f16;

/// A tensor `[heads, rows, d]` whose rows are contiguous (`stride = [hs, d, 1]`), borrowed from its
/// CPU storage: head `h` is `data[h·hs .. h·hs + rows·d]`.
pub(super) struct Heads<'a, T> {
    pub(super) data: &'a [T],
    pub(super) head_stride: usize,
}

impl<T> Heads<'_, T> {
    /// Rows `first..first + n` (`d` values each) of head `h` (checked: panics past the storage).
    pub(super) fn rows(&self, h: usize, first: usize, n: usize, d: usize) -> &[T] {
        let start = h * self.head_stride + first * d;
        &self.data[start..start + n * d]
    }
}

/// Cached keys or values: f32, or f16 (a cache kept at half the bytes).
pub(super) enum KvHeads<'a> {
    F32(Heads<'a, f32>),
    F16(Heads<'a, half::f16>),
}

/// Consecutive rows of one head of cached K or V, as stored.
pub(super) enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl KvHeads<'_> {
    /// Rows `first..first + n` (`d` values each) of head `h`, as stored.
    pub(super) fn rows(&self, h: usize, first: usize, n: usize, d: usize) -> KvRows<'_> {
        match self {
            KvHeads::F32(x) => KvRows::F32(x.rows(h, first, n, d)),
            KvHeads::F16(x) => KvRows::F16(x.rows(h, first, n, d)),
        }
    }

    /// All `heads × len` rows widened to f32 (`[heads, len, d]`, contiguous) when stored in f16.
    pub(super) fn widened(&self, heads: usize, len: usize, d: usize) -> Option<Vec<f32>> {
        let KvHeads::F16(x) = self else {
            return None;
        };
        let mut out = vec![0f32; heads * len * d];
        for (h, dst) in out.chunks_exact_mut(len * d).enumerate() {
            let first = h * x.head_stride;
            widen_f16(&x.data[first..first + len * d], dst);
        }
        Some(out)
    }
}

/// The slice behind `t` from its start offset, if its rows are contiguous with row stride `d`
/// (true for candle's own narrow/transpose results used here).
fn layout_heads<'a, T>(data: &'a [T], t: &Tensor) -> Option<Heads<'a, T>> {
    let layout = t.layout();
    let (heads, rows, d) = t.dims3().ok()?;
    let stride = layout.stride();
    if (rows > 1 && stride[1] != d) || (d > 1 && stride[2] != 1) {
        return None;
    }
    let data = data.get(layout.start_offset()..)?;
    let head_stride = if heads > 1 { stride[0] } else { rows * d };
    if heads > 0 && (heads - 1) * head_stride + rows * d > data.len() {
        return None;
    }
    Some(Heads { data, head_stride })
}

/// `t` as f32 heads, if it is an f32 CPU tensor with contiguous rows.
pub(super) fn heads_of<'a>(storage: &'a Storage, t: &Tensor) -> Option<Heads<'a, f32>> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => layout_heads(v, t),
        _ => None,
    }
}

/// `t` as cached K or V heads (f32 or f16 CPU tensor with contiguous rows).
pub(super) fn kv_heads_of<'a>(storage: &'a Storage, t: &Tensor) -> Option<KvHeads<'a>> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => layout_heads(v, t).map(KvHeads::F32),
        Storage::Cpu(CpuStorage::F16(v)) => layout_heads(v, t).map(KvHeads::F16),
        _ => None,
    }
}
