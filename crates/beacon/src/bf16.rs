//! Few-row products `x Wᵀ` with W kept in bf16, as Hugging Face checkpoints store it.
//!
//! A 7B-class checkpoint is ~15 GB in bf16 and ~30 GB once widened to f32, so the weights stay as
//! stored and the activations stay f32. Decode multiplies one row by every matrix per token: its speed
//! is the speed the weights stream from memory, and widening a whole matrix per token would triple the
//! bytes touched. Here each output is a dot product read straight from the bf16 row, accumulated in
//! f32: with AVX-512 BF16 (`vdpbf16ps`, 32 multiply-adds per instruction) the activation row is rounded
//! to bf16 once per call; elsewhere a portable loop widens the weights (a 16-bit shift) and keeps the
//! activations exact. Chunks of many rows (prefill) are a GEMM's job: [`crate::model::Weight`] widens
//! the matrix into a temporary f32 copy for those, one matrix at a time.

use crate::error::{BeaconError, Result};
use candle_core::{DType, Device, Tensor};
use half::bf16;

/// Up to this many rows of `x` go through this kernel; more rows are a GEMM's job.
pub const MAX_ROWS: usize = 8;

/// Which dot product runs on this CPU (printed by `beacon inspect`).
pub fn kernel_name() -> &'static str {
    match select_dot() {
        Dot::Bf16Pairs(_) => "avx512-bf16 (vdpbf16ps)",
        Dot::Widening(_) => "portable (bf16 widened to f32)",
    }
}

/// `x Wᵀ` for a bf16 weight `[out, in]` and f32 `x` `[rows, in]` → f32 `[rows, out]`.
pub fn forward(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (out, inner) = w.dims2()?;
    let (rows, x_inner) = x.dims2()?;
    if w.dtype() != DType::BF16 || x_inner != inner {
        return Err(BeaconError::invalid(format!(
            "bf16 kernel: expected a bf16 [out, {x_inner}] weight, found {:?} {:?}",
            w.dtype(),
            w.dims()
        )));
    }
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(BeaconError::invalid(
            "bf16 kernel: weight is not on the CPU",
        ));
    };
    let all: &[bf16] = cpu.as_slice::<bf16>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| BeaconError::invalid("bf16 kernel: weight is not contiguous"))?;
    let wv = &all[start..end];
    let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut y = vec![0f32; rows * out];
    for (xs, ys) in xv
        .chunks(MAX_ROWS * inner)
        .zip(y.chunks_mut(MAX_ROWS * out))
    {
        matmul(wv, out, inner, xs, ys);
    }
    Ok(Tensor::from_vec(y, (rows, out), &Device::Cpu)?)
}

#[derive(Clone, Copy)]
enum Dot {
    /// Both operands bf16, products accumulated in f32 (`vdpbf16ps`).
    Bf16Pairs(fn(&[bf16], &[bf16]) -> f32),
    /// Weights widened to f32, activations exact.
    Widening(fn(&[bf16], &[f32]) -> f32),
}

fn select_dot() -> Dot {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16") {
            return Dot::Bf16Pairs(dot_avx512_entry);
        }
    }
    Dot::Widening(dot_widening)
}

/// `y[r][o] = Σ_i x[r][i] · W[o][i]` for `rows ≤ MAX_ROWS` rows of `x`.
fn matmul(w: &[bf16], out: usize, inner: usize, x: &[f32], y: &mut [f32]) {
    matmul_with(select_dot(), w, out, inner, x, y)
}

fn matmul_with(dot: Dot, w: &[bf16], out: usize, inner: usize, x: &[f32], y: &mut [f32]) {
    let rows = x.len() / inner;
    assert!(rows <= MAX_ROWS && x.len() == rows * inner && y.len() == rows * out);
    assert_eq!(w.len(), out * inner);
    let x_bf16: Vec<bf16> = match dot {
        Dot::Bf16Pairs(_) => x.iter().map(|&v| bf16::from_f32(v)).collect(),
        Dot::Widening(_) => Vec::new(),
    };
    let y_addr = y.as_mut_ptr() as usize;
    // Items are groups of output rows; every (r, o) of y is written by exactly one item. Small groups
    // let an idle thread take most of the work when the other core is busy.
    const GROUP: usize = 8;
    let groups = out.div_ceil(GROUP);
    crate::threads::for_chunks(groups, |range| {
        for g in range {
            for o in g * GROUP..((g + 1) * GROUP).min(out) {
                let wr = &w[o * inner..(o + 1) * inner];
                for r in 0..rows {
                    let v = match dot {
                        Dot::Bf16Pairs(f) => f(wr, &x_bf16[r * inner..(r + 1) * inner]),
                        Dot::Widening(f) => f(wr, &x[r * inner..(r + 1) * inner]),
                    };
                    // SAFETY: (r, o) < (rows, out) and is written by this item only.
                    unsafe { *(y_addr as *mut f32).add(r * out + o) = v };
                }
            }
        }
    });
}

