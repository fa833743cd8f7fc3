//! Products `x Wᵀ` read straight from a GGUF matrix's blocks as stored (Q4_0, Q8_0, the K-quants, …),
//! through candle's per-block dot products (`k_quants::matmul`).
//!
//! candle's `QMatMul` repacks Q4_K (and Q8_0, and Q6_K for several rows) into an interleaved layout
//! on first use and keeps that copy *beside* the original blocks: a 7B Q4_K_M file then occupies
//! twice its size (measured: 8.3 GiB after loading 4.4 GiB of weights and reading one token, the
//! first token taking 11 s to build the copies). Reading the stored blocks keeps the weights at their
//! file size, which is what the memory plan promises.

use crate::error::{BeaconError, Result};
use candle_core::quantized::k_quants::{
    self, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

/// Whether [`forward`] handles this type. `BEACON_CANDLE_QMATMUL=1` sends every type to candle's
/// `QMatMul` instead (its repacked kernels, for side-by-side measurements).
pub fn supports(dtype: GgmlDType) -> bool {
    static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *CANDLE.get_or_init(|| std::env::var("BEACON_CANDLE_QMATMUL").is_ok_and(|v| v == "1")) {
        return false;
    }
    matches!(
        dtype,
        GgmlDType::Q4_0
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// The stored blocks of `w` as a slice of its block type.
fn blocks<'a, T: GgmlType>(w: &QTensor, bytes: &'a [u8]) -> Result<&'a [T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return Err(BeaconError::invalid(format!(
            "{:?} matrix {:?}: {} bytes are not whole aligned blocks of {size}",
            w.dtype(),
            w.shape(),
            bytes.len()
        )));
    }
    // SAFETY: candle stores a CPU QTensor as a Vec of its block type; the bytes are that Vec's
    // (borrowed), and size and alignment were checked above.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

/// x `[rows, in]` (f32) times the `[out, in]` quantized `w` → `[rows, out]`.
pub fn forward(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let (n, k) = w.shape().dims2()?;
    let (m, xk) = x.dims2()?;
    if xk != k {
        return Err(BeaconError::invalid(format!(
            "quantized product: input width {xk}, weight {:?}",
            w.shape()
        )));
    }
    let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let bytes = w.data()?;
    let mut dst = vec![0f32; m * n];
    macro_rules! run {
        ($t:ty) => {
            k_quants::matmul::<$t>((m, k, n), &xv, blocks::<$t>(w, &bytes)?, &mut dst)?
        };
    }
    match w.dtype() {
        GgmlDType::Q4_0 => run!(BlockQ4_0),
        GgmlDType::Q5_0 => run!(BlockQ5_0),
        GgmlDType::Q5_1 => run!(BlockQ5_1),
        GgmlDType::Q8_0 => run!(BlockQ8_0),
        GgmlDType::Q2K => run!(BlockQ2K),
        GgmlDType::Q3K => run!(BlockQ3K),
        GgmlDType::Q4K => run!(BlockQ4K),
        GgmlDType::Q5K => run!(BlockQ5K),
        GgmlDType::Q6K => run!(BlockQ6K),
        other => {
            return Err(BeaconError::invalid(format!(
                "quantized product: {other:?} is not read as stored"
            )))
        }
    }
    Ok(Tensor::from_vec(dst, (m, n), &Device::Cpu)?)
}
