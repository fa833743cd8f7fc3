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
//! anything else (bf16, training) keeps the composed or the fused differentiable attention in
//! [`crate::model`] / [`crate::attention`].

use crate::model::Mask;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use gemm::Parallelism;
use std::cell::RefCell;

/// Floats in one task's score tile (`g·rows × columns`): 512 KiB, half of this machine's L2.
const SCORE_TILE: usize = 128 * 1024;

/// Fewest query rows per task: below this the GEMMs degenerate into matrix-vector products.
const MIN_BLOCK_ROWS: usize = 4;

/// A tensor `[heads, rows, d]` whose rows are contiguous (`stride = [hs, d, 1]`), borrowed from its
/// CPU storage: head `h` is `data[h·hs .. h·hs + rows·d]`.
struct Heads<'a, T> {
    data: &'a [T],
    head_stride: usize,
}

impl<T> Heads<'_, T> {
    fn head(&self, h: usize) -> *const T {
        self.data[h * self.head_stride..].as_ptr()
    }
}

/// Cached keys or values: f32, or f16 (a cache kept at half the bytes).
enum KvHeads<'a> {
    F32(Heads<'a, f32>),
    F16(Heads<'a, half::f16>),
}

/// Consecutive rows of one head of cached K or V, as stored.
enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl KvHeads<'_> {
    /// Rows `first..first + n` (`d` values each) of head `h`, as stored.
    ///
    /// # Safety
    /// Head `h` must hold at least `first + n` rows of `d` values.
    unsafe fn rows(&self, h: usize, first: usize, n: usize, d: usize) -> KvRows<'_> {
        match self {
            KvHeads::F32(x) => {
                KvRows::F32(std::slice::from_raw_parts(x.head(h).add(first * d), n * d))
            }
            KvHeads::F16(x) => {
                KvRows::F16(std::slice::from_raw_parts(x.head(h).add(first * d), n * d))
            }
        }
    }

    /// All `heads × len` rows widened to f32 (`[heads, len, d]`, contiguous) when stored in f16.
    fn widened(&self, heads: usize, len: usize, d: usize) -> Option<Vec<f32>> {
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
fn heads_of<'a>(storage: &'a Storage, t: &Tensor) -> Option<Heads<'a, f32>> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => layout_heads(v, t),
        _ => None,
    }
}

/// `t` as cached K or V heads (f32 or f16 CPU tensor with contiguous rows).
fn kv_heads_of<'a>(storage: &'a Storage, t: &Tensor) -> Option<KvHeads<'a>> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => layout_heads(v, t).map(KvHeads::F32),
        Storage::Cpu(CpuStorage::F16(v)) => layout_heads(v, t).map(KvHeads::F16),
        _ => None,
    }
}

thread_local! {
    /// Per-thread scratch (query rows, score tile), reused across tasks and calls so the tile is
    /// faulted in once.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

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

/// Everything one (kv head, row block) task reads.
struct Job<'a> {
    q: &'a Heads<'a, f32>,
    kv: &'a [(KvHeads<'a>, KvHeads<'a>, usize)],
    mask_rows: Option<&'a [f32]>,
    g: usize,
    n: usize,
    d: usize,
    t: usize,
    ctx: usize,
    block: usize,
    scale: f32,
}

