//! The memory plan: before a single weight is read, what the model will need (weights as stored, any
//! copies made for prefill, K/V for the requested context, scratch) against what the machine has —
//! and the largest way of holding the weights that fits.
//!
//! Prefill multiplies chunks of hundreds of rows; for those a dense copy of a quantized matrix turns the
//! product into an f32 GEMM, several times faster than quantized dot products, at 4 bytes per weight.
//! For the 135M default model that costs 0.5 GB and is the right trade; for a 7B model it is 28 GiB and
//! the machine dies. So the copy is a choice ([`PrefillWeights`]) made here, by size, and a request
//! that cannot fit fails before loading with the numbers and the flag that would help.

use crate::error::{BeaconError, Result};
use serde::Serialize;

const GIB: f64 = (1u64 << 30) as f64;

/// How the matrices are held for chunks of many rows (prefill).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefillWeights {
    /// A dense f32 copy of every quantized matrix (Hugging Face: the weights widened to f32).
    Dense,
    /// A dense bf16 copy (Hugging Face: the weights kept in bf16), widened per product.
    Bf16,
    /// No copy: each matrix is dequantized into a temporary f32 buffer when a chunk needs it.
    Scratch,
    /// No copy, no temporary: the quantized dot products for every row (slowest prefill).
    Quantized,
}

