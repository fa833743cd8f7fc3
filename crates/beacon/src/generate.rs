//! Generation: sampling (greedy, temperature, top-k, top-p, repetition penalty, seed), stop rules
//! (eos ids, stop strings, max tokens) and streaming text out. Every generated token goes back
//! through the same [`Session`], so compression continues through the answer (SPEC §2.9).

use crate::engine::{FeedOptions, Session, Want};
use crate::error::{BeaconError, Result};
use crate::model::Model;
use crate::schedule::SplitMix64;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::time::Instant;

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
            seed: 0,
        }
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
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64(params.seed ^ 0x5DEE_CE66_D1CE_4E5B);
        Sampler { params, rng }
    }

    /// Draw the next token from `logits` `[vocab]`; `history` = tokens seen (for the repetition penalty).
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let mut l: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
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
        if p.temperature == 0.0 {
            return Ok(argmax(&l));
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
                return Ok(idx[i] as u32);
            }
        }
        Ok(*idx.last().expect("non-empty vocabulary") as u32)
    }
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop when any of these is generated (not included in the output).
    pub stop_strings: Vec<String>,
    /// Stop on any of these token ids (not included in the output text).
    pub eos_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An eos id or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The consumer asked to stop (e.g. client disconnected).
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Holds back text that might be the start of a stop string, so a stop string is never streamed.
struct StopScanner {
    stops: Vec<String>,
    pending: String,
}

impl StopScanner {
    /// Add text; returns (text safe to emit, whether a stop string was hit).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= self.pending.len()
                    && s.is_char_boundary(k)
                    && self.pending.ends_with(&s[..k])
                {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }
    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Feed `prompt` (may be empty when the session already holds it and `first_logits` is given), then
/// generate. `on_text` receives each new piece of text and returns false to cancel.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Model,
    session: &mut Session,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    first_logits: Option<Tensor>,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
    on_prefill: &mut dyn FnMut(usize),
) -> Result<Generation> {
    opts.sampling.validate()?;
    let t0 = Instant::now();
    let mut logits = if prompt.is_empty() {
        first_logits
            .ok_or_else(|| BeaconError::invalid("empty prompt and no logits to continue from"))?
    } else {
        session
            .feed_with(
                model,
                prompt,
                Want::Last,
                FeedOptions::default(),
                on_prefill,
            )?
            .ok_or_else(|| BeaconError::invalid("prompt produced no logits"))?
    };
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut decoder = tokenizer.stream_decoder();
    let mut scanner = StopScanner {
        stops: opts
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect(),
        pending: String::new(),
    };
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut finish = FinishReason::Length;
    while tokens.len() < opts.max_new_tokens {
        let row = if logits.rank() == 2 {
            logits.get(logits.dim(0)? - 1)?
        } else {
            logits.clone()
        };
        let next = sampler.sample(&row, &session.tokens)?;
        if opts.eos_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        let piece = decoder.push(next)?;
        let (out, hit) = scanner.push(&piece);
        if !out.is_empty() {
            text.push_str(&out);
            if !on_text(&out) {
                finish = FinishReason::Cancelled;
                break;
            }
        }
        if hit {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == opts.max_new_tokens {
            break;
        }
        logits = session
            .feed(model, &[next], Want::Last)?
            .ok_or_else(|| BeaconError::invalid("decode step produced no logits"))?;
    }
    if finish != FinishReason::Stop {
        // Bytes of an unfinished character and text held back for a stop string that never came.
        let tail = decoder.finish()?;
        let (out, hit) = scanner.push(&tail);
        let rest = if hit { out } else { out + &scanner.flush() };
        if !rest.is_empty() {
            text.push_str(&rest);
            on_text(&rest);
        }
    }
    Ok(Generation {
        tokens,
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
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

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut sc = StopScanner {
            stops: vec!["</s>".into()],
            pending: String::new(),
        };
        let (a, hit) = sc.push("hello <");
        assert_eq!((a.as_str(), hit), ("hello ", false));
        let (b, hit) = sc.push("/s> more");
        assert_eq!((b.as_str(), hit), ("", true));
        let mut sc = StopScanner {
            stops: vec!["STOP".into()],
            pending: String::new(),
        };
        let (a, _) = sc.push("ST");
        let (b, hit) = sc.push("ill going");
        assert_eq!((a + &b, hit), ("STill going".to_string(), false));
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
    }
}