impl Job<'_> {
    /// Kv head `h`, query rows `start..start + nb`, against column part `part` of `parts`: the
    /// unnormalised output rows `[g·nb, d]` with each row's max score and Σ e^(s − max).
    fn run(&self, h: usize, start: usize, part: usize, parts: usize) -> Partial {
        let (g, d) = (self.g, self.d);
        let nb = self.block.min(self.n - start);
        let rows = g * nb;
        // Causal rows never see past the block's last row: the tile narrows to those columns.
        let all_cols = match self.mask_rows {
            None => self.ctx + start + nb,
            Some(_) => self.t,
        };
        let c0 = part * all_cols / parts;
        let cols = (part + 1) * all_cols / parts - c0;
        let mut out = vec![0f32; rows * d];
        let mut maxes = Vec::with_capacity(rows);
        let mut sums = Vec::with_capacity(rows);
        // A handful of rows (decode): GEMM would pack all of K and V for a matrix-vector product;
        // reading each key/value row once and using it for every query row is cheaper.
        let direct = rows <= DIRECT_ROWS;
        SCRATCH.with(|cell| {
            let (qb, scores) = &mut *cell.borrow_mut();
            qb.resize(rows * d, 0.0);
            scores.resize(rows * cols, 0.0);
            for gi in 0..g {
                let head = self.q.head(h * g + gi);
                for r in 0..nb {
                    // SAFETY: row `start + r < n` of head `h·g + gi` lies within the q slice.
                    let src = unsafe { std::slice::from_raw_parts(head.add((start + r) * d), d) };
                    qb[(gi * nb + r) * d..(gi * nb + r + 1) * d].copy_from_slice(src);
                }
            }
            // Segment rows `first..first + take` at tile column `off`, over columns c0..c0 + cols.
            let pieces = self.pieces(c0, c0 + cols);
            // scores[:, off..off+take] = scale · qb · K_segᵀ
            for &(seg, first, take, off) in &pieces {
                let keys = &self.kv[seg].0;
                if direct {
                    // SAFETY: kv head `h` holds at least `first + take` rows of `d` values.
                    match unsafe { keys.rows(h, first, take, d) } {
                        KvRows::F32(k) => {
                            scores_direct(qb, d, k, &mut scores[off..], cols, self.scale)
                        }
                        KvRows::F16(k) => {
                            scores_direct_f16(qb, d, k, &mut scores[off..], cols, self.scale)
                        }
                    }
                } else {
                    // SAFETY: as above.
                    let KvRows::F32(k) = (unsafe { keys.rows(h, first, take, d) }) else {
                        unreachable!("f16 segments are widened before GEMM tasks run")
                    };
                    // SAFETY: dst is `rows × cols` (row stride cols) from column `off`; lhs
                    // `rows × d`; rhs is Kᵀ read through K's `[take, d]` rows.
                    unsafe {
                        gemm_f32(
                            (rows, take, d),
                            (scores.as_mut_ptr().add(off), cols, false),
                            (qb.as_ptr(), 1, d),
                            (k.as_ptr(), d, 1),
                            self.scale,
                        )
                    };
                }
            }
            // Rows hold e^(s − max) after this; the 1/Σ is applied to the output rows when the
            // parts are merged (d values per row rather than `cols`).
            for gi in 0..g {
                for r in 0..nb {
                    let row = &mut scores[(gi * nb + r) * cols..(gi * nb + r + 1) * cols];
                    let visible = match self.mask_rows {
                        None => (self.ctx + start + r + 1).saturating_sub(c0).min(cols),
                        Some(m) => {
                            let m = &m[(start + r) * self.t + c0..(start + r) * self.t + c0 + cols];
                            row.iter_mut().zip(m).for_each(|(s, m)| *s += m);
                            cols
                        }
                    };
                    let (max, sum) = exp_row(&mut row[..visible]);
                    row[visible..].fill(0.0);
                    maxes.push(max);
                    sums.push(sum);
                }
            }
            // out = P · V, segment by segment
            for (i, &(seg, first, take, off)) in pieces.iter().enumerate() {
                let values = &self.kv[seg].1;
                if direct {
                    // SAFETY: as for K.
                    match unsafe { values.rows(h, first, take, d) } {
                        KvRows::F32(v) => weighted_sum_direct(&scores[off..], cols, v, d, &mut out),
                        KvRows::F16(v) => {
                            weighted_sum_direct_f16(&scores[off..], cols, v, d, &mut out)
                        }
                    }
                } else {
                    // SAFETY: as for K.
                    let KvRows::F32(v) = (unsafe { values.rows(h, first, take, d) }) else {
                        unreachable!("f16 segments are widened before GEMM tasks run")
                    };
                    // SAFETY: lhs is the probability tile from column `off` (`rows × take`, row
                    // stride cols); rhs V `[take, d]`; dst `[rows, d]`, accumulated after the first.
                    unsafe {
                        gemm_f32(
                            (rows, d, take),
                            (out.as_mut_ptr(), d, i > 0),
                            (scores.as_ptr().add(off), 1, cols),
                            (v.as_ptr(), 1, d),
                            1.0,
                        )
                    };
                }
            }
        });
        Partial {
            out,
            max: maxes,
            sum: sums,
        }
    }
}

