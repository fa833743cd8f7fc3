//! The recall mix must not teach the evaluation's tasks: no word 4-gram of any recall template occurs
//! in a string literal of the evaluation's needle / passkey / retrieval code (read from its source, so
//! a template added there later is checked too), and the evaluation's key phrases never occur here.

use beacon_train::recall::template_phrases;
use std::collections::HashSet;

const EVAL_SOURCES: [&str; 3] = [
    include_str!("../../beacon-eval/src/needle.rs"),
    include_str!("../../beacon-eval/src/retrieval.rs"),
    include_str!("../../beacon-eval/src/cases.rs"),
];

/// The string literals of a Rust source (between unescaped double quotes, comments included: a
/// phrase quoted in a comment is checked too).
fn literals(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut escaped = false;
    for c in src.chars() {
        match (&mut cur, c) {
            (Some(s), _) if escaped => {
                s.push(c);
                escaped = false;
            }
            (Some(_), '\\') => escaped = true,
            (Some(s), '"') => {
                out.push(std::mem::take(s));
                cur = None;
            }
            (Some(s), _) => s.push(c),
            (None, '"') => cur = Some(String::new()),
            (None, _) => {}
        }
    }
    out
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty() && !w.starts_with('{'))
        .map(|w| w.to_lowercase())
        .collect()
}

fn grams(s: &str, n: usize) -> HashSet<Vec<String>> {
    let w = words(s);
    w.windows(n).map(|g| g.to_vec()).collect()
}

#[test]
fn recall_templates_share_no_phrase_with_the_evaluation() {
    let eval: Vec<String> = EVAL_SOURCES.iter().flat_map(|s| literals(s)).collect();
    assert!(
        eval.iter().any(|l| l.contains("special magic numbers")),
        "the needle template was not found in the evaluation's source"
    );
    let eval_grams: HashSet<Vec<String>> = eval.iter().flat_map(|l| grams(l, 4)).collect();
    for phrase in template_phrases() {
        for g in grams(&phrase, 4) {
            assert!(
                !eval_grams.contains(&g),
                "recall template {phrase:?} shares {g:?} with the evaluation"
            );
        }
        let lower = phrase.to_lowercase();
        for key in ["magic number", "pass key", "passkey", "special", "needle"] {
            assert!(
                !lower.contains(key),
                "recall template {phrase:?} uses {key:?}"
            );
        }
    }
}
