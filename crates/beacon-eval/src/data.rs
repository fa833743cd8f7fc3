//! Readers of the offline data in `shared/data` (see its README): books, the haystack, the retrieval
//! sets, SQuAD / HotpotQA and the word lists.

use anyhow::{Context, Result};
use serde::Deserialize;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Books held out from training for perplexity (the data README's suggested split; the trainer holds
/// out the same books). All are over 1 MB, so 128K-token contexts can be cut from one book.
pub const HELD_OUT_BOOKS: [&str; 8] = [
    "pg28054", "pg6593", "pg3300", "pg4300", "pg4276", "pg6688", "pg2600", "pg1023",
];

pub fn held_out_paths(data: &Path) -> Vec<PathBuf> {
    HELD_OUT_BOOKS
        .iter()
        .map(|b| data.join("books").join(format!("{b}.txt")))
        .collect()
}

/// The first `max_chars` characters of a text file (whole file when smaller).
pub fn read_prefix(path: &Path, max_chars: usize) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(match text.char_indices().nth(max_chars) {
        Some((i, _)) => text[..i].to_string(),
        None => text,
    })
}

/// The haystack text (`{"text": ...}`).
pub fn haystack(path: &Path) -> Result<String> {
    #[derive(Deserialize)]
    struct H {
        text: String,
    }
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let h: H = serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))?;
    Ok(h.text)
}

fn lines_of(path: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().and_then(|e| e.to_str()) == Some("gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut out = Vec::new();
    for l in BufReader::new(reader).lines() {
        let l = l.with_context(|| format!("reading {}", path.display()))?;
        if !l.trim().is_empty() {
            out.push(l);
        }
    }
    Ok(out)
}

/// One LongChat line-retrieval prompt.
#[derive(Debug, Clone, Deserialize)]
pub struct LinesCase {
    pub prompt: String,
    pub expected_number: u64,
    pub num_lines: usize,
}

pub fn longchat_lines(path: &Path) -> Result<Vec<LinesCase>> {
    lines_of(path)?
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {}", path.display())))
        .collect()
}

/// One lost-in-the-middle key-value retrieval example.
#[derive(Debug, Clone, Deserialize)]
pub struct KvCase {
    pub ordered_kv_records: Vec<(String, String)>,
    pub key: String,
    pub value: String,
}

pub fn kv_retrieval(path: &Path) -> Result<Vec<KvCase>> {
    lines_of(path)?
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {}", path.display())))
        .collect()
}

/// A question with its gold paragraphs and answers.
#[derive(Debug, Clone)]
pub struct QaItem {
    pub question: String,
    pub answers: Vec<String>,
    /// Paragraphs holding the answer.
    pub gold: Vec<String>,
}

/// SQuAD 2.0 dev (answerable questions) and the pool of all its paragraphs (distractors).
pub fn squad(path: &Path) -> Result<(Vec<QaItem>, Vec<String>)> {
    #[derive(Deserialize)]
    struct Answer {
        text: String,
    }
    #[derive(Deserialize)]
    struct Qa {
        question: String,
        answers: Vec<Answer>,
        #[serde(default)]
        is_impossible: bool,
    }
    #[derive(Deserialize)]
    struct Para {
        context: String,
        qas: Vec<Qa>,
    }
    #[derive(Deserialize)]
    struct Article {
        paragraphs: Vec<Para>,
    }
    #[derive(Deserialize)]
    struct File {
        data: Vec<Article>,
    }
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: File =
        serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))?;
    let mut items = Vec::new();
    let mut pool = Vec::new();
    for a in f.data {
        for p in a.paragraphs {
            for q in &p.qas {
                if q.is_impossible || q.answers.is_empty() {
                    continue;
                }
                let mut answers: Vec<String> = q.answers.iter().map(|a| a.text.clone()).collect();
                answers.dedup();
                items.push(QaItem {
                    question: q.question.clone(),
                    answers,
                    gold: vec![p.context.clone()],
                });
            }
            pool.push(p.context);
        }
    }
    Ok((items, pool))
}

/// HotpotQA (distractor setting): each question's two supporting paragraphs are gold; every
/// paragraph of the file is a possible distractor.
pub fn hotpotqa(path: &Path) -> Result<(Vec<QaItem>, Vec<String>)> {
    #[derive(Deserialize)]
    struct Rec {
        question: String,
        answer: String,
        supporting_facts: Vec<(String, serde_json::Value)>,
        context: Vec<(String, Vec<String>)>,
    }
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let recs: Vec<Rec> =
        serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))?;
    let mut items = Vec::new();
    let mut pool = Vec::new();
    for r in recs {
        let para = |(t, sents): &(String, Vec<String>)| format!("{t}\n{}", sents.concat().trim());
        let gold: Vec<String> = r
            .context
            .iter()
            .filter(|(t, _)| r.supporting_facts.iter().any(|(s, _)| s == t))
            .map(para)
            .collect();
        pool.extend(r.context.iter().map(para));
        if !gold.is_empty() {
            items.push(QaItem {
                question: r.question,
                answers: vec![r.answer],
                gold,
            });
        }
    }
    Ok((items, pool))
}

/// A word list (one word a line).
pub fn words(path: &Path) -> Result<Vec<String>> {
    Ok(lines_of(path)?
        .into_iter()
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphabetic()))
        .collect())
}