/// One task's result: unnormalised output rows `[rows, d]` (Σ e^(s − max)·v over its columns),
/// and per row the max score and Σ e^(s − max) (0 when no column was visible).
struct Partial {
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// Softmax-weighted rows over all columns from the parts over disjoint column ranges: each part is
/// rescaled to the common max, `out = Σ_p e^(m_p − m)·o_p / Σ_p e^(m_p − m)·s_p`. Rows that saw no
/// column are zeros.
fn merge_parts(parts: &[Partial], d: usize) -> Vec<f32> {
    if let [only] = parts {
        // One part: the common max is its own (the plain 1/Σ).
        let mut out = only.out.clone();
        for (o, &s) in out.chunks_exact_mut(d).zip(&only.sum) {
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            o.iter_mut().for_each(|v| *v *= inv);
        }
        return out;
    }
    let rows = parts[0].sum.len();
    let mut out = vec![0f32; rows * d];
    for r in 0..rows {
        let m = parts
            .iter()
            .filter(|p| p.sum[r] > 0.0)
            .fold(f32::NEG_INFINITY, |a, p| a.max(p.max[r]));
        if m == f32::NEG_INFINITY {
            continue;
        }
        let weight = |p: &Partial| {
            if p.sum[r] > 0.0 {
                (p.max[r] - m).exp()
            } else {
                0.0
            }
        };
        let total: f32 = parts.iter().map(|p| weight(p) * p.sum[r]).sum();
        let row = &mut out[r * d..(r + 1) * d];
        for p in parts {
            let w = weight(p) / total;
            if w > 0.0 {
                let src = &p.out[r * d..(r + 1) * d];
                row.iter_mut().zip(src).for_each(|(o, x)| *o += w * x);
            }
        }
    }
    out
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

impl Job<'_> {
    /// (segment, first row, rows taken, tile column) covering the columns `c0..c1` of the
    /// concatenated segments; tile columns count from `c0`.
    fn pieces(&self, c0: usize, c1: usize) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::new();
        let mut seg_start = 0;
        for (seg, (_, _, len)) in self.kv.iter().enumerate() {
            let (lo, hi) = (c0.max(seg_start), c1.min(seg_start + len));
            if lo < hi {
                out.push((seg, lo - seg_start, hi - lo, lo - c0));
            }
            seg_start += len;
            if seg_start >= c1 {
                break;
            }
        }
        out
    }
}

