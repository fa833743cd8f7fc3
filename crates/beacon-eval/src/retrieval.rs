//! `beacon eval retrieval`: LongChat line retrieval and lost-in-the-middle key-value retrieval (exact
//! match), RULER-style synthetic tasks built from the word lists (multi-key and multi-value needles,
//! variable tracking, common-word extraction; fraction of references recalled), and QA over SQuAD /
//! HotpotQA paragraphs packed with distractors into long contexts (F1 and exact match).

use crate::cases::{self, Case, CaseRecord, Scorer};
use crate::harness::{self, bar, sub_seed, CommonArgs, ModeArgs, Output, Prompt, Tok};
use crate::needle::{key_words, random_key};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::path::Path;

pub const ALL_TASKS: [&str; 8] = [
    "lines",
    "kv",
    "niah_multikey",
    "niah_multivalue",
    "vt",
    "cwe",
    "qa_squad",
    "qa_hotpot",
];

#[derive(clap::Args, Debug, Clone)]
pub struct RetrievalArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub modes: ModeArgs,
    /// Tasks: lines, kv, niah_multikey, niah_multivalue, vt, cwe, qa_squad, qa_hotpot (default all).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Lengths of the synthetic and QA prompts. Default 4K,8K (--quick: 2K).
    #[arg(long, value_delimiter = ',', value_parser = harness::parse_len)]
    pub lengths: Vec<usize>,
    /// LongChat files by line count (200 ≈ 4.8K, 300 ≈ 7K, 500 ≈ 12K LLaMA tokens). Default 200,300 (--quick: 200).
    #[arg(long, value_delimiter = ',')]
    pub lines: Vec<usize>,
    /// Lost-in-the-middle sets by key count: 75 (≈4K tokens), 140 (≈8K). Default 75,140 (--quick: 75).
    #[arg(long, value_delimiter = ',')]
    pub kv_keys: Vec<usize>,
    /// Samples per task and length. Default 5 (--quick: 1); --limit overrides.
    #[arg(long)]
    pub samples: Option<usize>,
    /// Plain prompts even when the model has a chat template.
    #[arg(long)]
    pub no_chat: bool,
    /// Repetition control of the (greedy) answers: none unless asked (`--dry`, `--dry-multiplier`,
    /// `--repeat-penalty`).
    #[command(flatten)]
    pub penalties: beacon::cli_args::PenaltyArgs,
}

/// Pick `n` distinct indices of `0..len`, deterministically.
fn pick(rng: &mut StdRng, len: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    idx.shuffle(rng);
    idx.truncate(n);
    idx
}

#[allow(clippy::too_many_arguments)]
fn case(
    task: &str,
    len: usize,
    sample: usize,
    context: Vec<u32>,
    q: String,
    ap: &str,
    expected: Vec<String>,
    scorer: Scorer,
    max_new: usize,
) -> Case {
    Case {
        task: task.into(),
        target_tokens: len,
        depth: None,
        sample,
        context,
        question: q,
        answer_prefix: ap.into(),
        expected,
        scorer,
        max_new,
    }
}

/// LongChat line retrieval: the prompt as released; the answer's first number must be the line's.
pub fn lines_cases(
    tok: &Tok,
    data: &Path,
    files: &[usize],
    samples: usize,
    seed: u64,
) -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for (fi, &n) in files.iter().enumerate() {
        let all = crate::data::longchat_lines(
            &data.join(format!("eval/longchat_lines/{n}_lines.jsonl")),
        )?;
        let mut rng = StdRng::seed_from_u64(sub_seed(seed, &[10, fi as u64]));
        for (s, i) in pick(&mut rng, all.len(), samples).into_iter().enumerate() {
            let c = &all[i];
            let ctx = tok.encode(&c.prompt)?;
            let len = ctx.len();
            out.push(case(
                "lines",
                len,
                s,
                ctx,
                String::new(),
                "",
                vec![c.expected_number.to_string()],
                Scorer::Number,
                12,
            ));
            let last = out.last_mut().expect("pushed");
            last.target_tokens = c.num_lines; // grid value = line count; prompt_tokens holds the length
        }
    }
    Ok(out)
}

