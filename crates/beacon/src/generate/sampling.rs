//! Drawing the next token: greedy, temperature, top-k, top-p, repetition / frequency / presence
//! penalties and the DRY n-gram penalty, seeded.

use crate::error::{BeaconError, Result};
use crate::schedule::SplitMix64;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How the next token is drawn. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Default: 0 (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens. Default: none.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p. Default: none.
    pub top_p: Option<f32>,
    /// Divide positive (multiply negative) logits of already-seen tokens. Default: 1 (off).
    pub repetition_penalty: f32,
    /// Subtract `frequency_penalty × count` from the logit of each token this sampler has drawn
    /// `count` times (OpenAI's definition; generated tokens only). Default: 0 (off).
    #[serde(default)]
    pub frequency_penalty: f32,
    /// Subtract this from the logit of every token this sampler has drawn at least once. Default: 0.
    #[serde(default)]
    pub presence_penalty: f32,
    /// The DRY n-gram penalty. Default: off (`beacon run --chat` and the server turn it on).
    #[serde(default)]
    pub dry: DryParams,
    /// Default: 0.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            dry: DryParams::default(),
            seed: 0,
        }
    }
}

/// DRY ("Don't Repeat Yourself"): demote a token that would continue a repeat of an earlier
/// sequence. If the last `n` tokens also occurred earlier followed by token `t`, and
/// `n ≥ allowed_length`, then `t`'s logit loses `multiplier · base^(n − allowed_length)`: short
/// repeats cost little, a loop costs more with every token it grows.
///
/// Searched: the tokens generated so far plus the last `prompt_tail` tokens before them, at most
/// `range` tokens in all. With `prompt_tail = 0` (the default) only the answer's own repeats
/// count, so quoting the document or the question (names, phrases: what extractive answers are
/// made of) is free. Matches never extend across a breaker token (the generation's
/// end-of-sequence ids), and breakers are never penalised, so an answer can always end.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DryParams {
    /// Penalty for a repeat of exactly `allowed_length` tokens; 0 turns DRY off.
    pub multiplier: f32,
    /// Growth of the penalty per token of repeat beyond `allowed_length` (≥ 1).
    pub base: f32,
    /// Repeats shorter than this are free (≥ 1).
    pub allowed_length: usize,
    /// Most tokens searched, counted back from the newest (0 = no limit).
    pub range: usize,
    /// Tokens before the generation (the prompt's end) searched too.
    pub prompt_tail: usize,
}

impl DryParams {
    /// The settings chat front ends use (`beacon run --chat`, `beacon serve`).
    pub const CHAT: DryParams = DryParams {
        multiplier: 0.8,
        base: 1.75,
        allowed_length: 2,
        range: 1024,
        prompt_tail: 0,
    };

    /// Off, with the chat settings otherwise (so setting only `multiplier` turns it on sensibly).
    pub const OFF: DryParams = DryParams {
        multiplier: 0.0,
        ..DryParams::CHAT
    };

    pub fn enabled(&self) -> bool {
        self.multiplier > 0.0
    }

    /// The logit penalty for a repeat of `n` tokens (0 below `allowed_length`). Finite: an
    /// overflowing power is capped at `f32::MAX`.
    pub fn penalty(&self, n: usize) -> f32 {
        if !self.enabled() || n < self.allowed_length {
            return 0.0;
        }
        let e = (n - self.allowed_length).min(i32::MAX as usize) as i32;
        let p = self.multiplier * self.base.powi(e);
        if p.is_finite() {
            p
        } else {
            f32::MAX
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.multiplier >= 0.0 && self.multiplier.is_finite()) {
            return Err(BeaconError::invalid(format!(
                "dry_multiplier must be ≥ 0, found {}",
                self.multiplier
            )));
        }
        if !(self.base >= 1.0 && self.base.is_finite()) {
            return Err(BeaconError::invalid(format!(
                "dry_base must be ≥ 1, found {}",
                self.base
            )));
        }
        if self.allowed_length == 0 {
            return Err(BeaconError::invalid("dry_allowed_length must be ≥ 1"));
        }
        Ok(())
    }
}

