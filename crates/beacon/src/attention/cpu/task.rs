//! One attention task: a kv head, a block of query rows and a part of the key columns.

use super::kernels::{
    exp_row, scores_direct, scores_direct_f16, weighted_sum_direct, weighted_sum_direct_f16,
    DIRECT_ROWS,
};
use super::merge::Partial;
use super::views::{Heads, KvHeads, KvRows};
use gemm::Parallelism;
use std::cell::RefCell;

thread_local! {
    /// Per-thread scratch (query rows, score tile), reused across tasks and calls so the tile is
    /// faulted in once.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}
/// Everything one (kv head, row block) task reads.
pub(super) struct Job<'a> {
    pub(super) q: &'a Heads<'a, f32>,
    pub(super) kv: &'a [(KvHeads<'a>, KvHeads<'a>, usize)],
    pub(super) mask_rows: Option<&'a [f32]>,
    pub(super) g: usize,
    pub(super) n: usize,
    pub(super) d: usize,
    pub(super) t: usize,
    pub(super) ctx: usize,
    pub(super) block: usize,
    pub(super) scale: f32,
}

impl Job<'_> {
    /// Kv head `h`, query rows `start..start + nb`, against column part `part` of `parts`: the
    /// unnormalised output rows `[g·nb, d]` with each row's max score and Σ e^(s − max).
    pub(super) fn run(&self, h: usize, start: usize, part: usize, parts: usize) -> Partial {
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
                let rows = self.q.rows(h * g + gi, start, nb, d);
                qb[gi * nb * d..(gi + 1) * nb * d].copy_from_slice(rows);
            }
            // Segment rows `first..first + take` at tile column `off`, over columns c0..c0 + cols.
            let pieces = self.pieces(c0, c0 + cols);
            // scores[:, off..off+take] = scale · qb · K_segᵀ
            for &(seg, first, take, off) in &pieces {
                let keys = &self.kv[seg].0;
                if direct {
                    match keys.rows(h, first, take, d) {
                        KvRows::F32(k) => {
                            scores_direct(qb, d, k, &mut scores[off..], cols, self.scale)
                        }
                        KvRows::F16(k) => {
                            scores_direct_f16(qb, d, k, &mut scores[off..], cols, self.scale)
                        }
                    }
                } else {
                    let KvRows::F32(k) = keys.rows(h, first, take, d) else {
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
                    match values.rows(h, first, take, d) {
                        KvRows::F32(v) => weighted_sum_direct(&scores[off..], cols, v, d, &mut out),
                        KvRows::F16(v) => {
                            weighted_sum_direct_f16(&scores[off..], cols, v, d, &mut out)
                        }
                    }
                } else {
                    let KvRows::F32(v) = values.rows(h, first, take, d) else {
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