/// Lost in the middle: JSON object of UUID pairs; the value of the asked key must appear in the answer.
pub fn kv_cases(
    tok: &Tok,
    data: &Path,
    keys: &[usize],
    samples: usize,
    seed: u64,
) -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for (ki, &k) in keys.iter().enumerate() {
        let all = crate::data::kv_retrieval(&data.join(format!(
            "eval/lost_in_the_middle/kv-retrieval-{k}_keys.jsonl.gz"
        )))?;
        let mut rng = StdRng::seed_from_u64(sub_seed(seed, &[11, ki as u64]));
        for (s, i) in pick(&mut rng, all.len(), samples).into_iter().enumerate() {
            let c = &all[i];
            let body = c
                .ordered_kv_records
                .iter()
                .map(|(k, v)| format!(" \"{k}\": \"{v}\""))
                .collect::<Vec<_>>()
                .join(",\n");
            let text = format!(
                "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{{\n{body}\n}}"
            );
            let q = format!("\n\nKey: \"{}\"\nCorresponding value:", c.key);
            out.push(case(
                "kv",
                k,
                s,
                tok.encode(&text)?,
                q,
                "",
                vec![c.value.clone()],
                Scorer::Subspan,
                40,
            ));
        }
    }
    Ok(out)
}

/// Haystack sentences (from the essays) as token runs, for filling RULER contexts.
fn essay_tokens(tok: &Tok, data: &Path, max_tokens: usize) -> Result<Vec<u32>> {
    let text = crate::data::haystack(&data.join("haystack/pd_essays_ruler_format.json"))?;
    let text: String = text.chars().take(max_tokens * 8 + 4096).collect();
    tok.encode(&text)
}

/// Fill `n` tokens of haystack with `needles` inserted at random sentence boundaries (in order).
fn fill_with_needles(
    tok: &Tok,
    hay: &[u32],
    n: usize,
    needles: &[Vec<u32>],
    rng: &mut StdRng,
) -> Result<Vec<u32>> {
    let need: usize = needles.iter().map(|x| x.len()).sum();
    let m = n
        .checked_sub(need)
        .context("length too short for the needles")?;
    if m > hay.len() {
        bail!("the haystack has {} tokens, {m} needed", hay.len());
    }
    let hay = &hay[..m];
    let mut cuts: Vec<usize> = (0..needles.len())
        .map(|_| rng.random_range(0..=m))
        .collect();
    cuts.sort_unstable();
    // move each cut back to a sentence boundary
    for c in cuts.iter_mut() {
        let lo = c.saturating_sub(256);
        if let Some(p) = (lo..=*c).rev().find(|&i| {
            i == 0
                || tok
                    .decode(&hay[i - 1..i])
                    .trim_end_matches(' ')
                    .ends_with('.')
        }) {
            *c = p;
        }
    }
    let mut order: Vec<usize> = (0..needles.len()).collect();
    order.shuffle(rng);
    let mut out = Vec::with_capacity(n);
    let mut prev = 0;
    for (j, &c) in cuts.iter().enumerate() {
        out.extend_from_slice(&hay[prev..c]);
        out.extend_from_slice(&needles[order[j]]);
        prev = c;
    }
    out.extend_from_slice(&hay[prev..]);
    Ok(out)
}

fn magic(rng: &mut StdRng) -> String {
    rng.random_range(1_000_000u32..10_000_000).to_string()
}