/// `dst (m × n, row stride dst_rs, column stride 1) [+]= beta · lhs · rhs` with gemm on this thread;
/// `lhs` is `m × k` and `rhs` `k × n`, each given as (pointer, column stride, row stride).
///
/// # Safety
/// Every pointer must address its whole matrix under the given strides.
unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    (lhs, lhs_cs, lhs_rs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Most query rows (`g × block`) a task computes with dot products instead of GEMM.
const DIRECT_ROWS: usize = 8;

/// `scores[i·cols + j] = scale · q_i · k_j` for the `qb.len() / d` query rows and the rows `j` of `k`.
fn scores_direct(qb: &[f32], d: usize, k: &[f32], scores: &mut [f32], cols: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the features were detected.
            unsafe { scores_direct_avx2(qb, d, k, scores, cols, scale) };
            return;
        }
    }
    scores_direct_portable(qb, d, k, scores, cols, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_direct_avx2(
    qb: &[f32],
    d: usize,
    k: &[f32],
    scores: &mut [f32],
    cols: usize,
    scale: f32,
) {
    scores_direct_portable(qb, d, k, scores, cols, scale)
}

#[inline(always)]
fn scores_direct_portable(
    qb: &[f32],
    d: usize,
    k: &[f32],
    scores: &mut [f32],
    cols: usize,
    scale: f32,
) {
    for (j, key) in k.chunks_exact(d).enumerate() {
        for (i, query) in qb.chunks_exact(d).enumerate() {
            scores[i * cols + j] = scale * dot(query, key);
        }
    }
}

/// `out_i += Σ_j p[i·cols + j] · v_j` for the `out.len() / d` rows and the rows `j` of `v`.
fn weighted_sum_direct(p: &[f32], cols: usize, v: &[f32], d: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the features were detected.
            unsafe { weighted_sum_direct_avx2(p, cols, v, d, out) };
            return;
        }
    }
    weighted_sum_direct_portable(p, cols, v, d, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_direct_avx2(p: &[f32], cols: usize, v: &[f32], d: usize, out: &mut [f32]) {
    weighted_sum_direct_portable(p, cols, v, d, out)
}

#[inline(always)]
fn weighted_sum_direct_portable(p: &[f32], cols: usize, v: &[f32], d: usize, out: &mut [f32]) {
    for (j, value) in v.chunks_exact(d).enumerate() {
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            let w = p[i * cols + j];
            if w != 0.0 {
                o.iter_mut().zip(value).for_each(|(o, v)| *o += w * v);
            }
        }
    }
}

/// [`scores_direct`] with keys stored in f16 (widened in registers as they are read).
fn scores_direct_f16(
    qb: &[f32],
    d: usize,
    k: &[half::f16],
    scores: &mut [f32],
    cols: usize,
    scale: f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if d.is_multiple_of(8) && has_avx2_fma_f16c() {
            // SAFETY: the features were detected; d is a multiple of the 8-lane loads.
            unsafe { scores_direct_f16_avx2(qb, d, k, scores, cols, scale) };
            return;
        }
    }
    for (j, key) in k.chunks_exact(d).enumerate() {
        for (i, query) in qb.chunks_exact(d).enumerate() {
            let s: f32 = query.iter().zip(key).map(|(q, k)| q * k.to_f32()).sum();
            scores[i * cols + j] = scale * s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_direct_f16_avx2(
    qb: &[f32],
    d: usize,
    k: &[half::f16],
    scores: &mut [f32],
    cols: usize,
    scale: f32,
) {
    use std::arch::x86_64::*;
    let rows = qb.len() / d;
    for j in 0..k.len() / d {
        let key = k.as_ptr().add(j * d) as *const __m128i;
        for i in 0..rows {
            let q = qb.as_ptr().add(i * d);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c + 16 <= d {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(key.add(c / 8)));
                let k1 = _mm256_cvtph_ps(_mm_loadu_si128(key.add(c / 8 + 1)));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), k0, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c + 8)), k1, a1);
                c += 16;
            }
            if c < d {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(key.add(c / 8)));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), k0, a0);
            }
            *scores.get_unchecked_mut(i * cols + j) = scale * hsum256(_mm256_add_ps(a0, a1));
        }
    }
}