impl Default for DryParams {
    fn default() -> Self {
        DryParams::OFF
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(BeaconError::invalid(format!(
                "temperature must be ≥ 0, found {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(BeaconError::invalid(format!(
                    "top_p must be in (0, 1], found {p}"
                )));
            }
        }
        if self.top_k == Some(0) {
            return Err(BeaconError::invalid("top_k must be ≥ 1"));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(BeaconError::invalid(format!(
                "repetition_penalty must be > 0, found {}",
                self.repetition_penalty
            )));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(BeaconError::invalid(format!(
                    "{name} must be in [-2, 2], found {v}"
                )));
            }
        }
        self.dry.validate()
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Never penalised by DRY, and DRY matches stop at them (the generation's eos ids).
    breakers: Vec<u32>,
    /// How often this sampler drew each token (frequency / presence penalties).
    drawn: HashMap<u32, u32>,
    /// History length at the first draw: where the generation starts (DRY's `prompt_tail`).
    start: Option<usize>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64(params.seed ^ 0x5DEE_CE66_D1CE_4E5B);
        Sampler {
            params,
            rng,
            breakers: Vec::new(),
            drawn: HashMap::new(),
            start: None,
        }
    }

    /// Tokens DRY never penalises and whose occurrences end a match (e.g. the eos ids).
    pub fn with_breakers(mut self, breakers: &[u32]) -> Self {
        self.breakers = breakers.to_vec();
        self
    }

    /// Draw the next token from `logits` `[vocab]`; `history` = tokens seen so far, prompt
    /// included (repetition penalty, DRY). Each call's history extends the previous one by the
    /// tokens drawn since: the first call's history is the prompt.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let l: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(self.pick(l, history))
    }

    /// [`Sampler::sample`] on logits already in memory.
    pub fn pick(&mut self, mut l: Vec<f32>, history: &[u32]) -> u32 {
        self.start.get_or_insert(history.len());
        self.penalize(&mut l, history);
        let next = self.choose(&l);
        *self.drawn.entry(next).or_default() += 1;
        next
    }

    /// Apply the repetition, frequency, presence and DRY penalties to `l` in place (before the
    /// first draw, all of `history` counts as prompt).
    pub fn penalize(&self, l: &mut [f32], history: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &count) in &self.drawn {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
        if p.dry.enabled() {
            let generated = history.len() - self.start.unwrap_or(history.len()).min(history.len());
            let mut keep = generated.saturating_add(p.dry.prompt_tail);
            if p.dry.range > 0 {
                keep = keep.min(p.dry.range);
            }
            let window = &history[history.len() - keep.min(history.len())..];
            for (t, n) in dry_match_lengths(window, &self.breakers) {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.dry.penalty(n);
                }
            }
        }
    }

    /// Greedy, or a draw after temperature / top-k / top-p.
    fn choose(&mut self, l: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(l);
        }
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_unstable_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap_or(std::cmp::Ordering::Equal));
        if let Some(k) = p.top_k {
            idx.truncate(k.max(1));
        }
        let max = l[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i] - max) / p.temperature) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if let Some(top_p) = p.top_p {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let u = self.rng.next_f64();
        let mut acc = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return idx[i] as u32;
            }
        }
        *idx.last().expect("non-empty vocabulary") as u32
    }
}

/// DRY's matches in `history`: for each token `t` that followed an earlier occurrence of the
/// history's last tokens, the longest such repeat (how many of the last tokens matched). A token
/// absent from the result would repeat nothing. Matches do not extend across a breaker, a breaker
/// as last token matches nothing, and breakers are never reported.
///
/// O(len): the Z-function of the reversed history gives, for every earlier position `j`, the
/// length of the longest common suffix of `history[..=j]` and `history`.
pub fn dry_match_lengths(history: &[u32], breakers: &[u32]) -> HashMap<u32, usize> {
    let mut out: HashMap<u32, usize> = HashMap::new();
    let len = history.len();
    if len < 2 {
        return out;
    }
    // The match cannot reach back past the last breaker.
    let reach = history
        .iter()
        .rev()
        .take_while(|t| !breakers.contains(t))
        .count();
    if reach == 0 {
        return out;
    }
    let rev: Vec<u32> = history.iter().rev().copied().collect();
    let z = z_function(&rev);
    // rev[k..] ends (in forward order) at j = len - 1 - k; the token after it is history[j + 1].
    for (k, &zk) in z.iter().enumerate().skip(1) {
        let n = zk.min(reach);
        if n == 0 {
            continue;
        }
        let next = history[len - k];
        if breakers.contains(&next) {
            continue;
        }
        let e = out.entry(next).or_default();
        *e = (*e).max(n);
    }
    out
}