/// RULER-style synthetic tasks at each length.
#[allow(clippy::too_many_arguments)]
pub fn ruler_cases(
    tok: &Tok,
    chat: bool,
    task: &str,
    data: Option<&Path>,
    hay: &[u32],
    lengths: &[usize],
    samples: usize,
    seed: u64,
) -> Result<Vec<Case>> {
    let words = key_words(data);
    let mut out = Vec::new();
    let tid = harness::str_hash(task);
    for (li, &len) in lengths.iter().enumerate() {
        for s in 0..samples {
            let mut rng = StdRng::seed_from_u64(sub_seed(seed, &[tid, li as u64, s as u64]));
            let intro = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\n";
            let c = match task {
                "niah_multikey" => {
                    // 4 needles with different keys; one is asked.
                    let keys: Vec<String> = (0..4)
                        .map(|_| random_key(&mut rng, &words.0, &words.1))
                        .collect();
                    let vals: Vec<String> = (0..4).map(|_| magic(&mut rng)).collect();
                    let needles: Vec<Vec<u32>> = keys
                        .iter()
                        .zip(&vals)
                        .map(|(k, v)| {
                            tok.encode(&format!(
                                " One of the special magic numbers for {k} is: {v}."
                            ))
                        })
                        .collect::<Result<_>>()?;
                    let q = format!("\n\nWhat is the special magic number for {} mentioned in the provided text?", keys[0]);
                    let ap = format!(
                        "The special magic number for {} mentioned in the provided text is",
                        keys[0]
                    );
                    let intro_ids = tok.encode(intro)?;
                    let n =
                        len.saturating_sub(Prompt::overhead(tok, chat, &q, &ap)? + intro_ids.len());
                    let mut ctx = intro_ids;
                    ctx.extend(fill_with_needles(tok, hay, n, &needles, &mut rng)?);
                    case(
                        task,
                        len,
                        s,
                        ctx,
                        q,
                        &ap,
                        vec![vals[0].clone()],
                        Scorer::Number,
                        16,
                    )
                }
                "niah_multivalue" => {
                    // 4 values for one key; all must be recalled.
                    let key = random_key(&mut rng, &words.0, &words.1);
                    let vals: Vec<String> = (0..4).map(|_| magic(&mut rng)).collect();
                    let needles: Vec<Vec<u32>> = vals
                        .iter()
                        .map(|v| {
                            tok.encode(&format!(
                                " One of the special magic numbers for {key} is: {v}."
                            ))
                        })
                        .collect::<Result<_>>()?;
                    let q = format!("\n\nWhat are all the special magic numbers for {key} mentioned in the provided text?");
                    let ap = format!(
                        "The special magic numbers for {key} mentioned in the provided text are"
                    );
                    let intro_ids = tok.encode(intro)?;
                    let n =
                        len.saturating_sub(Prompt::overhead(tok, chat, &q, &ap)? + intro_ids.len());
                    let mut ctx = intro_ids;
                    ctx.extend(fill_with_needles(tok, hay, n, &needles, &mut rng)?);
                    case(task, len, s, ctx, q, &ap, vals, Scorer::AllRefs, 48)
                }
                "vt" => {
                    // Variable tracking: a chain of 5 assignments hidden in repeated filler.
                    let names: Vec<String> = (0..5)
                        .map(|_| {
                            (0..5)
                                .map(|_| (b'A' + rng.random_range(0..26u8)) as char)
                                .collect()
                        })
                        .collect();
                    let value = rng.random_range(10_000u32..100_000).to_string();
                    let mut lines = vec![format!(" VAR {} = {value}.", names[0])];
                    for w in names.windows(2) {
                        lines.push(format!(" VAR {} = VAR {}.", w[1], w[0]));
                    }
                    let needles: Vec<Vec<u32>> =
                        lines.iter().map(|l| tok.encode(l)).collect::<Result<_>>()?;
                    let q = format!("\n\nQuestion: Find all variables that are assigned the value {value} in the text above.");
                    let ap = format!(" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned the value {value}, they are:");
                    let head = tok.encode("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")?;
                    let filler = tok.encode(" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")?;
                    let n = len.saturating_sub(Prompt::overhead(tok, chat, &q, &ap)? + head.len());
                    let need: usize = needles.iter().map(|x| x.len()).sum();
                    let m = n.saturating_sub(need);
                    let reps = m.div_ceil(filler.len());
                    let hay_f: Vec<u32> = filler
                        .iter()
                        .copied()
                        .cycle()
                        .take(reps * filler.len())
                        .collect();
                    // chain in order, at filler boundaries
                    let mut cuts: Vec<usize> = (0..needles.len())
                        .map(|_| rng.random_range(0..=reps) * filler.len())
                        .collect();
                    cuts.sort_unstable();
                    let hay_f = &hay_f[..m.min(hay_f.len())];
                    let mut ctx = head;
                    let mut prev = 0;
                    for (j, &c) in cuts.iter().enumerate() {
                        let c = c.min(hay_f.len());
                        ctx.extend_from_slice(&hay_f[prev..c]);
                        ctx.extend_from_slice(&needles[j]);
                        prev = c;
                    }
                    ctx.extend_from_slice(&hay_f[prev..]);
                    case(task, len, s, ctx, q, &ap, names, Scorer::AllRefs, 40)
                }
                "cwe" => {
                    // Common words: 10 words × 30 occurrences among others × 3, numbered list.
                    let pool = &words.1;
                    let chosen = pick(&mut rng, pool.len(), pool.len().min(2000));
                    let common: Vec<String> = chosen[..10]
                        .iter()
                        .map(|&i| pool[i].to_lowercase())
                        .collect();
                    let q = "\n\nQuestion: What are the 10 most common words in the above list?"
                        .to_string();
                    let ap = " Answer: The top 10 words that appear most often in the list are:";
                    let head = tok.encode("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n")?;
                    let budget =
                        len.saturating_sub(Prompt::overhead(tok, chat, &q, ap)? + head.len());
                    // grow the list of rare words until the budget is reached
                    let mut list: Vec<String> = common
                        .iter()
                        .flat_map(|w| std::iter::repeat_n(w.clone(), 30))
                        .collect();
                    let mut rare = 10;
                    let mut ctx;
                    loop {
                        let mut l = list.clone();
                        l.shuffle(&mut rng);
                        let text: String = l
                            .iter()
                            .enumerate()
                            .map(|(i, w)| format!("{}. {w}\n", i + 1))
                            .collect();
                        let ids = tok.encode(&text)?;
                        if ids.len() > budget || rare >= chosen.len() {
                            ctx = ids;
                            break;
                        }
                        let add = ((budget - ids.len()) / 18).clamp(1, 200);
                        for &i in &chosen[rare..(rare + add).min(chosen.len())] {
                            list.extend(std::iter::repeat_n(pool[i].to_lowercase(), 3));
                        }
                        rare = (rare + add).min(chosen.len());
                        if ids.len() + 20 > budget {
                            ctx = ids;
                            break;
                        }
                    }
                    ctx.truncate(budget);
                    let mut full = head;
                    full.extend(ctx);
                    case(task, len, s, full, q, ap, common, Scorer::AllRefs, 80)
                }
                other => bail!("unknown RULER task {other}"),
            };
            out.push(c);
        }
    }
    Ok(out)
}