/// [`weighted_sum_direct`] with values stored in f16.
fn weighted_sum_direct_f16(p: &[f32], cols: usize, v: &[half::f16], d: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if d.is_multiple_of(8) && has_avx2_fma_f16c() {
            // SAFETY: the features were detected; d is a multiple of the 8-lane loads.
            unsafe { weighted_sum_direct_f16_avx2(p, cols, v, d, out) };
            return;
        }
    }
    for (j, value) in v.chunks_exact(d).enumerate() {
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            let w = p[i * cols + j];
            if w != 0.0 {
                o.iter_mut()
                    .zip(value)
                    .for_each(|(o, v)| *o += w * v.to_f32());
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_direct_f16_avx2(
    p: &[f32],
    cols: usize,
    v: &[half::f16],
    d: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rows = out.len() / d;
    for j in 0..v.len() / d {
        let value = v.as_ptr().add(j * d) as *const __m128i;
        for i in 0..rows {
            let w = *p.get_unchecked(i * cols + j);
            if w == 0.0 {
                continue;
            }
            let w = _mm256_set1_ps(w);
            let o = out.as_mut_ptr().add(i * d);
            for c in (0..d).step_by(8) {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(value.add(c / 8)));
                _mm256_storeu_ps(o.add(c), _mm256_fmadd_ps(w, x, _mm256_loadu_ps(o.add(c))));
            }
        }
    }
}

/// f16 → f32 for a slice (GEMM calls widen each f16 segment once). Our own F16C loop: half's
/// slice conversion goes through a call and a copy per 8 values, which cost ~4 % of a 32K-token
/// beacon prefill when it widened per task.
fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma_f16c() {
            // SAFETY: the features were detected.
            unsafe { widen_f16_f16c(src, dst) };
            return;
        }
    }
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_f16_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i) as *const __m128i));
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), x);
        i += 8;
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum256(x: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let quad = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma_f16c() -> bool {
    has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
}

/// Dot product in `LANES` independent partial sums (vectorisable without reassociation).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `x ← e^(x − max x)` in place; returns (max, sum) (sum 0 for a row with no finite entry, which
/// becomes zeros: it attends to nothing). Softmax = this row / the sum.
fn exp_row(x: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected.
            return unsafe { exp_row_avx512(x) };
        }
        if has_avx2_fma() {
            // SAFETY: the features were detected.
            return unsafe { exp_row_avx2(x) };
        }
    }
    exp_row_portable(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_row_avx512(x: &mut [f32]) -> (f32, f32) {
    exp_row_portable(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_row_avx2(x: &mut [f32]) -> (f32, f32) {
    exp_row_portable(x)
}

/// Lanes for the max/sum reductions: independent accumulators let the compiler vectorise without
/// reassociating floating-point sums (one 512-bit or two 256-bit registers).
const LANES: usize = 16;

#[inline(always)]
fn exp_row_portable(x: &mut [f32]) -> (f32, f32) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for l in lanes {
        max = if l > max { l } else { max };
    }
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return (max, 0.0);
    }
    let mut sums = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_nonpositive(c[i] - max);
            sums[i] += c[i];
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_nonpositive(*v - max);
        sum += *v;
    }
    (max, sum + sums.iter().sum::<f32>())
}

/// `e^x` for `x ≤ 0` (and −∞ → 0), branch-free so it vectorises: `x = k·ln2 + r`, `|r| ≤ ln2/2`,
/// `e^r` by its degree-7 Taylor polynomial (relative error < 2e-8 there), `2^k` built in the exponent
/// bits. Below −87 (where `2^k` would be subnormal) the result is 0; exact softmax weights there are
/// below 1e-37 of the row's largest.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = if x < -87.0 { -87.0 } else { x };
    let k = (xc * LOG2E).round();
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let two_k = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_k
    }
}

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
            let want = crate::model::attend_composed(&q, &segments, &mask, false, kvh).unwrap();
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
            let want =
                crate::model::attend_composed(&q, &widened, &Mask::Causal, false, kvh).unwrap();
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

    #[test]
    fn exp_matches_std_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    fn softmax_in_place(x: &mut [f32]) {
        let (_, sum) = exp_row(x);
        if sum > 0.0 {
            x.iter_mut().for_each(|v| *v /= sum);
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_handle_masked_rows() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let mut want = x.clone();
        let max = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = want.iter().map(|v| (v - max).exp()).sum();
        want.iter_mut().for_each(|v| *v = (*v - max).exp() / sum);
        softmax_in_place(&mut x);
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let mut hidden = vec![f32::NEG_INFINITY; 9];
        softmax_in_place(&mut hidden);
        assert!(hidden.iter().all(|&v| v == 0.0));
    }
}
