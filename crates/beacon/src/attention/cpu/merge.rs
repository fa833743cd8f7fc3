//! Softmax over column parts computed separately (decode splits a long context across threads).

/// One task's result: unnormalised output rows `[rows, d]` (Σ e^(s − max)·v over its columns),
/// and per row the max score and Σ e^(s − max) (0 when no column was visible).
pub(super) struct Partial {
    pub(super) out: Vec<f32>,
    pub(super) max: Vec<f32>,
    pub(super) sum: Vec<f32>,
}

/// Softmax-weighted rows over all columns from the parts over disjoint column ranges: each part is
/// rescaled to the common max, `out = Σ_p e^(m_p − m)·o_p / Σ_p e^(m_p − m)·s_p`. Rows that saw no
/// column are zeros.
pub(super) fn merge_parts(parts: &[Partial], d: usize) -> Vec<f32> {
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
