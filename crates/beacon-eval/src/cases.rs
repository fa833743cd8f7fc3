//! Prompted tasks (needle, passkey, retrieval, QA): a case is a tokenized context plus a question and
//! the expected answers; every configuration answers every case greedily and a pure scorer grades it.

use crate::harness::{
    answer_greedy, fmt_len, md_table, EvalMode, Evaluator, ModeSpec, Prompt, Tok,
};
use crate::qa;
use anyhow::Result;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How an answer is graded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scorer {
    /// The first number of the answer equals the expected one (1/0).
    Number,
    /// Fraction of the expected strings found in the answer (RULER `string_match_all`).
    AllRefs,
    /// The normalised expected string is a substring of the normalised answer (1/0).
    Subspan,
    /// SQuAD F1, best over the expected answers (exact match reported beside it).
    F1,
}

/// Grade an answer: (score, exact match where defined).
pub fn grade(scorer: Scorer, output: &str, expected: &[String]) -> (f64, Option<f64>) {
    match scorer {
        Scorer::Number => (
            expected
                .first()
                .map(|e| qa::number_match(output, e))
                .unwrap_or(0.0),
            None,
        ),
        Scorer::AllRefs => (qa::string_match_all(output, expected), None),
        Scorer::Subspan => (
            expected
                .first()
                .map(|e| qa::subspan_em(output, e))
                .unwrap_or(0.0),
            None,
        ),
        Scorer::F1 => (
            qa::max_over(expected, output, qa::f1),
            Some(qa::max_over(expected, output, qa::exact_match)),
        ),
    }
}

