//! Inference attention on the CPU: one fused kernel instead of a chain of candle ops.
//!
//! The composed attention (`matmul → cat → scale → mask → softmax → narrow → matmul`) allocates
//! and sweeps a score tensor of `heads × block × context` floats five or six times; at 4K tokens that
//! tensor is tens of MiB, so every sweep goes to DRAM and every allocation page-faults. Here the work
//! is split into tasks of (kv head, block of query rows) sized so the score tile stays in a core's
//! L2 cache, and each tile is written once by GEMM (scale folded into it), normalised in place in
//! one pass per row (the causal limit is a row length, not an added mask), and read once by the
//! second GEMM. Context segments (sink, memory, window, chunk) are read where they lie: no `cat`.
//!
//! Only the f32, graph-free path comes here (queries in f32; cached K/V in f32 or f16: dot-product
//! tasks widen f16 in registers as they read it, GEMM calls widen each f16 segment to f32 once);
//! anything else (bf16, training) takes the composed or the fused differentiable attention
//! ([`super::composed`], [`super::fused`]).
//!
//! The kernel's parts: [`views`] borrows the tensors' storage as per-head slices, [`task`] runs
//! one (kv head, block of query rows, column part) — GEMM tiles for prefill-sized blocks, dot
//! products for decode — [`merge`] combines column parts by their softmax statistics, and
//! [`kernels`] holds the dot-product and exponential loops. This file plans the tasks and
//! scatters their rows.

mod kernels;
mod merge;
mod task;
mod views;

use super::Mask;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use kernels::DIRECT_ROWS;
use merge::{merge_parts, Partial};
use task::Job;
use views::{heads_of, kv_heads_of, Heads, KvHeads};

/// Floats in one task's score tile (`g·rows × columns`): 512 KiB, half of this machine's L2.
const SCORE_TILE: usize = 128 * 1024;

/// Fewest query rows per task: below this the GEMMs degenerate into matrix-vector products.
const MIN_BLOCK_ROWS: usize = 4;

/// Attention over K/V segments for inference. `q [heads, n, d]`, segments `[kv, len_i, d]` (the
/// last one is the chunk itself, so the chunk's row `r` sits at column `T − n + r`) → `[n, heads·d]`.
///
/// Returns `None` when the inputs are not CPU tensors with contiguous rows, q in f32 and K/V in f32
/// or f16 (the caller then uses the composed path). The mask semantics are [`Mask`]'s: causal over
/// the chunk, or additive.
pub(crate) fn attend(
    q: &Tensor,
    segments: &[(Tensor, Tensor)],
    mask: &Mask,
    kv_heads: usize,
) -> candle_core::Result<Option<Tensor>> {
    attend_tiled(q, segments, mask, kv_heads, SCORE_TILE, None)
}

