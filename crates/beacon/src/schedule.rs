//! Window arithmetic and ratio choice: the pure parts of progressive compression (SPEC §2.3–2.5, §2.10).

use crate::config::{BeaconConfig, RatioMix};
use serde::{Deserialize, Serialize};

/// Slots of one step in interleave mode: `n` raw tokens, `remainder` raw tokens of this window already
/// fed since the last beacon, ratio `ratio` (> 0). Returns the beacon flags (true = beacon) and the new
/// remainder. One beacon follows every `ratio`-th raw token of the window (SPEC §2.4).
pub fn interleave_layout(n: usize, remainder: usize, ratio: usize) -> (Vec<bool>, usize) {
    assert!(ratio > 0 && remainder < ratio);
    let k = (n + remainder) / ratio;
    let total = n + k;
    let slots = (0..total)
        .map(|i| i % (ratio + 1) == ratio - remainder)
        .collect();
    (slots, (n + remainder) % ratio)
}

/// Slots of one step in append mode: `n` raw tokens then `beacons` beacon tokens.
pub fn append_layout(n: usize, beacons: usize) -> Vec<bool> {
    let mut v = vec![false; n];
    v.extend(std::iter::repeat_n(true, beacons));
    v
}

/// `adapt-N` (SPEC §2.10): the ratio whose position budget `(P − W)·α + W` is the smallest value that
/// still covers `need` tokens, or the largest ratio if none does. `P` = max positions × rope factor.
pub fn adapt_ratio(
    candidates: &[usize],
    need: usize,
    max_positions: usize,
    window: usize,
) -> usize {
    let budget = |r: usize| {
        if r == 0 {
            max_positions
        } else {
            max_positions.saturating_sub(window) * r + window
        }
    };
    candidates
        .iter()
        .copied()
        .filter(|&r| budget(r) >= need)
        .min_by_key(|&r| budget(r))
        .unwrap_or_else(|| {
            candidates
                .iter()
                .copied()
                .max_by_key(|&r| budget(r))
                .unwrap_or(0)
        })
}

/// A small, serialisable PRNG (splitmix64) so the ratio draws of a saved context or training run resume exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks α for each new window, with the state the reference keeps between windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatioChooser {
    pub mix: RatioMix,
    pub candidates: Vec<usize>,
    pub window: usize,
    /// `max_position_embeddings × rope factor`, for adapt-N.
    pub max_positions: usize,
    pub rng: SplitMix64,
    /// Cached choice of `adapt-N` / `instance-random` (until reset).
    pub cached: Option<usize>,
    /// Next index for `sequence`.
    pub sequence_idx: usize,
    /// Training only: a ratio-0 window has been used in this sequence.
    pub used_zero: bool,
}

impl RatioChooser {
    pub fn new(cfg: &BeaconConfig, max_positions: usize) -> Self {
        RatioChooser {
            mix: cfg.ratio_mix.clone(),
            candidates: cfg.filtered_ratios(),
            window: cfg.window,
            max_positions,
            rng: SplitMix64(cfg.seed),
            cached: None,
            sequence_idx: 0,
            used_zero: false,
        }
    }

    /// Forget per-sequence choices (the rng keeps running, as in the reference).
    pub fn reset(&mut self) {
        self.cached = None;
        self.sequence_idx = 0;
        self.used_zero = false;
    }

