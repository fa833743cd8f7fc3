//! Generation: sampling ([`sampling`]: greedy, temperature, top-k, top-p, repetition / frequency /
//! presence penalties, the DRY n-gram penalty, seed), stop rules
//! (eos ids, stop strings, max tokens) and streaming text out. Every generated token goes back
//! through the same [`Session`], so compression continues through the answer (SPEC §2.9).

mod sampling;

pub use sampling::{argmax, dry_match_lengths, DryParams, Sampler, SamplingParams};

use crate::error::{BeaconError, Result};
use crate::model::Model;
use crate::session::{FeedOptions, Session, Want};
use crate::tokenizer::Tokenizer;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Ids that end a generation: the tokenizer's end-of-sequence / end-of-turn ids and the config's
/// (`generation_config.json` merged in by the loader), sorted, once each.
pub fn stop_ids(config_eos: &[u32], tokenizer: Option<&Tokenizer>) -> Vec<u32> {
    let mut ids = config_eos.to_vec();
    if let Some(t) = tokenizer {
        ids.extend(t.eos_ids());
    }
    ids.sort_unstable();
    ids.dedup();
    ids
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
    let mut sampler = Sampler::new(opts.sampling.clone()).with_breakers(&opts.eos_ids);
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
}