/// `z[i]` = length of the longest common prefix of `s` and `s[i..]` (`z[0] = s.len()`).
fn z_function(s: &[u32]) -> Vec<usize> {
    let n = s.len();
    let mut z = vec![0; n];
    if n == 0 {
        return z;
    }
    z[0] = n;
    let (mut l, mut r) = (0, 0);
    for i in 1..n {
        if i < r {
            z[i] = (r - i).min(z[i - l]);
        }
        while i + z[i] < n && s[z[i]] == s[i + z[i]] {
            z[i] += 1;
        }
        if i + z[i] > r {
            l = i;
            r = i + z[i];
        }
    }
    z
}

pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits(&[0.1, 3.0, -1.0]), &[]).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 4.0,
            ..Default::default()
        });
        // token 1 (3.0 → 0.75) falls below token 0 (1.0)
        assert_eq!(s.sample(&logits(&[1.0, 3.0, -1.0]), &[1]).unwrap(), 0);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproducible() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            seed: 7,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..10 {
            assert_eq!(s.sample(&logits(&[0.0, 0.5, 0.4]), &[]).unwrap(), 1);
        }
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..32)
                .map(|_| s.sample(&logits(&[0.0, 0.1, 0.2, 0.3]), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.5),
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        // p(token 2) ≈ 0.84 ≥ 0.5 → always token 2
        for _ in 0..20 {
            assert_eq!(s.sample(&logits(&[0.0, 0.0, 2.5]), &[]).unwrap(), 2);
        }
    }

    /// DRY over the whole (test) history: before any draw, all of it is prompt.
    fn dry(multiplier: f32) -> Sampler {
        Sampler::new(SamplingParams {
            dry: DryParams {
                multiplier,
                prompt_tail: 1 << 20,
                ..DryParams::CHAT
            },
            ..Default::default()
        })
    }

    /// Logits after the penalties (all zero before).
    fn penalized(s: &Sampler, vocab: usize, history: &[u32]) -> Vec<f32> {
        let mut l = vec![0.0; vocab];
        s.penalize(&mut l, history);
        l
    }

    #[test]
    fn dry_demotes_the_continuation_of_a_repeat() {
        let s = dry(0.8);
        // "5 6 7 8" seen before; the history now ends in "5 6 7": 8 would extend a 3-token repeat.
        let l = penalized(&s, 10, &[5, 6, 7, 8, 1, 5, 6, 7]);
        let want = 0.8 * 1.75f32.powi(3 - 2);
        assert_eq!(l[8], -want);
        assert!(
            l.iter().enumerate().all(|(i, &x)| i == 8 || x == 0.0),
            "{l:?}"
        );
        // a 4-token repeat: 0.8 · 1.75² = 2.45
        let l = penalized(&s, 10, &[1, 2, 3, 4, 5, 9, 1, 2, 3, 4]);
        assert_eq!(l[5], -(0.8 * 1.75f32.powi(2)));
        // and greedy moves off the loop: 5 led by 2.0, loses 2.45
        let mut s = dry(0.8);
        let mut logits = vec![0.0; 10];
        logits[5] = 3.0;
        logits[6] = 1.0;
        assert_eq!(s.pick(logits, &[1, 2, 3, 4, 5, 9, 1, 2, 3, 4]), 6);
    }

    #[test]
    fn dry_spares_repeats_shorter_than_allowed() {
        let s = dry(0.8);
        // "2" followed by 9 earlier: a 1-token repeat, below allowed_length 2.
        let h = [1, 2, 9, 3, 2];
        assert_eq!(dry_match_lengths(&h, &[]), HashMap::from([(9, 1)]));
        assert_eq!(penalized(&s, 10, &h), vec![0.0; 10]);
        // exactly allowed_length: the multiplier itself
        let l = penalized(&s, 10, &[1, 2, 9, 1, 2]);
        assert_eq!(l[9], -0.8);
    }

    #[test]
    fn dry_off_leaves_logits_unchanged() {
        let s = dry(0.0);
        let h = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4];
        assert_eq!(penalized(&s, 10, &h), vec![0.0; 10]);
        assert_eq!(SamplingParams::default().dry, DryParams::OFF);
    }

    #[test]
    fn dry_range_and_breakers_bound_the_match() {
        let h = [0, 1, 2, 9, 0, 1, 2];
        assert_eq!(dry_match_lengths(&h, &[]), HashMap::from([(9, 3)]));
        // a breaker (eos) ends the match and is never penalised
        assert_eq!(dry_match_lengths(&h, &[0]), HashMap::from([(9, 2)]));
        assert!(dry_match_lengths(&[1, 2, 0, 1, 2], &[0]).is_empty());
        // range 3 only sees "0 1 2": nothing repeats in it
        let s = Sampler::new(SamplingParams {
            dry: DryParams {
                multiplier: 0.8,
                range: 3,
                prompt_tail: 100,
                ..DryParams::CHAT
            },
            ..Default::default()
        });
        assert_eq!(penalized(&s, 10, &h), vec![0.0; 10]);
        // a huge repeat ("0 1 0 1 … 1": 0 continues it) is capped, not infinite
        let long: Vec<u32> = (0..4000).map(|i| i % 2).collect();
        let mut l = vec![0.0; 2];
        dry(0.8).penalize(&mut l, &long);
        assert!(l[0].is_finite() && l[0] < -1e30 && l[1] == 0.0, "{l:?}");
    }

    #[test]
    fn dry_by_default_counts_only_the_answers_own_repeats() {
        let run = |prompt_tail| {
            let mut s = Sampler::new(SamplingParams {
                dry: DryParams {
                    prompt_tail,
                    ..DryParams::CHAT
                },
                ..Default::default()
            });
            // "3 4 8" is in the prompt; the answer goes "3 4 9 3 4"
            let mut h = vec![3, 4, 8, 0, 1];
            for t in [3, 4, 9, 3, 4] {
                let mut l = vec![0.0; 10];
                l[t as usize] = 1.0;
                assert_eq!(s.pick(l, &h), t);
                h.push(t);
            }
            penalized(&s, 10, &h)
        };
        // 9 followed "3 4" in the answer: penalised; 8 followed it only in the prompt: free
        let l = run(0);
        assert_eq!((l[9], l[8]), (-0.8, 0.0));
        // with the prompt's last 5 tokens searched too, 8 is penalised as well
        let l = run(5);
        assert_eq!((l[9], l[8]), (-0.8, -0.8));
    }

    #[test]
    fn dry_matches_agree_with_brute_force() {
        let mut rng = SplitMix64(9);
        for case in 0..300usize {
            let len = 1 + case % 40;
            let h: Vec<u32> = (0..len).map(|_| (rng.next_f64() * 3.0) as u32).collect();
            let breakers = if case % 3 == 0 { vec![2] } else { vec![] };
            let mut want: HashMap<u32, usize> = HashMap::new();
            for j in 0..len.saturating_sub(1) {
                let mut n = 0;
                while n <= j && h[j - n] == h[len - 1 - n] && !breakers.contains(&h[len - 1 - n]) {
                    n += 1;
                }
                let next = h[j + 1];
                if n > 0 && !breakers.contains(&next) {
                    let e = want.entry(next).or_default();
                    *e = (*e).max(n);
                }
            }
            assert_eq!(dry_match_lengths(&h, &breakers), want, "{h:?}");
        }
    }

    #[test]
    fn frequency_and_presence_penalties_count_draws() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..Default::default()
        });
        assert_eq!(s.pick(vec![0.0, 2.0, 1.6], &[]), 1);
        // token 1: 2.0 − 0.5 − 0.25 = 1.25 < 1.6
        assert_eq!(s.pick(vec![0.0, 2.0, 1.6], &[]), 2);
        let mut l = vec![0.0; 3];
        s.penalize(&mut l, &[]);
        assert_eq!(l, vec![0.0, -0.75, -0.75]);
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_k: Some(0),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            frequency_penalty: 3.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        for dry in [
            DryParams {
                base: 0.5,
                ..DryParams::CHAT
            },
            DryParams {
                allowed_length: 0,
                ..DryParams::CHAT
            },
            DryParams {
                multiplier: -1.0,
                ..DryParams::CHAT
            },
        ] {
            assert!(SamplingParams {
                dry,
                ..Default::default()
            }
            .validate()
            .is_err());
        }
        assert!(SamplingParams {
            dry: DryParams::CHAT,
            ..Default::default()
        }
        .validate()
        .is_ok());
    }
}