impl PrefillWeights {
    pub fn parse(s: &str) -> Result<Option<Self>> {
        Ok(match s.trim() {
            "auto" => None,
            "dense" => Some(Self::Dense),
            "bf16" => Some(Self::Bf16),
            "scratch" => Some(Self::Scratch),
            "quantized" => Some(Self::Quantized),
            other => {
                return Err(BeaconError::config(
                    "--prefill-weights",
                    "prefill_weights",
                    "auto, dense, bf16, scratch or quantized",
                    other,
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Dense => "dense",
            Self::Bf16 => "bf16",
            Self::Scratch => "scratch",
            Self::Quantized => "quantized",
        }
    }
}

/// One weight of the checkpoint, from its header (nothing is read from the data).
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub name: String,
    pub dims: Vec<usize>,
    /// Bytes as stored.
    pub bytes: u64,
    /// A matrix multiplied by activations (block projections, LM head): what a prefill copy is made of.
    pub is_matrix: bool,
}

impl StoredTensor {
    pub fn elements(&self) -> u64 {
        self.dims.iter().map(|&d| d as u64).product()
    }
}

/// What the checkpoint is, as far as memory goes.
#[derive(Debug, Clone)]
pub enum Checkpoint {
    /// GGUF: quantized block matrices kept as stored; copies per [`PrefillWeights`].
    Gguf { tensors: Vec<StoredTensor> },
    /// Hugging Face safetensors: matrices held in f32 (`Dense`) or bf16 (the rest).
    Hf { tensors: Vec<StoredTensor> },
}

/// The K/V the session will hold at its peak.
#[derive(Debug, Clone, Serialize)]
pub struct KvNeeds {
    /// Peak cached entries (per layer).
    pub entries: usize,
    /// Bytes per element of the cache.
    pub dtype_bytes: usize,
    /// What it is for, for the plan line ("beacon ×8 over ~8.2K tokens").
    pub label: String,
}

/// Shapes the plan needs from the model config.
#[derive(Debug, Clone, Copy)]
pub struct Shapes {
    pub layers: usize,
    pub hidden: usize,
    pub kv_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub heads: usize,
}

/// Memory the process may still use, and what bounded it.
#[derive(Debug, Clone, Serialize)]
pub struct Available {
    pub bytes: u64,
    pub source: String,
}

impl Available {
    /// The tightest of: `--memory-limit`, MemAvailable, the cgroup's limit less its usage, and the
    /// address-space limit (`ulimit -v`) less what the process has mapped.
    pub fn probe(limit: Option<u64>) -> Self {
        let mut best = Available {
            bytes: u64::MAX,
            source: "unknown".into(),
        };
        let mut consider = |bytes: Option<u64>, source: &str| {
            if let Some(b) = bytes {
                if b < best.bytes {
                    best = Available {
                        bytes: b,
                        source: source.into(),
                    };
                }
            }
        };
        consider(limit, "--memory-limit");
        consider(
            meminfo_kib("MemAvailable").map(|k| k * 1024),
            "MemAvailable",
        );
        let cg = |f: &str| -> Option<u64> {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        if let (Some(max), Some(cur)) = (cg("memory.max"), cg("memory.current")) {
            consider(Some(max.saturating_sub(cur)), "cgroup memory.max");
        }
        consider(address_space_left(), "address-space limit (ulimit -v)");
        best
    }
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn address_space_left() -> Option<u64> {
    // `ulimit -v` as /proc/self/limits shows it (no libc call needed), less VmSize.
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft = line.split_whitespace().nth(3)?;
    let soft: u64 = soft.parse().ok()?; // "unlimited" does not parse: no limit
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let vm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(soft.saturating_sub(vm_kib * 1024))
}

/// The plan: where each byte goes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    pub prefill: PrefillWeights,
    /// Weights as they will be held (as stored for GGUF; f32 or bf16 for Hugging Face).
    pub weights: u64,
    /// Prefill copies of quantized matrices (GGUF `dense` / `bf16`).
    pub copies: u64,
    /// The one temporary f32 matrix of `scratch` prefill (and of bf16 weights' prefill).
    pub temporary: u64,
    pub kv: u64,
    pub kv_label: String,
    /// Activations of one prefill chunk, attention and logits scratch, runtime.
    pub scratch: u64,
    pub available: Available,
    /// What the other choices would have needed, for the message.
    pub alternatives: Vec<(PrefillWeights, u64)>,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights + self.copies + self.temporary + self.kv + self.scratch
    }

    /// The one line printed at load.
    pub fn line(&self) -> String {
        let g = |b: u64| format!("{:.2}", b as f64 / GIB);
        let mut parts = vec![format!("weights {} GiB", g(self.weights))];
        if self.copies > 0 {
            parts.push(format!(
                "{} prefill copies {} GiB",
                self.prefill.name(),
                g(self.copies)
            ));
        }
        if self.temporary > 0 {
            parts.push(format!("per-matrix temporary {} GiB", g(self.temporary)));
        }
        parts.push(format!("K/V {} GiB ({})", g(self.kv), self.kv_label));
        parts.push(format!("scratch ~{} GiB", g(self.scratch)));
        format!(
            "memory plan: prefill-weights {} · {} = {} GiB of {} GiB available ({})",
            self.prefill.name(),
            parts.join(" + "),
            g(self.total()),
            g(self.available.bytes),
            self.available.source
        )
    }
}

/// Fraction of the available memory a plan may fill (page cache, allocator slack, the tokenizer).
pub const HEADROOM: f64 = 0.92;

/// Choose how to hold the weights: `requested`, or the first of dense → bf16 → scratch → quantized
/// (GGUF) / dense → bf16 (Hugging Face) that fits. Errors when the request, or every choice, exceeds
/// what is available.
pub fn plan(
    checkpoint: &Checkpoint,
    shapes: Shapes,
    kv: &KvNeeds,
    available: Available,
    requested: Option<PrefillWeights>,
    chunk_rows: usize,
) -> Result<MemoryPlan> {
    let order: &[PrefillWeights] = match checkpoint {
        Checkpoint::Gguf { .. } => &[
            PrefillWeights::Dense,
            PrefillWeights::Bf16,
            PrefillWeights::Scratch,
            PrefillWeights::Quantized,
        ],
        Checkpoint::Hf { .. } => &[PrefillWeights::Dense, PrefillWeights::Bf16],
    };
    if let (
        Checkpoint::Hf { .. },
        Some(p @ (PrefillWeights::Scratch | PrefillWeights::Quantized)),
    ) = (checkpoint, requested)
    {
        return Err(BeaconError::invalid(format!(
            "--prefill-weights {}: applies to quantized (GGUF) weights; a Hugging Face checkpoint \
             takes dense (f32) or bf16",
            p.name()
        )));
    }
    let kv_bytes =
        kv.entries as u64 * shapes.layers as u64 * shapes.kv_dim as u64 * 2 * kv.dtype_bytes as u64;
    // One chunk's activations (residual, q/k/v, MLP gate/up) in f32, its attention scores over the
    // keys it sees, the logits of the scored rows, and ~256 MiB of runtime and tokenizer.
    let rows = chunk_rows as u64;
    let keys = (kv.entries as u64).min(rows * 4).max(rows);
    let scratch =
        rows * (4 * shapes.hidden as u64 + 2 * shapes.kv_dim as u64 + 3 * shapes.ffn as u64) * 4
            + rows * keys * shapes.heads as u64 * 4
            + shapes.vocab as u64 * 4 * 8
            + (256 << 20);
    let build = |p: PrefillWeights| -> MemoryPlan {
        let (weights, copies, temporary) = holdings(checkpoint, p);
        MemoryPlan {
            prefill: p,
            weights,
            copies,
            temporary,
            kv: kv_bytes,
            kv_label: kv.label.clone(),
            scratch,
            available: available.clone(),
            alternatives: Vec::new(),
        }
    };
    let budget = (available.bytes as f64 * HEADROOM) as u64;
    let alternatives: Vec<(PrefillWeights, u64)> =
        order.iter().map(|&p| (p, build(p).total())).collect();
    let need = |p: PrefillWeights| build(p).total();
    // Auto: dense copies while they leave half the memory free (the default model: 0.4 GB for a
    // faster prefill); otherwise no copies at all — bf16 copies save little time over a per-matrix
    // temporary and cost half of the dense copies' memory, so they are only made on request.
    let lean: &[PrefillWeights] = match checkpoint {
        Checkpoint::Gguf { .. } => &[PrefillWeights::Scratch, PrefillWeights::Quantized],
        Checkpoint::Hf { .. } => &[PrefillWeights::Bf16],
    };
    let auto = if need(PrefillWeights::Dense) <= budget / 2 {
        Some(PrefillWeights::Dense)
    } else {
        lean.iter().copied().find(|&p| need(p) <= budget)
    };
    let chosen = match (requested, auto) {
        (Some(p), _) if need(p) <= budget => p,
        (Some(p), auto) => return Err(too_big(&build(p), auto.map(|a| (a, need(a))), true)),
        (None, Some(a)) => a,
        (None, None) => {
            let last = build(*lean.last().expect("non-empty"));
            return Err(too_big(&last, None, false));
        }
    };
    let mut p = build(chosen);
    p.alternatives = alternatives;
    Ok(p)
}

/// (weights held, prefill copies, per-matrix temporary) for a choice.
fn holdings(checkpoint: &Checkpoint, p: PrefillWeights) -> (u64, u64, u64) {
    match checkpoint {
        Checkpoint::Gguf { tensors } => {
            let stored: u64 = tensors.iter().map(|t| t.bytes).sum();
            // Block matrices only: the tied LM head / embedding stays quantized.
            let block = |t: &&StoredTensor| t.is_matrix && t.name.starts_with("blk.");
            let elems: u64 = tensors.iter().filter(block).map(|t| t.elements()).sum();
            let largest = tensors
                .iter()
                .filter(block)
                .map(|t| t.elements())
                .max()
                .unwrap_or(0);
            match p {
                PrefillWeights::Dense => (stored, elems * 4, 0),
                PrefillWeights::Bf16 => (stored, elems * 2, largest * 4),
                PrefillWeights::Scratch => (stored, 0, largest * 4),
                PrefillWeights::Quantized => (stored, 0, 0),
            }
        }
        Checkpoint::Hf { tensors } => {
            let elems: u64 = tensors.iter().map(|t| t.elements()).sum();
            let largest = tensors
                .iter()
                .filter(|t| t.is_matrix)
                .map(|t| t.elements())
                .max()
                .unwrap_or(0);
            match p {
                PrefillWeights::Dense => (elems * 4, 0, 0),
                _ => (elems * 2, 0, largest * 4),
            }
        }
    }
}

fn too_big(
    plan: &MemoryPlan,
    fitting: Option<(PrefillWeights, u64)>,
    requested: bool,
) -> BeaconError {
    let g = |b: u64| format!("{:.2} GiB", b as f64 / GIB);
    let hint = match (requested, fitting) {
        (true, Some((p, need))) => format!(
            "--prefill-weights {} (what auto picks), which needs {}",
            p.name(),
            g(need)
        ),
        _ => "a shorter context (-n/--max-file-tokens), a higher --ratio, --kv-dtype f16, a \
              smaller quantization of the model, or more memory"
            .into(),
    };
    let what = if requested {
        format!("--prefill-weights {}", plan.prefill.name())
    } else {
        "the smallest plan".into()
    };
    let line = plan.line();
    let parts = line
        .split(" · ")
        .nth(1)
        .and_then(|s| s.split(" = ").next())
        .unwrap_or("");
    BeaconError::Memory(format!(
        "{what} needs {} ({parts}) but {} are available ({}, {:.0} % usable); try {hint}",
        g(plan.total()),
        g(plan.available.bytes),
        plan.available.source,
        HEADROOM * 100.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dims: &[usize], bytes_per_elem: f64, is_matrix: bool) -> StoredTensor {
        let e: u64 = dims.iter().map(|&d| d as u64).product();
        StoredTensor {
            name: name.into(),
            dims: dims.to_vec(),
            bytes: (e as f64 * bytes_per_elem) as u64,
            is_matrix,
        }
    }

    /// A 7B-shaped Q4_K GGUF: 28 layers of hidden 3584, FFN 18944, 4 KV heads of 128.
    fn seven_b_gguf() -> (Checkpoint, Shapes) {
        let (h, kv, ff, v) = (3584, 512, 18944, 152064);
        let mut ts = vec![t("token_embd.weight", &[v, h], 0.5625, false)];
        for i in 0..28 {
            for (n, o, inp) in [
                ("attn_q", h, h),
                ("attn_k", kv, h),
                ("attn_v", kv, h),
                ("attn_output", h, h),
                ("ffn_gate", ff, h),
                ("ffn_up", ff, h),
                ("ffn_down", h, ff),
            ] {
                ts.push(t(&format!("blk.{i}.{n}.weight"), &[o, inp], 0.5625, true));
            }
        }
        ts.push(t("output.weight", &[v, h], 0.8203, true));
        let shapes = Shapes {
            layers: 28,
            hidden: h,
            kv_dim: kv,
            ffn: ff,
            vocab: v,
            heads: 28,
        };
        (Checkpoint::Gguf { tensors: ts }, shapes)
    }

    fn kv(entries: usize) -> KvNeeds {
        KvNeeds {
            entries,
            dtype_bytes: 2,
            label: "test".into(),
        }
    }

    fn avail(gib: u64) -> Available {
        Available {
            bytes: gib << 30,
            source: "test".into(),
        }
    }

    #[test]
    fn a_7b_gguf_skips_dense_copies_that_do_not_fit() {
        let (c, s) = seven_b_gguf();
        let p = plan(&c, s, &kv(1_500), avail(22), None, 512).unwrap();
        // 7.1G elements in the blocks: f32 copies ~26 GiB, bf16 ~13 GiB on top of ~4.5 GiB stored.
        assert_eq!(p.prefill, PrefillWeights::Scratch, "{}", p.line());
        assert!(p.total() < 8 << 30, "{}", p.line());
        // Dense copies only while they leave half the memory free.
        let p = plan(&c, s, &kv(1_500), avail(48), None, 512).unwrap();
        assert_eq!(p.prefill, PrefillWeights::Scratch);
        let p = plan(&c, s, &kv(1_500), avail(128), None, 512).unwrap();
        assert_eq!(p.prefill, PrefillWeights::Dense);
        // bf16 copies when asked for and they fit.
        let p = plan(
            &c,
            s,
            &kv(1_500),
            avail(22),
            Some(PrefillWeights::Bf16),
            512,
        )
        .unwrap();
        assert!(p.copies > 12 << 30 && p.total() < 18 << 30, "{}", p.line());
    }

    #[test]
    fn an_impossible_request_names_the_numbers_and_a_choice_that_fits() {
        let (c, s) = seven_b_gguf();
        let e = plan(
            &c,
            s,
            &kv(1_500),
            avail(22),
            Some(PrefillWeights::Dense),
            512,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--prefill-weights dense needs"), "{e}");
        assert!(
            e.contains("try --prefill-weights scratch (what auto picks), which needs"),
            "{e}"
        );
        assert!(e.contains("22.00 GiB are available (test"), "{e}");
        // Nothing fits in 2 GiB: the message says what would help instead.
        let e = plan(&c, s, &kv(1_500), avail(2), None, 512)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the smallest plan needs") && e.contains("more memory"),
            "{e}"
        );
    }

    #[test]
    fn hf_bf16_when_f32_does_not_fit_and_kv_counted() {
        // The same tensors as the GGUF, stored in bf16.
        let (g, s) = seven_b_gguf();
        let Checkpoint::Gguf { tensors } = g else {
            unreachable!()
        };
        let ts = tensors
            .into_iter()
            .map(|x| t(&x.name, &x.dims, 2.0, x.is_matrix))
            .collect();
        let c = Checkpoint::Hf { tensors: ts };
        let p = plan(&c, s, &kv(8192), avail(22), None, 512).unwrap();
        assert_eq!(p.prefill, PrefillWeights::Bf16, "{}", p.line());
        // K/V: 8192 entries × 28 layers × 512 × (K and V) × 2 bytes = 448 MiB.
        assert_eq!(p.kv, 8192 * 28 * 512 * 2 * 2);
        assert!(plan(
            &c,
            s,
            &kv(8192),
            avail(22),
            Some(PrefillWeights::Dense),
            512
        )
        .is_err());
        assert!(plan(
            &c,
            s,
            &kv(8192),
            avail(64),
            Some(PrefillWeights::Quantized),
            512
        )
        .is_err());
    }

    #[test]
    fn probe_reports_a_bound() {
        let a = Available::probe(Some(3 << 30));
        assert!(a.bytes <= 3 << 30);
        assert!(Available::probe(None).bytes > 0);
    }

    #[test]
    fn parse_names() {
        assert_eq!(PrefillWeights::parse("auto").unwrap(), None);
        assert_eq!(
            PrefillWeights::parse("scratch").unwrap(),
            Some(PrefillWeights::Scratch)
        );
        assert!(PrefillWeights::parse("fast").is_err());
    }
}
