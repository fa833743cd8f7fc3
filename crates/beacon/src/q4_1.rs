//! Few-row products `x Wᵀ` with W kept in GGUF's Q4_1 format (the default model's).
//!
//! Decode multiplies one row by every weight matrix per token, so its speed is the speed at which the
//! weights stream from memory. candle's Q4_1 dot product is scalar, which is why Q4_1 matrices used to be
//! re-quantized to Q8_0 for decode — 1.06 bytes per weight instead of 0.625, 1.5× the bytes per token.
//! This kernel reads the 4-bit blocks as they are.
//!
//! Each row of `x` is quantized per 32-block to 8 bits (scale `d_x`, plus `s_x = d_x·Σq_x`), the scheme
//! llama.cpp uses for the same product. A Q4_1 block holds `w = d_w·q_w + m_w` (q_w in 0..16), so
//! `Σ w·x ≈ d_w·d_x·Σ q_w·q_x + m_w·s_x`: one integer dot product and two multiply-adds per block.

use crate::error::{BeaconError, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

/// Values per block (both the weight and the activation blocks).
const QK: usize = 32;
/// Bytes per Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles (low nibbles are values 0..16,
/// high nibbles values 16..32).
const BLOCK_BYTES: usize = 20;
/// Up to this many rows of `x` go through this kernel; more rows are a GEMM's job.
pub const MAX_ROWS: usize = 8;

/// One 32-value block of an activation row, quantized to 8 bits.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct ActBlock {
    qs: [i8; QK],
    /// Scale: value ≈ d · q.
    d: f32,
    /// d · Σ q, the block's sum (multiplies the weight block's minimum).
    s: f32,
}

impl ActBlock {
    const ZERO: ActBlock = ActBlock {
        qs: [0; QK],
        d: 0.0,
        s: 0.0,
    };
}

fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = (v * inv).round() as i8;
            sum += *q as i32;
        }
        block.d = d;
        block.s = d * sum as f32;
    }
}

/// A Q4_1 `[out, in]` matrix ready for few-row products.
pub struct Q4_1Matrix<'a> {
    data: &'a [u8],
    out: usize,
    blocks_per_row: usize,
}

impl<'a> Q4_1Matrix<'a> {
    /// Borrows the raw blocks of `w` (`[out, in]`, Q4_1, on the CPU).
    pub fn new(w: &'a QTensor, bytes: &'a [u8]) -> Result<Self> {
        let (out, inner) = w.shape().dims2()?;
        if w.dtype() != GgmlDType::Q4_1 || inner % QK != 0 {
            return Err(BeaconError::invalid(format!(
                "q4_1 kernel: expected a Q4_1 matrix with a width divisible by {QK}, found {:?} {:?}",
                w.dtype(),
                w.shape()
            )));
        }
        let blocks_per_row = inner / QK;
        if bytes.len() != out * blocks_per_row * BLOCK_BYTES {
            return Err(BeaconError::invalid(format!(
                "q4_1 kernel: {} bytes of blocks for a [{out}, {inner}] matrix, expected {}",
                bytes.len(),
                out * blocks_per_row * BLOCK_BYTES
            )));
        }
        Ok(Self {
            data: bytes,
            out,
            blocks_per_row,
        })
    }

    fn row(&self, o: usize) -> &[u8] {
        let n = self.blocks_per_row * BLOCK_BYTES;
        &self.data[o * n..(o + 1) * n]
    }

    /// `y[r][o] = Σ_i x[r][i] · W[o][i]` for `rows ≤ MAX_ROWS` rows of `x` (row-major `[rows, in]`).
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let inner = self.blocks_per_row * QK;
        assert!(rows <= MAX_ROWS && x.len() == rows * inner && y.len() == rows * self.out);
        let mut acts = vec![ActBlock::ZERO; rows * self.blocks_per_row];
        for r in 0..rows {
            quantize_row(
                &x[r * inner..(r + 1) * inner],
                &mut acts[r * self.blocks_per_row..(r + 1) * self.blocks_per_row],
            );
        }
        let acts = &acts;
        let dot = select_dot();
        let y_addr = y.as_mut_ptr() as usize;
        // Items are groups of output rows; every (r, o) of y is written by exactly one item.
        const GROUP: usize = 8;
        let groups = self.out.div_ceil(GROUP);
        crate::threads::for_chunks(groups, |range| {
            for g in range {
                for o in g * GROUP..((g + 1) * GROUP).min(self.out) {
                    let w = self.row(o);
                    for r in 0..rows {
                        let a = &acts[r * self.blocks_per_row..(r + 1) * self.blocks_per_row];
                        // SAFETY: (r, o) < (rows, out) and is written by this item only.
                        unsafe { *(y_addr as *mut f32).add(r * self.out + o) = dot(w, a) };
                    }
                }
            }
        });
    }
}

/// `x Wᵀ` for a Q4_1 weight: x `[rows, in]` on the CPU → `[rows, out]`, in groups of
/// [`MAX_ROWS`] rows (a model loaded without dense copies also runs its prefill through here).
pub fn forward(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let bytes = w.data()?;
    let m = Q4_1Matrix::new(w, &bytes)?;
    let (rows, inner) = x.dims2()?;
    if inner != m.blocks_per_row * QK {
        return Err(BeaconError::invalid(format!(
            "q4_1 kernel: input width {inner}, weight width {}",
            m.blocks_per_row * QK
        )));
    }
    let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut y = vec![0f32; rows * m.out];
    for (xs, ys) in xv
        .chunks(MAX_ROWS * inner)
        .zip(y.chunks_mut(MAX_ROWS * m.out))
    {
        m.matmul(xs, xs.len() / inner, ys);
    }
    Ok(Tensor::from_vec(y, (rows, m.out), &Device::Cpu)?.to_dtype(x.dtype())?)
}

