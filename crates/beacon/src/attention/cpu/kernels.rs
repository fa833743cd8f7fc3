//! The loops under the tasks: dot-product scores and weighted sums for a handful of query rows
//! (decode), f16 widening, and the row exponential of the softmax. Each has a portable version and
//! an AVX2/F16C/AVX-512 build of the same code, chosen at run time.

/// Most query rows (`g × block`) a task computes with dot products instead of GEMM.
pub(super) const DIRECT_ROWS: usize = 8;

/// `scores[i·cols + j] = scale · q_i · k_j` for the `qb.len() / d` query rows and the rows `j` of `k`.
pub(super) fn scores_direct(
    qb: &[f32],
    d: usize,
    k: &[f32],
    scores: &mut [f32],
    cols: usize,
    scale: f32,
) {
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
pub(super) fn weighted_sum_direct(p: &[f32], cols: usize, v: &[f32], d: usize, out: &mut [f32]) {
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
pub(super) fn scores_direct_f16(
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
pub(super) fn weighted_sum_direct_f16(
    p: &[f32],
    cols: usize,
    v: &[half::f16],
    d: usize,
    out: &mut [f32],
) {
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
pub(super) fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
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
pub(super) fn exp_row(x: &mut [f32]) -> (f32, f32) {
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