/// QA: the gold paragraph(s) among distractors, filled to the length; F1 against the answers.
#[allow(clippy::too_many_arguments)]
pub fn qa_cases(
    tok: &Tok,
    chat: bool,
    task: &str,
    items: &[crate::data::QaItem],
    pool: &[String],
    lengths: &[usize],
    samples: usize,
    seed: u64,
) -> Result<Vec<Case>> {
    const INSTR: &str = "Answer the question based on the given documents. Only give me the answer and do not output any other words.";
    let mut out = Vec::new();
    let tid = harness::str_hash(task);
    let mut rng0 = StdRng::seed_from_u64(sub_seed(seed, &[tid]));
    let chosen = pick(&mut rng0, items.len(), samples);
    for (li, &len) in lengths.iter().enumerate() {
        for (s, &qi) in chosen.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(sub_seed(seed, &[tid, li as u64, s as u64]));
            let item = &items[qi];
            let q = format!("\n\n{INSTR}\n\nQuestion: {}", item.question);
            let ap = "Answer:";
            let head = tok.encode(&format!(
                "{INSTR}\n\nThe following are given documents.\n\n"
            ))?;
            let budget = len.saturating_sub(Prompt::overhead(tok, chat, &q, ap)? + head.len());
            let mut docs: Vec<Vec<u32>> = item
                .gold
                .iter()
                .map(|g| tok.encode(g))
                .collect::<Result<_>>()?;
            let mut used: usize = docs.iter().map(|d| d.len() + 8).sum();
            let order = pick(&mut rng, pool.len(), pool.len());
            for i in order {
                let p = &pool[i];
                if item.gold.iter().any(|g| g == p) {
                    continue;
                }
                let ids = tok.encode(p)?;
                if used + ids.len() + 8 > budget {
                    if used + 64 > budget {
                        break;
                    }
                    continue;
                }
                used += ids.len() + 8;
                docs.push(ids);
            }
            docs.shuffle(&mut rng);
            let mut ctx = head;
            for (i, d) in docs.iter().enumerate() {
                ctx.extend(tok.encode(&format!("Document {}:\n", i + 1))?);
                ctx.extend_from_slice(d);
                ctx.extend(tok.encode("\n\n")?);
            }
            out.push(case(
                task,
                len,
                s,
                ctx,
                q,
                ap,
                item.answers.clone(),
                Scorer::F1,
                32,
            ));
        }
    }
    Ok(out)
}