    /// α for a window that is starting. `tokens_known` = tokens of the sequence fed so far (the prompt
    /// length when the first window opens, which is what adapt-N sees).
    /// In training, ratio 0 is allowed at most once and only if a later full window exists.
    pub fn next_window(
        &mut self,
        tokens_known: usize,
        training_later_full_window: Option<bool>,
    ) -> usize {
        if self.candidates.len() == 1 {
            return self.candidates[0];
        }
        let mut cands = self.candidates.clone();
        if let Some(later_full) = training_later_full_window {
            if self.used_zero || !later_full {
                cands.retain(|&r| r != 0);
            }
        }
        if cands.is_empty() {
            cands = self.candidates.clone();
        }
        let r = match &self.mix {
            RatioMix::StepRandom => cands[self.rng.below(cands.len())],
            RatioMix::InstanceRandom => *self
                .cached
                .get_or_insert_with(|| cands[self.rng.below(cands.len())]),
            RatioMix::Sequence => {
                let r = cands[self.sequence_idx % cands.len()];
                self.sequence_idx += 1;
                r
            }
            RatioMix::Adapt(n) => {
                let (mp, w) = (self.max_positions, self.window);
                *self
                    .cached
                    .get_or_insert_with(|| adapt_ratio(&cands, tokens_known + n, mp, w))
            }
        };
        if r == 0 {
            self.used_zero = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(slots: &[bool]) -> String {
        slots.iter().map(|&b| if b { 'B' } else { 'r' }).collect()
    }

    #[test]
    fn spec_2_4_examples() {
        // α=4, ρ=0, n=10 → r r r r B r r r r B r r, ρ=2
        let (s, rho) = interleave_layout(10, 0, 4);
        assert_eq!(show(&s), "rrrrBrrrrBrr");
        assert_eq!(rho, 2);
        // then ρ=2, n=3 → r r B r, ρ=1
        let (s, rho) = interleave_layout(3, 2, 4);
        assert_eq!(show(&s), "rrBr");
        assert_eq!(rho, 1);
        // W=2048, α=8 at once: 2304 slots, last one a beacon.
        let (s, rho) = interleave_layout(2048, 0, 8);
        assert_eq!(s.len(), 2304);
        assert!(s[2303] && rho == 0);
        assert_eq!(s.iter().filter(|&&b| b).count(), 256);
    }

    #[test]
    fn edge_lengths() {
        let (a, w) = (4usize, 32usize);
        for n in [1, a - 1, a, w - 1, w, w + 1] {
            let (s, rho) = interleave_layout(n, 0, a);
            assert_eq!(s.iter().filter(|&&b| !b).count(), n, "n={n}");
            assert_eq!(s.iter().filter(|&&b| b).count(), n / a, "n={n}");
            assert_eq!(rho, n % a);
            // every beacon directly follows the α-th raw token since the last beacon
            let mut since = 0;
            for &b in &s {
                if b {
                    assert_eq!(since, a);
                    since = 0;
                } else {
                    since += 1;
                }
            }
        }
    }

    #[test]
    fn token_by_token_equals_one_shot() {
        for a in [2, 4, 8] {
            let (one, _) = interleave_layout(29, 0, a);
            let mut rho = 0;
            let mut step = Vec::new();
            for _ in 0..29 {
                let (s, r) = interleave_layout(1, rho, a);
                step.extend(s);
                rho = r;
            }
            assert_eq!(one, step);
        }
    }

    #[test]
    fn adapt_thresholds_spec_2_10() {
        // Qwen2 beacon: P=32768, W=2048, adapt-1024.
        let c = [2, 4, 8, 16, 32];
        let pick = |lp: usize| adapt_ratio(&c, lp + 1024, 32768, 2048);
        assert_eq!(pick(62_464), 2);
        assert_eq!(pick(62_465), 4);
        assert_eq!(pick(123_904), 4);
        assert_eq!(pick(123_905), 8);
        assert_eq!(pick(246_784), 8);
        assert_eq!(pick(492_544), 16);
        assert_eq!(pick(984_064), 32);
        assert_eq!(pick(2_000_000), 32);
        // The fixture: 500 tokens, adapt-64, P=256, W=32 → budgets 480/928/1824 → ratio 4.
        assert_eq!(adapt_ratio(&[2, 4, 8], 564, 256, 32), 4);
        // Old Llama-2: α=0 (no compression) while Lp ≤ 3072.
        let old = [0, 2, 4, 8, 16, 32, 64, 128];
        assert_eq!(adapt_ratio(&old, 3072 + 1024, 4096, 1024), 0);
        assert_eq!(adapt_ratio(&old, 3073 + 1024, 4096, 1024), 2);
    }

    #[test]
    fn seeded_step_random_is_reproducible() {
        let cfg = BeaconConfig::default();
        let mut a = RatioChooser::new(&cfg, 8192);
        let mut b = RatioChooser::new(&cfg, 8192);
        let xa: Vec<_> = (0..20).map(|_| a.next_window(0, None)).collect();
        let xb: Vec<_> = (0..20).map(|_| b.next_window(0, None)).collect();
        assert_eq!(xa, xb);
        assert!(xa.iter().all(|r| cfg.ratios.contains(r)));
        assert!(xa.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }
}