fn dot_widening(w: &[bf16], x: &[f32]) -> f32 {
    // Eight independent sums so the loop vectorises (f32 addition is not associative).
    let mut acc = [0f32; 8];
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let (wt, xt) = (wc.remainder(), xc.remainder());
    for (ws, xs) in wc.zip(xc) {
        for k in 0..8 {
            acc[k] += ws[k].to_f32() * xs[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in wt.iter().zip(xt) {
        s += a.to_f32() * b;
    }
    s
}

#[cfg(target_arch = "x86_64")]
fn dot_avx512_entry(w: &[bf16], x: &[bf16]) -> f32 {
    // SAFETY: selected only after avx512f and avx512bf16 were detected at run time.
    unsafe { dot_avx512(w, x) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_avx512(w: &[bf16], x: &[bf16]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(w.len(), x.len());
    // The loads give 32 bf16 values as integer lanes; `vdpbf16ps` takes the same bits as bf16 pairs.
    let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
    let n = w.len();
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    // 64 values per step in two independent chains (the instruction's latency exceeds its throughput).
    while i + 64 <= n {
        let a0 = _mm512_loadu_epi16(w.as_ptr().add(i) as *const i16);
        let b0 = _mm512_loadu_epi16(x.as_ptr().add(i) as *const i16);
        let a1 = _mm512_loadu_epi16(w.as_ptr().add(i + 32) as *const i16);
        let b1 = _mm512_loadu_epi16(x.as_ptr().add(i + 32) as *const i16);
        acc0 = _mm512_dpbf16_ps(acc0, bh(a0), bh(b0));
        acc1 = _mm512_dpbf16_ps(acc1, bh(a1), bh(b1));
        i += 64;
    }
    while i + 32 <= n {
        let a = _mm512_loadu_epi16(w.as_ptr().add(i) as *const i16);
        let b = _mm512_loadu_epi16(x.as_ptr().add(i) as *const i16);
        acc0 = _mm512_dpbf16_ps(acc0, bh(a), bh(b));
        i += 32;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    for k in i..n {
        s += w[k].to_f32() * x[k].to_f32();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_tensor, rel_l2_err};

    fn bf16_weight(out: usize, inner: usize, seed: u64) -> Tensor {
        random_tensor(&mut seed.clone(), (out, inner))
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// f64 reference of `x Wᵀ` with the given activations.
    fn reference(w: &Tensor, x: &[f32], rows: usize) -> Vec<f32> {
        let (out, inner) = w.dims2().unwrap();
        let wv: Vec<f32> = w
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let s: f64 = (0..inner)
                    .map(|i| wv[o * inner + i] as f64 * x[r * inner + i] as f64)
                    .sum();
                y[r * out + o] = s as f32;
            }
        }
        y
    }

    fn dots() -> Vec<Dot> {
        let mut d = vec![Dot::Widening(dot_widening)];
        if let Dot::Bf16Pairs(f) = select_dot() {
            d.push(Dot::Bf16Pairs(f));
        }
        d
    }

    #[test]
    fn each_dot_matches_the_exact_product_of_what_it_reads() {
        // Widths that exercise the 64-, 32- and scalar tails.
        for (out, inner, rows) in [(13, 64, 1), (40, 576, 3), (9, 3584 + 37, 8), (5, 20, 2)] {
            let w = bf16_weight(out, inner, 11 + out as u64);
            let x: Vec<f32> = random_tensor(&mut (5 + rows as u64), (rows, inner))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let wv: Vec<bf16> = w.flatten_all().unwrap().to_vec1().unwrap();
            for dot in dots() {
                // The bf16-pair dot sees activations rounded to bf16; the widening one sees them exact.
                let seen: Vec<f32> = match dot {
                    Dot::Bf16Pairs(_) => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                    Dot::Widening(_) => x.clone(),
                };
                let want = reference(&w, &seen, rows);
                let mut y = vec![0f32; rows * out];
                matmul_with(dot, &wv, out, inner, &x, &mut y);
                let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
                for (g, e) in y.iter().zip(&want) {
                    assert!((g - e).abs() <= 2e-5 * scale, "{g} vs {e} ({out}x{inner})");
                }
            }
        }
    }

    #[test]
    fn close_to_the_f32_product_of_the_same_weights() {
        let (out, inner) = (64, 896);
        let w = bf16_weight(out, inner, 3);
        let x = random_tensor(&mut 4, (19, inner));
        let want = x
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        let err = rel_l2_err(&want, &forward(&w, &x).unwrap());
        // Rounding the activations to bf16 (8 bits of mantissa) costs ~0.3 % of the norm; a wrong
        // pairing of values or a lost tail would not be small.
        assert!(err < 0.01, "relative error {err}");
    }

    #[test]
    fn rejects_other_dtypes_and_widths() {
        let w = random_tensor(&mut 1, (4, 64));
        let x = random_tensor(&mut 2, (1, 64));
        assert!(forward(&w, &x).is_err());
        let w = w.to_dtype(DType::BF16).unwrap();
        assert!(forward(&w, &random_tensor(&mut 2, (1, 32))).is_err());
    }
}
