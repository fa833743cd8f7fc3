//! Every way a weight can be held multiplies like the matrix it stands for: each GGUF type a 7B-class
//! file uses (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) through decode's quantized kernels, through each prefill
//! choice (dense copy, bf16 copy, per-matrix scratch, quantized), and bf16 Hugging Face weights.

use beacon::memory_plan::PrefillWeights;
use beacon::model::{Weight, DENSE_MIN_ROWS};
use beacon::testing::{random_tensor, rel_l2_err};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};

/// (type, tolerance of the quantized product against the dequantized f32 product): the vec-dot
/// kernels quantize the activations to 8 bits per block, ~0.5 % of the norm; a wrong block layout
/// or scale would be off by tens of percent.
const TYPES: [(GgmlDType, f32); 6] = [
    (GgmlDType::Q4_0, 0.02),
    (GgmlDType::Q4_1, 0.02),
    (GgmlDType::Q8_0, 0.02),
    (GgmlDType::Q4K, 0.02),
    (GgmlDType::Q5K, 0.02),
    (GgmlDType::Q6K, 0.02),
];

#[test]
fn each_gguf_type_multiplies_like_its_dequantized_matrix() {
    // Widths that are multiples of the K-quants' 256-value super-blocks.
    let (out, inner) = (72, 512);
    for (k, (dtype, tol)) in TYPES.iter().enumerate() {
        let w = random_tensor(&mut (40 + k as u64), (out, inner));
        let q = QTensor::quantize(&w, *dtype).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        for rows in [1, 3, DENSE_MIN_ROWS, 37] {
            let x = random_tensor(&mut (7 + rows as u64), (rows, inner));
            let want = x.matmul(&dense.t().unwrap()).unwrap();
            for prefill in [
                PrefillWeights::Dense,
                PrefillWeights::Bf16,
                PrefillWeights::Scratch,
                PrefillWeights::Quantized,
            ] {
                let weight =
                    Weight::quantized(QTensor::quantize(&w, *dtype).unwrap(), prefill).unwrap();
                let got = weight.forward(&x).unwrap();
                assert_eq!(got.dims(), &[rows, out]);
                let e = rel_l2_err(&want, &got);
                // Chunks of many rows through a dense f32 copy or the scratch matrix are the exact
                // product; a bf16 copy rounds the weights (8-bit mantissa).
                let bound = match (rows >= DENSE_MIN_ROWS, prefill) {
                    (true, PrefillWeights::Dense | PrefillWeights::Scratch) => 1e-5,
                    (true, PrefillWeights::Bf16) => 0.01,
                    _ => *tol,
                };
                assert!(
                    e <= bound,
                    "{dtype:?} {prefill:?} {rows} rows: relative error {e} > {bound}"
                );
            }
        }
    }
}

#[test]
fn bf16_weights_with_f32_activations_track_f32() {
    let (out, inner) = (96, 3584 / 4);
    let w = random_tensor(&mut 3, (out, inner));
    let w16 = Weight::Dense(w.to_dtype(DType::BF16).unwrap());
    let exact_of_rounded = w
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    for rows in [1, 5, DENSE_MIN_ROWS + 1, 40] {
        let x = random_tensor(&mut (9 + rows as u64), (rows, inner));
        let got = w16.forward(&x).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let want = x.matmul(&exact_of_rounded.t().unwrap()).unwrap();
        let e = rel_l2_err(&want, &got);
        // Few rows: the AVX-512 BF16 kernel rounds the activations to bf16 too (~0.3 %); many rows:
        // the widened matrix gives the exact product of the stored weights.
        let bound = if rows <= 8 { 0.01 } else { 1e-5 };
        assert!(e <= bound, "{rows} rows: relative error {e}");
    }
}