type DotFn = fn(&[u8], &[ActBlock]) -> f32;

fn select_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return dot_avx2_entry;
        }
    }
    dot_portable
}

fn block_scales(b: &[u8]) -> (f32, f32) {
    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
    (d, m)
}

fn dot_portable(w: &[u8], a: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (b, act) in w.chunks_exact(BLOCK_BYTES).zip(a) {
        let (d, m) = block_scales(b);
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            let q = b[4 + j];
            isum += (q & 0x0F) as i32 * act.qs[j] as i32;
            isum += (q >> 4) as i32 * act.qs[j + QK / 2] as i32;
        }
        sum += d * act.d * isum as f32 + m * act.s;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(w: &[u8], a: &[ActBlock]) -> f32 {
    // SAFETY: selected only after the features were detected at run time.
    unsafe { dot_avx2(w, a) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[u8], a: &[ActBlock]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(w.len(), a.len() * BLOCK_BYTES);
    let low_mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut min_sum = _mm_setzero_ps();
    for (i, act) in a.iter().enumerate() {
        let b = w.as_ptr().add(i * BLOCK_BYTES);
        // d and m side by side → lanes 0 and 1.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()));
        let nibbles = _mm_loadu_si128(b.add(4) as *const __m128i);
        let lo = _mm_and_si128(nibbles, low_mask);
        let hi = _mm_and_si128(_mm_srli_epi16(nibbles, 4), low_mask);
        let q_w = _mm256_set_m128i(hi, lo);
        let q_x = _mm256_load_si256(act.qs.as_ptr() as *const __m256i);
        // u8 × i8 pairs → i16 (|15·127·2| fits), then pairs → i32.
        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q_w, q_x), ones);
        let scale = _mm256_set1_ps(_mm_cvtss_f32(dm) * act.d);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(prod), acc);
        // m · s in lane 1 (lane 0 collects d · 0).
        min_sum = _mm_fmadd_ps(dm, _mm_set_ps(0.0, 0.0, act.s, 0.0), min_sum);
    }
    let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    let total = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
    _mm_cvtss_f32(total) + _mm_cvtss_f32(_mm_shuffle_ps(min_sum, min_sum, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_tensor, rel_l2_err};

    fn q4_1(out: usize, inner: usize, seed: u64) -> QTensor {
        let w = random_tensor(&mut seed.clone(), (out, inner));
        QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()
    }

    /// The exact product of the dequantized weights with the 8-bit-rounded activations: what the
    /// kernel computes, up to f32 summation order.
    fn expected(w: &QTensor, x: &[f32], rows: usize) -> Vec<f32> {
        let dense: Vec<f32> = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (out, inner) = w.shape().dims2().unwrap();
        let mut acts = vec![ActBlock::ZERO; rows * inner / QK];
        for r in 0..rows {
            quantize_row(
                &x[r * inner..(r + 1) * inner],
                &mut acts[r * inner / QK..(r + 1) * inner / QK],
            );
        }
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let mut s = 0f64;
                for i in 0..inner {
                    let a = &acts[(r * inner + i) / QK];
                    s += dense[o * inner + i] as f64 * (a.d * a.qs[i % QK] as f32) as f64;
                }
                y[r * out + o] = s as f32;
            }
        }
        y
    }

    #[test]
    fn matches_dequantized_product_for_each_dot_implementation() {
        for (out, inner, rows) in [(13, 64, 1), (40, 576, 3), (7, 1536, 8)] {
            let w = q4_1(out, inner, 11 + out as u64);
            let x: Vec<f32> = random_tensor(&mut (5 + rows as u64), (rows, inner))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = expected(&w, &x, rows);
            let bytes = w.data().unwrap();
            let m = Q4_1Matrix::new(&w, &bytes).unwrap();
            let mut y = vec![0f32; rows * out];
            m.matmul(&x, rows, &mut y);
            let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
            for (g, e) in y.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-5 * scale,
                    "{g} vs {e} ({out}x{inner}, {rows} rows)"
                );
            }
            // The portable and SIMD dots agree row by row.
            let mut acts = vec![ActBlock::ZERO; inner / QK];
            quantize_row(&x[..inner], &mut acts);
            for o in 0..out {
                let p = dot_portable(m.row(o), &acts);
                let s = select_dot()(m.row(o), &acts);
                assert!(
                    (p - s).abs() <= 1e-5 * scale,
                    "row {o}: portable {p} vs selected {s}"
                );
            }
        }
    }

    #[test]
    fn close_to_the_f32_product() {
        // 8-bit activations add a small relative error; a sign or block-order bug would not be small.
        let (out, inner) = (64, 576);
        let w = q4_1(out, inner, 3);
        let x = random_tensor(&mut 4, (1, inner));
        let dense = w.dequantize(&Device::Cpu).unwrap();
        let want = x.matmul(&dense.t().unwrap()).unwrap();
        let err = rel_l2_err(&want, &forward(&w, &x).unwrap());
        assert!(err < 0.01, "relative error {err}");
        // More rows than one group: each row as if it were alone.
        let xs = random_tensor(&mut 9, (19, inner));
        let all: Vec<f32> = forward(&w, &xs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for r in [0, 8, 18] {
            let one: Vec<f32> = forward(&w, &xs.narrow(0, r, 1).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(&all[r * out..(r + 1) * out], &one[..], "row {r}");
        }
    }

    #[test]
    fn rejects_other_formats() {
        let w = QTensor::quantize(&random_tensor(&mut 1, (4, 64)), GgmlDType::Q8_0).unwrap();
        let bytes = w.data().unwrap();
        assert!(Q4_1Matrix::new(&w, &bytes).is_err());
    }
}
