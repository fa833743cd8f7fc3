//! Known-answer tests of the scorers (pure functions).

use beacon_eval::cases::{grade, Scorer};
use beacon_eval::needle::insert_at_depth;
use beacon_eval::ppl::{nll_of, perplexity};
use beacon_eval::qa::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn normalisation_follows_squad() {
    assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
    assert_eq!(normalize_answer("an apple, a pear"), "apple pear");
    assert_eq!(normalize_answer("  Denver Broncos. "), "denver broncos");
}

#[test]
fn f1_worked_examples() {
    // perfect
    assert_eq!(f1("Denver Broncos", "Denver Broncos"), 1.0);
    assert_eq!(exact_match("the Denver Broncos.", "Denver Broncos"), 1.0);
    // disjoint
    assert_eq!(f1("Carolina Panthers", "Denver Broncos"), 0.0);
    assert_eq!(exact_match("Carolina Panthers", "Denver Broncos"), 0.0);
    // prediction "Denver Broncos team" vs gold "Denver Broncos": P = 2/3, R = 1, F1 = 0.8
    assert!((f1("Denver Broncos team", "Denver Broncos") - 0.8).abs() < 1e-12);
    // "in the 10th century" vs "10th and 11th centuries": tokens [in,10th,century] vs [10th,and,11th,centuries]
    // common = 1 → P = 1/3, R = 1/4, F1 = 2·(1/12)/(7/12) = 2/7
    assert!((f1("in the 10th century", "10th and 11th centuries") - 2.0 / 7.0).abs() < 1e-12);
    // repeated tokens match once per occurrence: [x, x, y] vs [x]: common 1, P = 1/3, R = 1 → F1 = 1/2
    assert!((f1("x x y", "x") - 0.5).abs() < 1e-12);
    // empty prediction
    assert_eq!(f1("", "France"), 0.0);
    // best over golds
    let golds = s(&["10th and 11th centuries", "in the 10th and 11th centuries"]);
    assert_eq!(max_over(&golds, "in the 10th and 11th centuries", f1), 1.0);
    assert_eq!(
        max_over(&golds, "10th and 11th centuries", exact_match),
        1.0
    );
}

#[test]
fn number_and_substring_matches() {
    assert_eq!(number_match(" 4821931.", "4821931"), 1.0);
    assert_eq!(
        number_match("The number is 4821931, indeed", "4821931"),
        1.0
    );
    assert_eq!(number_match("4821932", "4821931"), 0.0);
    assert_eq!(number_match("48219310", "4821931"), 0.0);
    assert_eq!(number_match("no number", "4821931"), 0.0);
    assert_eq!(first_number("ab 12x34"), Some("12"));
    assert_eq!(subspan_em("\"BB3BA2A5-7de8\" is it", "bb3ba2a5-7de8"), 1.0);
    assert_eq!(subspan_em("something else", "bb3ba2a5-7de8"), 0.0);
    assert_eq!(string_match_all("A B", &s(&["a", "b", "c", "d"])), 0.5);
    assert_eq!(string_match_all("anything", &[]), 0.0);
}

#[test]
fn grading_perfect_and_wrong_answers() {
    for (scorer, good, bad, exp) in [
        (Scorer::Number, "1234567", "7654321", s(&["1234567"])),
        (
            Scorer::AllRefs,
            "QWERT, ASDFG",
            "none",
            s(&["QWERT", "ASDFG"]),
        ),
        (Scorer::Subspan, "value: abc-def", "abc", s(&["abc-def"])),
        (
            Scorer::F1,
            "Paris",
            "London",
            s(&["Paris", "the city of Paris"]),
        ),
    ] {
        assert_eq!(grade(scorer, good, &exp).0, 1.0, "{scorer:?}");
        assert_eq!(grade(scorer, bad, &exp).0, 0.0, "{scorer:?}");
    }
    assert_eq!(grade(Scorer::F1, "Paris", &s(&["Paris"])).1, Some(1.0));
}

#[test]
fn perplexity_of_perfect_and_uniform_predictions() {
    // a perfect prediction: all mass on the target → NLL 0, PPL 1
    let mut logits = vec![-1e4f32; 256];
    logits[7] = 1e4;
    assert!(nll_of(&logits, 7) < 1e-9);
    assert!((perplexity(0.0, 10) - 1.0).abs() < 1e-12);
    // a wrong one: the target gets ~0 probability → huge NLL
    assert!(nll_of(&logits, 8) > 1e3);
    // uniform over V → PPL = V
    let uniform = vec![0.5f32; 256];
    let nll: f64 = (0..10).map(|t| nll_of(&uniform, t)).sum();
    assert!((perplexity(nll, 10) - 256.0).abs() < 1e-9);
}

#[test]
fn needle_insertion_at_depth() {
    let hay: Vec<u32> = (100..200).collect();
    let needle = [1u32, 2, 3];
    let (v, p) = insert_at_depth(&hay, &needle, 0.0, &|_| false);
    assert_eq!((p, &v[..3]), (0, &needle[..]));
    let (v, p) = insert_at_depth(&hay, &needle, 100.0, &|_| false);
    assert_eq!((p, &v[100..]), (100, &needle[..]));
    // moved back to the nearest boundary (multiples of 10)
    let (v, p) = insert_at_depth(&hay, &needle, 47.0, &|i| i % 10 == 0);
    assert_eq!(p, 40);
    assert_eq!(v.len(), 103);
    assert_eq!(&v[40..43], &needle[..]);
    assert_eq!(v[43], 140);
}
