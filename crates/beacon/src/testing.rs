//! Helpers shared by this workspace's tests (unit and integration): deterministic random tensors and
//! tensor distances. Not part of the engine.

use candle_core::{Device, Shape, Tensor};

/// Deterministic pseudo-random f32 values in [-1, 1) (an LCG stepped from `seed`, which advances).
pub fn random_tensor<S: Into<Shape>>(seed: &mut u64, shape: S) -> Tensor {
    let shape = shape.into();
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches the values")
}

/// Largest absolute value of a tensor (any shape, as f32).
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(0))
        .and_then(|a| a.to_dtype(candle_core::DType::F32))
        .and_then(|a| a.to_scalar::<f32>())
        .expect("a non-empty tensor")
}

/// `max |a − b|`.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).expect("same shapes"))
}

/// `max |a − b| / max |b|`.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b).max(1e-12)
}

/// `‖want − got‖₂ / ‖want‖₂`: the relative error of a whole product, for kernels that round their inputs.
pub fn rel_l2_err(want: &Tensor, got: &Tensor) -> f32 {
    let w: Vec<f32> = want.flatten_all().expect("tensor").to_vec1().expect("f32");
    let g: Vec<f32> = got.flatten_all().expect("tensor").to_vec1().expect("f32");
    assert_eq!(w.len(), g.len(), "same shapes");
    let norm = w.iter().map(|v| v * v).sum::<f32>().sqrt();
    let err = w
        .iter()
        .zip(&g)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    err / norm
}

/// Token ids stored as an i64 tensor of any shape (the fixtures' format), flattened.
pub fn token_ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<i64>())
        .expect("an i64 tensor")
        .into_iter()
        .map(|x| x as u32)
        .collect()
}