/// [`attend`] with the score-tile size and the column parts of dot-product tasks as parameters
/// (tests use small tiles to get many blocks, and force parts; `None` = one per pool thread when
/// the context is long and there are fewer tasks than threads to keep busy).
fn attend_tiled(
    q: &Tensor,
    segments: &[(Tensor, Tensor)],
    mask: &Mask,
    kv_heads: usize,
    tile: usize,
    parts: Option<usize>,
) -> candle_core::Result<Option<Tensor>> {
    if q.dtype() != DType::F32 || !matches!(q.device(), Device::Cpu) {
        return Ok(None);
    }
    let (heads, n, d) = q.dims3()?;
    if kv_heads == 0 || heads % kv_heads != 0 || n == 0 {
        return Ok(None);
    }
    let g = heads / kv_heads;
    let q = q.contiguous()?;
    let segments: Vec<&(Tensor, Tensor)> = segments
        .iter()
        .filter(|(k, _)| k.dim(1).map_or(true, |l| l > 0))
        .collect();
    for (k, v) in &segments {
        if !matches!(k.dtype(), DType::F32 | DType::F16)
            || v.dtype() != k.dtype()
            || k.dims3()? != v.dims3()?
            || k.dim(0)? != kv_heads
            || k.dim(2)? != d
        {
            return Ok(None);
        }
    }
    let lens: Vec<usize> = segments
        .iter()
        .map(|(k, _)| k.dim(1))
        .collect::<candle_core::Result<_>>()?;
    let t: usize = lens.iter().sum();
    if t < n {
        candle_core::bail!("attention: {n} query rows but only {t} key columns");
    }
    let ctx = t - n;

    // Borrow every input's storage for the duration of the kernel.
    let q_store = q.storage_and_layout().0;
    let kv_stores: Vec<_> = segments
        .iter()
        .map(|(k, v)| (k.storage_and_layout().0, v.storage_and_layout().0))
        .collect();
    let mask_tensor = match mask {
        Mask::Causal => None,
        Mask::Explicit(m) => {
            if m.dims2()? != (n, t) {
                candle_core::bail!("attention: mask {:?}, expected [{n}, {t}]", m.shape());
            }
            Some(m.to_dtype(DType::F32)?.contiguous()?)
        }
    };
    let mask_store = mask_tensor.as_ref().map(|m| m.storage_and_layout().0);

    let Some(q_heads) = heads_of(&q_store, &q) else {
        return Ok(None);
    };
    let block = (tile / (g * t).max(1))
        .clamp(MIN_BLOCK_ROWS, n.max(MIN_BLOCK_ROWS))
        .min(n);
    let mut stored: Vec<(KvHeads, KvHeads, usize)> = Vec::with_capacity(segments.len());
    for (((k, v), (ks, vs)), &len) in segments.iter().zip(&kv_stores).zip(&lens) {
        match (kv_heads_of(ks, k), kv_heads_of(vs, v)) {
            (Some(kh), Some(vh)) => stored.push((kh, vh, len)),
            _ => return Ok(None),
        }
    }
    // GEMM tasks (more than DIRECT_ROWS query rows; the first block is the largest) read every
    // row of a segment, and each row block reads it again: f16 segments are widened to f32 once
    // per call for them. Dot-product tasks read f16 directly.
    let gemm_tasks = g * block > DIRECT_ROWS;
    let wide: Vec<Option<(Vec<f32>, Vec<f32>)>> = stored
        .iter()
        .map(|(k, v, len)| match gemm_tasks {
            true => k
                .widened(kv_heads, *len, d)
                .zip(v.widened(kv_heads, *len, d)),
            false => None,
        })
        .collect();
    let kv: Vec<(KvHeads, KvHeads, usize)> = stored
        .into_iter()
        .zip(&wide)
        .map(|(stored, wide)| match wide {
            Some((k, v)) => {
                let len = stored.2;
                let f32_heads = |data| {
                    KvHeads::F32(Heads {
                        data,
                        head_stride: len * d,
                    })
                };
                (f32_heads(k), f32_heads(v), len)
            }
            None => stored,
        })
        .collect();
    let mask_rows: Option<&[f32]> = match (&mask_store, &mask_tensor) {
        (Some(s), Some(m)) => match &**s {
            Storage::Cpu(CpuStorage::F32(v)) => {
                let o = m.layout().start_offset();
                Some(&v[o..o + n * t])
            }
            _ => return Ok(None),
        },
        _ => None,
    };

    // Decode has one task per kv head (3 for SmolLM2): on 2 threads one thread would read two
    // heads' K/V while the other waits. Long contexts split each task's columns into parts (one
    // per thread) that are merged by their softmax statistics afterwards.
    let row_blocks = n.div_ceil(block);
    let parts = match parts {
        _ if g * block > DIRECT_ROWS => 1,
        Some(p) => p.max(1),
        None if kv_heads * row_blocks < 2 * pool_threads() => {
            pool_threads().min(t / SPLIT_MIN_COLS).max(1)
        }
        None => 1,
    };
    let tasks: Vec<(usize, usize, usize)> = (0..kv_heads)
        .flat_map(|h| {
            (0..n)
                .step_by(block)
                .flat_map(move |s| (0..parts).map(move |p| (h, s, p)))
        })
        .collect();
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let job = Job {
        q: &q_heads,
        kv: &kv,
        mask_rows,
        g,
        n,
        d,
        t,
        ctx,
        block,
        scale,
    };
    // Tasks run on candle's barrier pool, the one its quantized matmuls use: in decode the two
    // alternate every few microseconds, and a second pool (rayon) would compete with the barrier
    // pool's spinning workers for the same cores.
    let slots: Vec<std::sync::OnceLock<Partial>> =
        tasks.iter().map(|_| std::sync::OnceLock::new()).collect();
    crate::threads::for_chunks(tasks.len(), |range| {
        for i in range {
            let (h, start, part) = tasks[i];
            let _ = slots[i].set(job.run(h, start, part, parts));
        }
    });
    let partials: Vec<Partial> = slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .ok_or_else(|| candle_core::Error::Msg("attention: a task did not run".into()))
        })
        .collect::<candle_core::Result<_>>()?;

    // Merge each (head, block)'s column parts, then scatter their rows `[g·nb, d]` into
    // `[n, heads·d]` (head `h·g + gi`, row `start + r`).
    let mut out = vec![0f32; n * heads * d];
    for (group, parts_of) in tasks.chunks(parts).zip(partials.chunks(parts)) {
        let (h, start, _) = group[0];
        let nb = block.min(n - start);
        let o = merge_parts(parts_of, d);
        for gi in 0..g {
            let head = h * g + gi;
            for r in 0..nb {
                let src = &o[(gi * nb + r) * d..(gi * nb + r + 1) * d];
                let dst = (start + r) * heads * d + head * d;
                out[dst..dst + d].copy_from_slice(src);
            }
        }
    }
    Ok(Some(Tensor::from_vec(out, (n, heads * d), &Device::Cpu)?))
}

/// Threads of candle's barrier pool (its own rule: `CANDLE_NUM_THREADS`, else rayon's count).
fn pool_threads() -> usize {
    std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(candle_core::utils::get_num_threads)
}