pub fn run(args: &RetrievalArgs, command: &str) -> Result<Vec<CaseRecord>> {
    let t_start = std::time::Instant::now();
    let (mut ev, specs) =
        harness::load_with_modes(&args.common, &args.modes, &harness::DEFAULT_MODES)?;
    // truncate@xr / streaming@xr at beacon ×r's measured peak K/V, as in ppl and needle.
    let specs = harness::with_equal_memory(specs, args.modes.equal_memory, true)?;
    ev.sampling = args.penalties.greedy(false)?;
    let quick = args.common.quick;
    let tok = ev.tok();
    let chat = !args.no_chat;
    let data = harness::data_dir(&args.common)?;
    let samples = args
        .common
        .limit
        .or(args.samples)
        .unwrap_or(if quick { 1 } else { 5 })
        .max(1);
    let lengths = harness::lengths_or(&args.lengths, quick, &[2048], &[4096, 8192]);
    let lines = if args.lines.is_empty() {
        if quick {
            vec![200]
        } else {
            vec![200, 300]
        }
    } else {
        args.lines.clone()
    };
    let kv_keys = if args.kv_keys.is_empty() {
        if quick {
            vec![75]
        } else {
            vec![75, 140]
        }
    } else {
        args.kv_keys.clone()
    };
    let tasks: Vec<String> = if args.tasks.is_empty() {
        ALL_TASKS.iter().map(|s| s.to_string()).collect()
    } else {
        args.tasks.clone()
    };
    let lmax = *lengths.last().context("no lengths")?;
    let mut hay: Option<Vec<u32>> = None;
    let mut cases = Vec::new();
    for t in &tasks {
        let t = t.trim();
        match t {
            "lines" => cases.extend(lines_cases(&tok, &data, &lines, samples, args.common.seed)?),
            "kv" => cases.extend(kv_cases(&tok, &data, &kv_keys, samples, args.common.seed)?),
            "niah_multikey" | "niah_multivalue" | "vt" | "cwe" => {
                if hay.is_none() && t.starts_with("niah") {
                    hay = Some(essay_tokens(&tok, &data, lmax)?);
                }
                let h = hay.as_deref().unwrap_or(&[]);
                cases.extend(ruler_cases(
                    &tok,
                    chat,
                    t,
                    Some(&data),
                    h,
                    &lengths,
                    samples,
                    args.common.seed,
                )?);
            }
            "qa_squad" | "qa_hotpot" => {
                let (items, pool) = if t == "qa_squad" {
                    crate::data::squad(&data.join("eval/ruler/squad.json"))?
                } else {
                    crate::data::hotpotqa(&data.join("eval/ruler/hotpotqa_first2000.json"))?
                };
                cases.extend(qa_cases(
                    &tok,
                    chat,
                    t,
                    &items,
                    &pool,
                    &lengths,
                    samples,
                    args.common.seed,
                )?);
            }
            other => bail!(
                "unknown task {other:?} (expected one of {})",
                ALL_TASKS.join(", ")
            ),
        }
    }
    let pb = bar(cases::total_tokens(&tok, chat, &cases, specs.len()), "tok");
    let records = cases::run_cases(&ev, &specs, &cases, chat, args.common.seed, &pb)?;
    pb.finish_and_clear();
    let out = Output {
        common: &args.common,
        name: "retrieval",
        command,
    };
    let md = format!(
        "Greedy answers scored without a judge: `lines` (columns = line count; prompt ≈ 4.8K/7K LLaMA tokens) and `kv` \
         (columns = key count, ≈4K/8K tokens) by exact match; RULER-style tasks by the fraction of expected strings \
         recalled; QA by SQuAD F1 / exact match. Columns elsewhere are prompt tokens.\n\n{}",
        cases::markdown(&records, "exact match / recall")
    );
    out.write(&ev, &records, &md, t_start.elapsed().as_secs_f64())?;
    if !args.common.no_plot && !records.is_empty() {
        plot(&records, &out.png_path(""))?;
    }
    Ok(records)
}

/// Mean score per task and configuration (one line per configuration over the tasks' lengths).
pub fn plot(records: &[CaseRecord], path: &Path) -> Result<()> {
    // score vs task index is not a length axis; plot mean score by prompt length instead.
    let mut labels: Vec<&str> = Vec::new();
    for r in records {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = labels
        .iter()
        .map(|lab| {
            let mut by_len: std::collections::BTreeMap<usize, (f64, usize)> = Default::default();
            for r in records.iter().filter(|r| r.label == *lab) {
                let bucket = r.prompt_tokens.next_power_of_two();
                let e = by_len.entry(bucket).or_default();
                e.0 += r.score;
                e.1 += 1;
            }
            (
                lab.to_string(),
                by_len
                    .into_iter()
                    .map(|(l, (s, n))| (l as f64, 100.0 * s / n as f64))
                    .collect(),
            )
        })
        .collect();
    crate::plot::line_plot(
        path,
        "Retrieval and QA: mean score by prompt length (rounded up to 2^k)",
        "prompt tokens",
        "score ×100",
        &series,
        true,
        false,
        None,
    )
}
