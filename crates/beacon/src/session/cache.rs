//! One layer's K/V cache `[sink | memory | open window]`: preallocated buffers for inference (the
//! K/V may be narrower than the compute dtype), concatenated graph tensors for training.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// One layer's cached `[sink | memory | open window]` K/V. Keys are rotated.
pub(crate) enum LayerCache {
    /// Preallocated buffers `[kv, cap, d]` filled up to `len` (inference).
    Buffer { k: Tensor, v: Tensor, len: usize },
    /// Plain tensors grown by concatenation, keeping the autograd graph (training).
    Graph {
        k: Option<Tensor>,
        v: Option<Tensor>,
    },
}

impl LayerCache {
    /// An empty inference cache for `kv_heads` heads of `head_dim` in `dtype`.
    pub(crate) fn buffer(kv_heads: usize, head_dim: usize, dtype: DType) -> Result<Self> {
        let z = || Tensor::zeros((kv_heads, 0, head_dim), dtype, &Device::Cpu);
        Ok(LayerCache::Buffer {
            k: z()?,
            v: z()?,
            len: 0,
        })
    }

    /// A training cache holding `(k, v)` `[kv, n, d]` with their autograd graph (n may be 0).
    pub(crate) fn graph(k: Option<Tensor>, v: Option<Tensor>) -> Self {
        match (k, v) {
            (Some(k), Some(v)) if k.dim(1).unwrap_or(0) > 0 => LayerCache::Graph {
                k: Some(k),
                v: Some(v),
            },
            _ => LayerCache::Graph { k: None, v: None },
        }
    }

    /// The cached K/V as contiguous tensors; an empty cache gives `[kv, 0, d]` zeros in `dtype`.
    pub(crate) fn export(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok(match self.view()? {
            Some((k, v)) => (k.contiguous()?, v.contiguous()?),
            None => {
                let (kvh, d) = match self {
                    LayerCache::Buffer { k, .. } => (k.dim(0)?, k.dim(2)?),
                    LayerCache::Graph { .. } => (0, 0),
                };
                let z = Tensor::zeros((kvh, 0, d), dtype, &Device::Cpu)?;
                (z.clone(), z)
            }
        })
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            LayerCache::Buffer { len, .. } => *len,
            LayerCache::Graph { k, .. } => k.as_ref().map(|k| k.dim(1).unwrap_or(0)).unwrap_or(0),
        }
    }

    pub(crate) fn view(&self) -> Result<Option<(Tensor, Tensor)>> {
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
    pub(crate) fn truncate(&mut self, keep: usize) -> Result<()> {
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
    pub(crate) fn reserve(&mut self, entries: usize) -> Result<()> {
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

    pub(crate) fn append(&mut self, k_new: &Tensor, v_new: &Tensor) -> Result<()> {
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