/// Fewest columns per part when a decode task's columns are split across threads.
const SPLIT_MIN_COLS: usize = 512;
#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::max_abs_diff as max_diff;

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        crate::testing::random_tensor(&mut seed.clone(), shape)
    }

    /// The kernel against the composed candle-op attention on segments that include a strided view
    /// (a narrowed cache), with more rows than one block, for both mask kinds.
    #[test]
    fn matches_composed_attention() {
        // 70 rows: GEMM tiles; 1 and 2 rows (decode, ≤ DIRECT_ROWS with g = 3): dot products.
        for n in [70, 2, 1] {
            check_against_composed(n);
        }
    }

    fn check_against_composed(n: usize) {
        let (heads, kvh, d) = (6, 2, 16);
        let q = (random((heads, n, d), 1) * 3.0).unwrap();
        let cache = random((kvh, 50, d), 2);
        let cache_v = random((kvh, 50, d), 3);
        let segments = vec![
            (random((kvh, 5, d), 4), random((kvh, 5, d), 5)),
            (
                cache.narrow(1, 0, 33).unwrap(),
                cache_v.narrow(1, 0, 33).unwrap(),
            ),
            (
                Tensor::zeros((kvh, 0, d), DType::F32, &Device::Cpu).unwrap(),
                Tensor::zeros((kvh, 0, d), DType::F32, &Device::Cpu).unwrap(),
            ),
            (random((kvh, n, d), 6), random((kvh, n, d), 7)),
        ];
        let t = 5 + 33 + n;
        let mut m = vec![0f32; n * t];
        for r in 0..n {
            for c in 0..t {
                if (c + 3 * r) % 7 == 0 && c != t - n + r {
                    m[r * t + c] = f32::NEG_INFINITY;
                }
            }
        }
        let explicit = Mask::Explicit(Tensor::from_vec(m, (n, t), &Device::Cpu).unwrap());
        for mask in [Mask::Causal, explicit] {
            let want =
                crate::attention::composed::attend_composed(&q, &segments, &mask, false, kvh)
                    .unwrap();
            // One block; blocks of 5 rows (14 blocks × 2 kv heads); blocks of 2 rows (direct path).
            // Dot-product tasks also with their columns split in parts (merged afterwards),
            // including more parts than some blocks have columns.
            for tile in [SCORE_TILE, 3 * t * 5, 3 * t * 2] {
                for parts in [None, Some(2), Some(3), Some(t + 5)] {
                    let got = attend_tiled(&q, &segments, &mask, kvh, tile, parts)
                        .unwrap()
                        .expect("f32 CPU inputs take the kernel");
                    assert_eq!(got.dims(), want.dims());
                    let diff = max_diff(&got, &want);
                    assert!(diff < 1e-5, "tile {tile}, parts {parts:?}: max |Δ| {diff}");
                }
            }
        }
    }

    /// Cached segments kept in f16 (the chunk stays f32), for the GEMM and the dot-product paths
    /// (d = 24: SIMD loops with a tail; d = 12: the portable loops): the same result as f32
    /// attention over the values the f16 cache holds.
    #[test]
    fn f16_cache_segments_match_their_widened_values() {
        let (heads, kvh) = (6, 2);
        for (n, d) in [(70, 24), (1, 24), (2, 12), (70, 12)] {
            let q = (random((heads, n, d), 11) * 3.0).unwrap();
            let half = |t: Tensor| t.to_dtype(DType::F16).unwrap();
            let long = 137;
            let cached = vec![
                (half(random((kvh, 3, d), 12)), half(random((kvh, 3, d), 13))),
                (
                    half(random((kvh, long, d), 14)),
                    half(random((kvh, long, d), 15)),
                ),
            ];
            let chunk = (random((kvh, n, d), 16), random((kvh, n, d), 17));
            let mut mixed = cached.clone();
            mixed.push(chunk.clone());
            let mut widened: Vec<(Tensor, Tensor)> = cached
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_dtype(DType::F32).unwrap(),
                        v.to_dtype(DType::F32).unwrap(),
                    )
                })
                .collect();
            widened.push(chunk);
            let want = crate::attention::composed::attend_composed(
                &q,
                &widened,
                &Mask::Causal,
                false,
                kvh,
            )
            .unwrap();
            for tile in [SCORE_TILE, 3 * (long + 3 + n) * 5] {
                for parts in [None, Some(4)] {
                    let got = attend_tiled(&q, &mixed, &Mask::Causal, kvh, tile, parts)
                        .unwrap()
                        .expect("f16 K/V take the kernel");
                    let diff = max_diff(&got, &want);
                    assert!(
                        diff < 1e-5,
                        "n {n}, tile {tile}, parts {parts:?}: max |Δ| {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn other_dtypes_fall_back() {
        let q = random((2, 3, 4), 1).to_dtype(DType::BF16).unwrap();
        let kv = random((1, 3, 4), 2).to_dtype(DType::BF16).unwrap();
        assert!(attend(&q, &[(kv.clone(), kv)], &Mask::Causal, 1)
            .unwrap()
            .is_none());
    }
}
