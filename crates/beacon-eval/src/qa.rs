//! Text scorers, all pure functions: SQuAD-style normalised exact match and token F1, substring
//! matches (RULER's `string_match_all`, lost-in-the-middle's `best_subspan_em`) and number extraction.

use std::collections::HashMap;

/// SQuAD normalisation: lower case, drop punctuation, drop the articles a/an/the, collapse whitespace.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !is_punct(*c)).collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation() || matches!(c, '‘' | '’' | '“' | '”' | '…' | '–' | '—')
}

/// Exact match after normalisation: 1 or 0.
pub fn exact_match(prediction: &str, gold: &str) -> f64 {
    (normalize_answer(prediction) == normalize_answer(gold)) as u8 as f64
}

/// Token-level F1 after normalisation (SQuAD's `f1_score`).
pub fn f1(prediction: &str, gold: &str) -> f64 {
    let p = normalize_answer(prediction);
    let g = normalize_answer(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        // Both empty → agree; one empty → nothing in common.
        return (pt.is_empty() && gt.is_empty()) as u8 as f64;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0i64;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / pt.len() as f64;
    let recall = common as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Best score over several gold answers.
pub fn max_over(golds: &[String], prediction: &str, score: fn(&str, &str) -> f64) -> f64 {
    golds
        .iter()
        .map(|g| score(prediction, g))
        .fold(0.0, f64::max)
}

/// 1 when the normalised gold is a substring of the normalised prediction (lost in the middle's
/// `best_subspan_em`, one gold).
pub fn subspan_em(prediction: &str, gold: &str) -> f64 {
    let g = normalize_answer(gold);
    (!g.is_empty() && normalize_answer(prediction).contains(&g)) as u8 as f64
}

/// Fraction of references found (case-insensitive) in the prediction (RULER's `string_match_all`).
pub fn string_match_all(prediction: &str, refs: &[String]) -> f64 {
    if refs.is_empty() {
        return 0.0;
    }
    let p = prediction.to_lowercase();
    refs.iter()
        .filter(|r| p.contains(&r.to_lowercase()))
        .count() as f64
        / refs.len() as f64
}

/// The first run of ASCII digits in the text.
pub fn first_number(s: &str) -> Option<&str> {
    let start = s.find(|c: char| c.is_ascii_digit())?;
    let rest = &s[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Exact match of a number answer: the first number in the output is the expected value (1 or 0).
pub fn number_match(prediction: &str, expected: &str) -> f64 {
    (first_number(prediction) == Some(expected.trim())) as u8 as f64
}
