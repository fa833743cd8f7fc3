//! `beacon eval needle`: needle-in-a-haystack (Kamradt's lengths × depths grid, on the public-domain
//! haystack, a RULER-style needle "One of the special magic numbers for KEY is: VALUE." scored by exact
//! match of VALUE) and passkey retrieval (random digits hidden in repeated filler).

use crate::cases::{self, Case, CaseRecord, Scorer};
use crate::harness::{self, bar, sub_seed, CommonArgs, ModeArgs, Output, Prompt, Tok};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// The retrieval tasks of `eval needle` (records carry [`NeedleTask::name`]).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedleTask {
    /// A sentence with a key and a value hidden in essays.
    Needle,
    /// A pass key in repeated filler text.
    Passkey,
}

impl NeedleTask {
    pub fn name(self) -> &'static str {
        match self {
            NeedleTask::Needle => "needle",
            NeedleTask::Passkey => "passkey",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct NeedleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub modes: ModeArgs,
    /// Prompt lengths (tokens). Default 2K,4K,8K,16K (--quick: 1K,4K).
    #[arg(long, value_delimiter = ',', value_parser = harness::parse_len)]
    pub lengths: Vec<usize>,
    /// Needle depths in percent of the context. Default 0,25,50,75,100 (--quick: 0,50,100).
    #[arg(long, value_delimiter = ',')]
    pub depths: Vec<f64>,
    /// Tasks: needle, passkey.
    #[arg(long, value_delimiter = ',', default_value = "needle,passkey")]
    pub tasks: Vec<NeedleTask>,
    /// Samples per (length, depth) cell (different keys/values).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Haystack (`{"text": ...}`). Default: DATA/haystack/pd_essays_ruler_format.json.
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// Tokens generated per answer.
    #[arg(long, default_value_t = 16)]
    pub max_new: usize,
    /// Plain prompts even when the model has a chat template.
    #[arg(long)]
    pub no_chat: bool,
}

/// Insert `needle` into `hay` at `depth` percent, moved back to the nearest position where
/// `boundary(i)` holds (a sentence start) within the first part; depth 0 → front, 100 → end.
pub fn insert_at_depth(
    hay: &[u32],
    needle: &[u32],
    depth: f64,
    boundary: &dyn Fn(usize) -> bool,
) -> (Vec<u32>, usize) {
    let n = hay.len();
    let target = ((depth.clamp(0.0, 100.0) / 100.0) * n as f64).round() as usize;
    let mut pos = target.min(n);
    if pos > 0 && pos < n {
        let lo = pos.saturating_sub(512);
        if let Some(p) = (lo..=pos).rev().find(|&i| i == 0 || boundary(i)) {
            pos = p;
        }
    }
    let mut out = Vec::with_capacity(n + needle.len());
    out.extend_from_slice(&hay[..pos]);
    out.extend_from_slice(needle);
    out.extend_from_slice(&hay[pos..]);
    (out, pos)
}

const NIAH_INTRO: &str = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\n";
const PASSKEY_INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.";
const FILLER: &str =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// A few keys when the word lists are absent.
const FALLBACK_WORDS: [&str; 16] = [
    "amber", "lantern", "quiet", "harbor", "silver", "meadow", "brisk", "falcon", "velvet",
    "orchard", "rapid", "cinder", "gentle", "summit", "hollow", "willow",
];

pub fn key_words(data: Option<&std::path::Path>) -> (Vec<String>, Vec<String>) {
    let load = |name: &str| -> Option<Vec<String>> {
        let d = data?;
        crate::data::words(&d.join("eval/ruler/wonderwords").join(name))
            .ok()
            .filter(|w| !w.is_empty())
    };
    let fb: Vec<String> = FALLBACK_WORDS.iter().map(|s| s.to_string()).collect();
    (
        load("adjectivelist.txt").unwrap_or_else(|| fb.clone()),
        load("nounlist.txt").unwrap_or(fb),
    )
}

pub fn random_key(rng: &mut StdRng, adj: &[String], noun: &[String]) -> String {
    format!(
        "{}-{}",
        adj[rng.random_range(0..adj.len())].to_lowercase(),
        noun[rng.random_range(0..noun.len())].to_lowercase()
    )
}

/// Haystack tokens sized for `total` prompt tokens, given the frame overhead.
fn budget(total: usize, overhead: usize, extra: usize) -> Result<usize> {
    total
        .checked_sub(overhead + extra)
        .filter(|&n| n > 0)
        .with_context(|| {
            format!(
                "length {total} is too short for the prompt ({} tokens of frame)",
                overhead + extra
            )
        })
}

/// Needle cases over the grid.
#[allow(clippy::too_many_arguments)]
pub fn needle_cases(
    tok: &Tok,
    chat: bool,
    hay_ids: &[u32],
    lengths: &[usize],
    depths: &[f64],
    samples: usize,
    words: &(Vec<String>, Vec<String>),
    seed: u64,
    max_new: usize,
) -> Result<Vec<Case>> {
    let intro = tok.encode(NIAH_INTRO)?;
    let is_boundary = |i: usize| -> bool {
        let prev = tok.decode(&hay_ids[i - 1..i]);
        prev.ends_with('.') || prev.ends_with(".\n") || prev.ends_with('\n')
    };
    let mut cases = Vec::new();
    for (li, &len) in lengths.iter().enumerate() {
        for (di, &depth) in depths.iter().enumerate() {
            for s in 0..samples {
                let mut rng =
                    StdRng::seed_from_u64(sub_seed(seed, &[1, li as u64, di as u64, s as u64]));
                let key = random_key(&mut rng, &words.0, &words.1);
                let value = rng.random_range(1_000_000u32..10_000_000).to_string();
                let needle = tok.encode(&format!(
                    " One of the special magic numbers for {key} is: {value}."
                ))?;
                let question = format!("\n\nWhat is the special magic number for {key} mentioned in the provided text?");
                let answer_prefix =
                    format!("The special magic number for {key} mentioned in the provided text is");
                let overhead = Prompt::overhead(tok, chat, &question, &answer_prefix)?;
                let n = budget(len, overhead, intro.len() + needle.len())?;
                if n > hay_ids.len() {
                    bail!(
                        "the haystack has {} tokens, {} needed for length {len}",
                        hay_ids.len(),
                        n
                    );
                }
                let (with, _) = insert_at_depth(&hay_ids[..n], &needle, depth, &is_boundary);
                let mut context = intro.clone();
                context.extend(with);
                cases.push(Case {
                    task: NeedleTask::Needle.name().into(),
                    target_tokens: len,
                    depth: Some(depth),
                    sample: s,
                    context,
                    question,
                    answer_prefix,
                    expected: vec![value],
                    scorer: Scorer::Number,
                    max_new,
                });
            }
        }
    }
    Ok(cases)
}

/// Passkey cases over the grid.
pub fn passkey_cases(
    tok: &Tok,
    chat: bool,
    lengths: &[usize],
    depths: &[f64],
    samples: usize,
    seed: u64,
    max_new: usize,
) -> Result<Vec<Case>> {
    let intro = tok.encode(PASSKEY_INTRO)?;
    let filler = tok.encode(FILLER)?;
    let mut cases = Vec::new();
    for (li, &len) in lengths.iter().enumerate() {
        for (di, &depth) in depths.iter().enumerate() {
            for s in 0..samples {
                let mut rng =
                    StdRng::seed_from_u64(sub_seed(seed, &[2, li as u64, di as u64, s as u64]));
                let key = rng.random_range(10_000u32..100_000).to_string();
                let line = tok.encode(&format!(
                    " The pass key is {key}. Remember it. {key} is the pass key."
                ))?;
                let question = " What is the pass key?".to_string();
                let answer_prefix = "The pass key is".to_string();
                let overhead = Prompt::overhead(tok, chat, &question, &answer_prefix)?;
                let n = budget(len, overhead, intro.len() + line.len())?;
                let reps = n.div_ceil(filler.len().max(1));
                let hay: Vec<u32> = filler
                    .iter()
                    .copied()
                    .cycle()
                    .take(reps * filler.len())
                    .collect();
                let hay = &hay[..n];
                let fl = filler.len();
                let (with, _) = insert_at_depth(hay, &line, depth, &|i| i % fl == 0);
                let mut context = intro.clone();
                context.extend(with);
                cases.push(Case {
                    task: NeedleTask::Passkey.name().into(),
                    target_tokens: len,
                    depth: Some(depth),
                    sample: s,
                    context,
                    question,
                    answer_prefix,
                    expected: vec![key],
                    scorer: Scorer::Number,
                    max_new,
                });
            }
        }
    }
    Ok(cases)
}

pub fn run(args: &NeedleArgs, command: &str) -> Result<Vec<CaseRecord>> {
    let t_start = std::time::Instant::now();
    let (ev, specs) = harness::load_with_modes(&args.common, &args.modes, &harness::DEFAULT_MODES)?;
    let specs = harness::with_equal_memory(specs, args.modes.equal_memory, true)?;
    let quick = args.common.quick;
    let lengths = harness::lengths_or(
        &args.lengths,
        quick,
        &[1024, 4096],
        &[2048, 4096, 8192, 16384],
    );
    let depths = if args.depths.is_empty() {
        if quick {
            vec![0.0, 50.0, 100.0]
        } else {
            vec![0.0, 25.0, 50.0, 75.0, 100.0]
        }
    } else {
        args.depths.clone()
    };
    let samples = args.common.limit.unwrap_or(args.samples).max(1);
    let tok = ev.tok();
    let chat = !args.no_chat;
    let data = harness::data_dir(&args.common).ok();
    let lmax = *lengths.last().context("no lengths")?;
    let mut cases = Vec::new();
    for task in &args.tasks {
        match task {
            NeedleTask::Needle => {
                let hp = match (&args.haystack, &data) {
                    (Some(p), _) => p.clone(),
                    (None, Some(d)) => d.join("haystack/pd_essays_ruler_format.json"),
                    (None, None) => bail!("no haystack: pass --haystack FILE or --data DIR"),
                };
                let text = crate::data::haystack(&hp)?;
                let text: String = text.chars().take(lmax * 8 + 4096).collect();
                let hay_ids = tok.encode(&text)?;
                let words = key_words(data.as_deref());
                cases.extend(needle_cases(
                    &tok,
                    chat,
                    &hay_ids,
                    &lengths,
                    &depths,
                    samples,
                    &words,
                    args.common.seed,
                    args.max_new,
                )?);
            }
            NeedleTask::Passkey => cases.extend(passkey_cases(
                &tok,
                chat,
                &lengths,
                &depths,
                samples,
                args.common.seed,
                args.max_new,
            )?),
        }
    }
    let pb = bar(cases::total_tokens(&tok, chat, &cases, specs.len()), "tok");
    let records = cases::run_cases(&ev, &specs, &cases, chat, args.common.seed, &pb)?;
    pb.finish_and_clear();
    let out = Output {
        common: &args.common,
        name: "needle",
        command,
    };
    let md = format!(
        "Exact match of the needle's value (the first number of the greedy answer), ×100, averaged over depths {:?} %. \
         A column L is a prompt of L − 64 tokens (room for the answer). Heat-maps: `needle.png`, `needle_passkey.png`.\n\n{}",
        depths,
        cases::markdown(&records, "exact match")
    );
    out.write(&ev, &records, &md, t_start.elapsed().as_secs_f64())?;
    if !args.common.no_plot {
        plot_tasks(&records, |suffix| out.png_path(suffix))?;
    }
    Ok(records)
}

/// One heat-map file per task in `records` (`needle.png`, `needle_passkey.png`), over the lengths
/// and depths the records hold; `png(suffix)` names the file. Used after a run and by `eval report`.
pub fn plot_tasks(records: &[CaseRecord], png: impl Fn(&str) -> std::path::PathBuf) -> Result<()> {
    for task in [NeedleTask::Needle, NeedleTask::Passkey].map(NeedleTask::name) {
        let rs: Vec<&CaseRecord> = records.iter().filter(|r| r.task == task).collect();
        if rs.is_empty() {
            continue;
        }
        let mut lengths: Vec<usize> = rs.iter().map(|r| r.context_tokens).collect();
        lengths.sort_unstable();
        lengths.dedup();
        let mut depths: Vec<f64> = rs.iter().filter_map(|r| r.depth).collect();
        depths.sort_by(|a, b| a.total_cmp(b));
        depths.dedup();
        let suffix = match task {
            "needle" => String::new(),
            _ => format!("_{task}"),
        };
        plot(&rs, &lengths, &depths, &png(&suffix), task)?;
    }
    Ok(())
}

/// Heat-maps, one panel per configuration.
pub fn plot(
    records: &[&CaseRecord],
    lengths: &[usize],
    depths: &[f64],
    path: &std::path::Path,
    task: &str,
) -> Result<()> {
    let mut labels: Vec<&str> = Vec::new();
    for r in records {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    let panels: Vec<crate::plot::Heatmap> = labels
        .iter()
        .map(|lab| {
            let values = depths
                .iter()
                .map(|&d| {
                    lengths
                        .iter()
                        .map(|&l| {
                            let v: Vec<f64> = records
                                .iter()
                                .filter(|r| {
                                    r.label == *lab && r.context_tokens == l && r.depth == Some(d)
                                })
                                .map(|r| r.score)
                                .collect();
                            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
                        })
                        .collect()
                })
                .collect();
            crate::plot::Heatmap {
                title: lab.to_string(),
                lengths: lengths.to_vec(),
                depths: depths.to_vec(),
                values,
            }
        })
        .collect();
    crate::plot::heatmaps(
        path,
        &format!("{task}: exact match (%) by depth × length"),
        &panels,
    )
}