#[derive(Debug, Clone)]
pub struct Case {
    pub task: String,
    /// The length this case was built for (its prompt may be a few tokens off).
    pub target_tokens: usize,
    pub depth: Option<f64>,
    pub sample: usize,
    pub context: Vec<u32>,
    pub question: String,
    pub answer_prefix: String,
    pub expected: Vec<String>,
    pub scorer: Scorer,
    pub max_new: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseRecord {
    pub task: String,
    pub mode: EvalMode,
    pub ratio: Option<String>,
    pub keep: Option<usize>,
    pub label: String,
    /// Target length of the case (the grid value).
    pub context_tokens: usize,
    /// Tokens of the whole prompt actually fed.
    pub prompt_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<f64>,
    pub sample: usize,
    pub expected: Vec<String>,
    pub output: String,
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    pub seconds: f64,
    pub peak_kv_bytes: usize,
    pub beacon_weights: String,
    /// Equal-memory baselines: the beacon configuration whose peak K/V they match (`beacon-x8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_of: Option<String>,
    /// Equal-memory baselines: K/V entries allowed (that beacon run's peak on the same prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_entries: Option<usize>,
}

/// Answer every case with every configuration.
pub fn run_cases(
    ev: &Evaluator,
    specs: &[ModeSpec],
    cases: &[Case],
    chat: bool,
    seed: u64,
    pb: &ProgressBar,
) -> Result<Vec<CaseRecord>> {
    let tok = ev.tok();
    let mut out = Vec::new();
    for case in cases {
        let prompt = Prompt::build(
            &tok,
            chat,
            &case.context,
            &case.question,
            &case.answer_prefix,
        )?;
        let mut full: Option<CaseRecord> = None;
        let mut budgets = crate::harness::MemoryBudgets::default();
        for spec in specs {
            // equal-memory baselines take their keep from this prompt's beacon run
            let (spec, memory_entries) = budgets.resolve(spec)?;
            let spec = &spec;
            let label = spec.label(ev.native);
            pb.set_message(format!(
                "{} {} {label}",
                case.task,
                fmt_len(case.target_tokens)
            ));
            let base = pb.position();
            // truncate/streaming never cut a prompt that fits what they keep: the answer is full's
            let budget = spec
                .keep_limit(ev.native)
                .map(|k| k.saturating_sub(case.max_new));
            if let (Some(k), Some(f)) = (budget, &full) {
                if prompt.ids.len() <= k {
                    let mut r = f.clone();
                    r.mode = spec.mode;
                    r.ratio = spec.ratio.clone();
                    r.keep = spec.keep_limit(ev.native);
                    r.label = label;
                    r.memory_of = spec.memory_of();
                    r.memory_entries = memory_entries;
                    out.push(r);
                    pb.set_position(base + prompt.ids.len() as u64);
                    continue;
                }
            }
            if spec.streaming_too_small(ev.native) {
                crate::harness::say(
                    pb,
                    format!(
                        "{:>16} {:>5} {label:<18} skipped: streaming needs more than 64 kept entries (got {})",
                        case.task,
                        fmt_len(case.target_tokens),
                        spec.keep.unwrap_or(ev.native)
                    ),
                );
                pb.set_position(base + prompt.ids.len() as u64);
                continue;
            }
            let mut session = spec.session(ev, seed)?;
            let t0 = std::time::Instant::now();
            // One-line answers stop at a newline; list answers (AllRefs) may span lines.
            let stop_newline = case.scorer != Scorer::AllRefs;
            let a = answer_greedy(
                ev,
                &mut session,
                &prompt.ids,
                case.max_new,
                stop_newline,
                &mut |d| pb.set_position(base + d as u64),
            )?;
            budgets.note(spec, &session);
            let (score, em) = grade(case.scorer, &a.text, &case.expected);
            pb.set_position(base + prompt.ids.len() as u64);
            let rec = CaseRecord {
                task: case.task.clone(),
                mode: spec.mode,
                ratio: spec.ratio.clone(),
                keep: spec.keep_limit(ev.native),
                label,
                context_tokens: case.target_tokens,
                prompt_tokens: prompt.ids.len(),
                depth: case.depth,
                sample: case.sample,
                expected: case.expected.clone(),
                output: a.text,
                score,
                exact_match: em,
                seconds: t0.elapsed().as_secs_f64(),
                peak_kv_bytes: a.peak_kv_bytes,
                beacon_weights: ev.weights.clone(),
                memory_of: spec.memory_of(),
                memory_entries,
            };
            crate::harness::say(
                pb,
                format!(
                    "{:>16} {:>5} {:<18} {:>5.0}%  {:.1}s  {:?} → {:?}",
                    rec.task,
                    fmt_len(rec.context_tokens),
                    rec.label,
                    100.0 * rec.score,
                    rec.seconds,
                    rec.expected.join(","),
                    rec.output.chars().take(60).collect::<String>()
                ),
            );
            if spec.mode == EvalMode::Full {
                full = Some(rec.clone());
            }
            out.push(rec);
        }
    }
    Ok(out)
}

/// Total prompt tokens (for the progress bar).
pub fn total_tokens(tok: &Tok, chat: bool, cases: &[Case], n_specs: usize) -> u64 {
    cases
        .iter()
        .map(|c| {
            let extra = Prompt::overhead(tok, chat, &c.question, &c.answer_prefix).unwrap_or(0);
            ((c.context.len() + extra - crate::harness::ANSWER_ROOM) * n_specs) as u64
        })
        .sum()
}

/// Mean score per (task, label, length), as a markdown table per task.
pub fn markdown(records: &[CaseRecord], metric: &str) -> String {
    let mut tasks: Vec<&str> = Vec::new();
    for r in records {
        if !tasks.contains(&r.task.as_str()) {
            tasks.push(&r.task);
        }
    }
    let mut s = String::new();
    for task in tasks {
        let rs: Vec<&CaseRecord> = records.iter().filter(|r| r.task == task).collect();
        let mut labels: Vec<&str> = Vec::new();
        let mut lengths: Vec<usize> = Vec::new();
        let mut acc: BTreeMap<(&str, usize), (f64, f64, usize)> = BTreeMap::new();
        let mut samples = 0;
        for r in &rs {
            if !labels.contains(&r.label.as_str()) {
                labels.push(&r.label);
            }
            if !lengths.contains(&r.context_tokens) {
                lengths.push(r.context_tokens);
            }
            let e = acc.entry((&r.label, r.context_tokens)).or_default();
            e.0 += r.score;
            e.1 += r.exact_match.unwrap_or(0.0);
            e.2 += 1;
            samples = samples.max(e.2);
        }
        lengths.sort_unstable();
        let has_em = rs.iter().any(|r| r.exact_match.is_some());
        let mut header = vec!["mode".to_string()];
        header.extend(lengths.iter().map(|&l| fmt_len(l)));
        header.push("mean".into());
        let rows: Vec<Vec<String>> = labels
            .iter()
            .map(|lab| {
                let mut row = vec![lab.to_string()];
                let (mut tot, mut n) = (0.0, 0usize);
                for &l in &lengths {
                    row.push(match acc.get(&(*lab, l)) {
                        Some((sc, em, k)) => {
                            tot += sc;
                            n += k;
                            if has_em {
                                format!(
                                    "{:.1} / {:.1}",
                                    100.0 * sc / *k as f64,
                                    100.0 * em / *k as f64
                                )
                            } else {
                                format!("{:.1}", 100.0 * sc / *k as f64)
                            }
                        }
                        None => "–".into(),
                    });
                }
                row.push(if n > 0 {
                    format!("{:.1}", 100.0 * tot / n as f64)
                } else {
                    "–".into()
                });
                row
            })
            .collect();
        s.push_str(&format!(
            "**{task}** — {} (×100), up to {samples} sample(s) per cell{}:\n\n{}\n",
            metric_name(rs[0], metric),
            if has_em {
                "; cells are F1 / exact match"
            } else {
                ""
            },
            md_table(&header, &rows)
        ));
    }
    s
}

fn metric_name(r: &CaseRecord, default: &str) -> String {
    if r.exact_match.is_some() {
        "F1".into()
    } else {
        default.into()
    }
}
