//! `beacon eval ppl`: perplexity of a fixed scored span after reading a preceding context of each
//! length, for every engine mode.
//!
//! For a text and a largest length `Lmax`, the scored span is the tokens `[Lmax − S, Lmax)`; at
//! length `L` the model first reads `[Lmax − L, Lmax − S)` and then the span, so every length scores
//! the *same* tokens and only the amount of context differs. `context_tokens` is `L` (context + span).

use crate::harness::{
    self, bar, fmt_len, logit_rows, md_table, CommonArgs, EvalMode, ModeArgs, ModeSpec, Output,
};
use anyhow::{bail, Context, Result};
use beacon::model::Model;
use beacon::session::{FeedOptions, Session, Want};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct PplArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub modes: ModeArgs,
    /// Text files to score: `--text a b c` or `--text a --text b` (default: held-out books; 2, or 1
    /// with --quick).
    #[arg(long = "text", num_args = 1..)]
    pub text: Vec<PathBuf>,
    /// Total tokens read (context + scored span). Default 2K,4K,8K,16K,32K,64K (--quick: 2K,4K,8K,16K).
    #[arg(long, value_delimiter = ',', value_parser = harness::parse_len)]
    pub lengths: Vec<usize>,
    /// Tokens of the scored span.
    #[arg(long, default_value_t = 1024)]
    pub scored: usize,
    /// The span is fed in pieces of this many tokens (one logits matrix each).
    #[arg(long, default_value_t = 128)]
    pub piece: usize,
    /// Read each text at this many places: the first at its start (as with 1), the others spread
    /// evenly to its end, each named `file@offset` (token offset) and pooled like separate files.
    /// One span of 1,024 tokens per book is a narrow sample: checkpoints that rank one way on book
    /// starts ranked the other way on ten mid-book spans (docs/TRAINING.md).
    #[arg(long, default_value_t = 1)]
    pub spans: usize,
}

/// One perplexity measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PplRecord {
    pub mode: EvalMode,
    pub ratio: Option<String>,
    /// K/V tokens kept (truncate: tokens read; streaming: recent entries besides its 4 sink entries).
    pub keep: Option<usize>,
    pub label: String,
    pub context_tokens: usize,
    pub scored_tokens: usize,
    pub ppl: f64,
    /// Sum of the negative log-likelihoods (nats).
    pub nll: f64,
    pub file: String,
    pub beacon_weights: String,
    pub seconds: f64,
    pub peak_kv_bytes: usize,
    /// K/V full attention holds for the same tokens.
    pub full_kv_bytes: usize,
    /// The measurement is identical to another configuration's (no eviction/truncation at this length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_as: Option<String>,
    /// The model's native window.
    #[serde(default)]
    pub native_window: Option<usize>,
    /// Equal-memory baselines: the beacon configuration whose peak K/V they match (`beacon-x8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_of: Option<String>,
    /// Equal-memory baselines: K/V entries allowed (that beacon run's peak K/V bytes / bytes per entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_entries: Option<usize>,
    /// Perplexity by position in the beacon window (see [`by_window_position`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_window_position: Option<Vec<PositionBucket>>,
}

/// −log softmax(logits)[target], in nats.
pub fn nll_of(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - logits[target as usize] as f64
}

/// exp(mean NLL).
pub fn perplexity(nll_sum: f64, count: usize) -> f64 {
    if count == 0 {
        f64::NAN
    } else {
        (nll_sum / count as f64).exp()
    }
}

/// Read `context` (one feed), then score `span` token by token in pieces: the logits of raw token t
/// predict token t+1, and the last logits of a piece predict the first token of the next. Returns
/// (NLL sum, tokens scored): all of `span` when `context` is non-empty, else all but its first token.
pub fn score_span(
    model: &Model,
    session: &mut Session,
    context: &[u32],
    span: &[u32],
    piece: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<(f64, usize)> {
    let per_token = score_span_tokens(model, session, context, span, piece, progress)?;
    Ok((per_token.iter().map(|&(_, l)| l).sum(), per_token.len()))
}

/// `(index in the span, NLL in nats)` of every scored token, in order.
pub type ScoredTokens = Vec<(usize, f64)>;

/// [`score_span`] token by token.
pub fn score_span_tokens(
    model: &Model,
    session: &mut Session,
    context: &[u32],
    span: &[u32],
    piece: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<ScoredTokens> {
    let piece = piece.max(1);
    let mut prev: Option<Vec<f32>> = None;
    let mut done = 0usize;
    if !context.is_empty() {
        let l = session
            .feed_with(
                model,
                context,
                Want::Last,
                FeedOptions::default(),
                &mut |d| progress(d),
            )?
            .context("the context produced no logits")?;
        prev = logit_rows(&l)?.pop();
        done = context.len();
        progress(done);
    }
    let mut scored = Vec::with_capacity(span.len());
    let mut at = 0usize; // span index of chunk[0]
    for chunk in span.chunks(piece) {
        let l = session
            .feed(model, chunk, Want::From(0))?
            .context("a span piece produced no logits")?;
        let rows = logit_rows(&l)?;
        if rows.len() != chunk.len() {
            bail!(
                "expected {} logit rows for the piece, got {}",
                chunk.len(),
                rows.len()
            );
        }
        if let Some(p) = prev.take() {
            scored.push((at, nll_of(&p, chunk[0])));
        }
        for (r, row) in rows.iter().enumerate().take(chunk.len() - 1) {
            scored.push((at + r + 1, nll_of(row, chunk[r + 1])));
        }
        prev = rows.into_iter().last();
        at += chunk.len();
        done += chunk.len();
        progress(done);
    }
    Ok(scored)
}

/// Where a scored token sits in its beacon window decides how much raw context it has in beacon
/// mode (right after a window closes: only the memory). Bucket edges, in window positions.
pub const WINDOW_POSITION_EDGES: [usize; 4] = [0, 8, 32, 128];

/// Perplexity of the tokens whose position in the beacon window (counted from the start of the
/// read, as beacon mode counts) falls in each bucket `[edge_i, edge_{i+1})` (the last up to the
/// window), for any mode, so a beacon run and a baseline are compared token for token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PositionBucket {
    pub from: usize,
    pub to: usize,
    pub tokens: usize,
    pub ppl: f64,
}

/// Bucket `(index in span, NLL)` pairs; `span_offset` = tokens read before the span.
pub fn by_window_position(
    scored: &[(usize, f64)],
    span_offset: usize,
    window: usize,
) -> Vec<PositionBucket> {
    let mut edges: Vec<usize> = WINDOW_POSITION_EDGES
        .iter()
        .copied()
        .filter(|&e| e < window)
        .collect();
    edges.push(window);
    edges
        .windows(2)
        .map(|e| {
            let (n, sum) = scored
                .iter()
                .filter(|(i, _)| (e[0]..e[1]).contains(&((span_offset + i) % window)))
                .fold((0usize, 0f64), |(n, s), (_, l)| (n + 1, s + l));
            PositionBucket {
                from: e[0],
                to: e[1],
                tokens: n,
                ppl: perplexity(sum, n),
            }
        })
        .collect()
}

/// The context a configuration reads before the span: truncate keeps only what fits `keep` together
/// with the span (so the model never sees more than `keep` tokens); the others read all of it.
pub fn context_for<'a>(
    spec: &ModeSpec,
    native: usize,
    context: &'a [u32],
    scored: usize,
) -> &'a [u32] {
    if spec.mode == EvalMode::Truncate {
        let keep = spec.keep.unwrap_or(native);
        let n = keep.saturating_sub(scored).min(context.len());
        &context[context.len() - n..]
    } else {
        context
    }
}

/// Truncation that cannot hold the whole scored span within its keep (`truncate-N` with N below
/// the span, and every equal-memory `truncate@xr`) is scored piece by piece, each piece from a fresh
/// read of the last `keep` tokens up to its end ([`score_span_rolling`]): its K/V never exceeds
/// `keep` entries and every scored token sees at least `keep − piece` tokens before it. Returns that
/// keep, or None for a single read.
pub fn rolling_keep(spec: &ModeSpec, scored: usize) -> Option<usize> {
    if spec.mode != EvalMode::Truncate {
        return None;
    }
    let keep = spec.keep?;
    (spec.equal_memory.is_some() || keep < scored).then_some(keep)
}

/// Score `all[span_start..]` in pieces of at most `piece` tokens (at most half of `keep`), each from a
/// fresh session (`fresh`) that reads the `keep` tokens ending with the piece: the piece and what
/// precedes it. Returns ((index from `span_start`, NLL) of every scored token, largest peak K/V
/// bytes, bytes per entry). The first token of `all` is never scored (nothing predicts it).
pub fn score_span_rolling(
    model: &Model,
    fresh: &mut dyn FnMut() -> Result<Session>,
    all: &[u32],
    span_start: usize,
    keep: usize,
    piece: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<(ScoredTokens, usize, usize)> {
    if keep < 2 {
        bail!("truncation to {keep} tokens leaves nothing to predict from");
    }
    let piece = piece.min(keep / 2).max(1);
    let (mut scored, mut peak, mut bpe) = (Vec::new(), 0usize, 0usize);
    let mut p = span_start;
    while p < all.len() {
        let end = (p + piece).min(all.len());
        let from = end.saturating_sub(keep);
        let mut session = fresh()?;
        let piece_scored = score_span_tokens(
            model,
            &mut session,
            &all[from..p],
            &all[p..end],
            piece,
            &mut |_| {},
        )?;
        scored.extend(
            piece_scored
                .into_iter()
                .map(|(i, l)| (p - span_start + i, l)),
        );
        peak = peak.max(session.stats().peak_kv_bytes);
        bpe = session.bytes_per_entry();
        p = end;
        progress(p - span_start);
    }
    Ok((scored, peak, bpe))
}

/// Whether the configuration behaves exactly as full attention for `total` tokens.
fn same_as_full(spec: &ModeSpec, native: usize, total: usize) -> bool {
    match spec.keep_limit(native) {
        // streaming evicts only when sink + recent is exceeded (sink ≥ 1); truncate cuts beyond keep
        Some(k) => total <= k,
        None => false,
    }
}

pub fn default_lengths(quick: bool) -> Vec<usize> {
    if quick {
        vec![2048, 4096, 8192, 16384]
    } else {
        vec![2048, 4096, 8192, 16384, 32768, 65536]
    }
}

pub fn run(args: &PplArgs, command: &str) -> Result<Vec<PplRecord>> {
    let t_start = std::time::Instant::now();
    let (ev, specs) = harness::load_with_modes(&args.common, &args.modes, &harness::DEFAULT_MODES)?;
    let specs = harness::with_equal_memory(specs, args.modes.equal_memory, true)?;
    let lengths = harness::lengths_or(
        &args.lengths,
        args.common.quick,
        &default_lengths(true),
        &default_lengths(false),
    );
    let scored = args.scored;
    if lengths.first().is_some_and(|&l| l < scored) {
        bail!("every length must be ≥ the scored span ({scored} tokens)");
    }
    let files: Vec<PathBuf> = if args.text.is_empty() {
        let data = harness::data_dir(&args.common)?;
        let n = args
            .common
            .limit
            .unwrap_or(if args.common.quick { 1 } else { 2 });
        crate::data::held_out_paths(&data)
            .into_iter()
            .take(n)
            .collect()
    } else {
        args.text
            .iter()
            .take(args.common.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    };
    let lmax = *lengths.last().context("no lengths")?;
    let tok = ev.tok();
    // Tokenize each file once (enough characters for the longest length; ~4 chars a token).
    if args.spans == 0 {
        bail!("--spans must be at least 1");
    }
    let mut texts = Vec::new();
    for f in &files {
        // One span: only the start of the text is needed; several: all of it.
        let chars = if args.spans > 1 {
            usize::MAX
        } else {
            lmax * 8 + 4096
        };
        let text = crate::data::read_prefix(f, chars)?;
        let ids = tok
            .encode(&text)
            .with_context(|| format!("tokenizing {}", f.display()))?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        texts.extend(spans_of(name, ids, lmax, args.spans));
    }
    let total: u64 = texts
        .iter()
        .map(|(_, ids)| {
            lengths
                .iter()
                .filter(|&&l| l <= ids.len())
                .map(|&l| l as u64)
                .sum::<u64>()
                * specs.len() as u64
        })
        .sum();
    let pb = bar(total, "tok");
    let model = &ev.loaded.model;
    let mut records: Vec<PplRecord> = Vec::new();
    for (name, ids) in &texts {
        // The longest length this file allows fixes the scored span.
        let top = lengths.iter().copied().filter(|&l| l <= ids.len()).max();
        let Some(top) = top else {
            eprintln!(
                "warning: {name} has {} tokens, fewer than the shortest length; skipped",
                ids.len()
            );
            continue;
        };
        if top < lmax {
            eprintln!(
                "warning: {name} has {} tokens; lengths above {} skipped",
                ids.len(),
                fmt_len(top)
            );
        }
        let window = &ids[..top];
        let span = &window[top - scored..];
        for &len in lengths.iter().filter(|&&l| l <= top) {
            let context = &window[top - len..top - scored];
            let mut full_result: Option<PplRecord> = None;
            let mut budgets = harness::MemoryBudgets::default();
            for spec in &specs {
                // equal-memory baselines take their keep from this length's beacon run
                let (spec, memory_entries) = budgets.resolve(spec)?;
                let spec = &spec;
                let label = spec.label(ev.native);
                pb.set_message(format!("{name} {} {label}", fmt_len(len)));
                let base = pb.position();
                if let (true, Some(full)) = (same_as_full(spec, ev.native, len), &full_result) {
                    let mut r = full.clone();
                    r.mode = spec.mode;
                    r.ratio = spec.ratio.clone();
                    r.keep = Some(spec.keep.unwrap_or(ev.native));
                    r.label = label;
                    r.same_as = Some("full".into());
                    r.memory_of = spec.memory_of();
                    r.memory_entries = memory_entries;
                    records.push(r);
                    pb.set_position(base + len as u64);
                    continue;
                }
                if spec.streaming_too_small(ev.native) {
                    harness::say(
                        &pb,
                        format!(
                            "{name:>12} {:>5} {label:<18} skipped: streaming needs more than 64 kept entries (got {})",
                            fmt_len(len),
                            spec.keep.unwrap_or(ev.native)
                        ),
                    );
                    pb.set_position(base + len as u64);
                    continue;
                }
                let t0 = std::time::Instant::now();
                let (per_token, peak_kv_bytes, bytes_per_entry) = match rolling_keep(spec, scored) {
                    // truncation under a budget smaller than what it must score: re-read per piece
                    Some(keep) => {
                        let read = &window[top - len..top];
                        let skipped = (len - scored) as u64;
                        let mut fresh = || spec.session(&ev, args.common.seed);
                        score_span_rolling(
                            model,
                            &mut fresh,
                            read,
                            len - scored,
                            keep,
                            args.piece,
                            &mut |d| pb.set_position(base + skipped + d as u64),
                        )?
                    }
                    None => {
                        let ctx = context_for(spec, ev.native, context, scored);
                        let mut session = spec.session(&ev, args.common.seed)?;
                        let skipped = (context.len() - ctx.len()) as u64;
                        let per_token = score_span_tokens(
                            model,
                            &mut session,
                            ctx,
                            span,
                            args.piece,
                            &mut |d| pb.set_position(base + skipped + d as u64),
                        )?;
                        budgets.note(spec, &session);
                        let bpe = session.bytes_per_entry();
                        (per_token, session.stats().peak_kv_bytes, bpe)
                    }
                };
                let nll: f64 = per_token.iter().map(|&(_, l)| l).sum();
                let n = per_token.len();
                let rec = PplRecord {
                    mode: spec.mode,
                    ratio: spec.ratio.clone(),
                    keep: spec.keep_limit(ev.native),
                    label,
                    context_tokens: len,
                    scored_tokens: n,
                    ppl: perplexity(nll, n),
                    nll,
                    file: name.clone(),
                    beacon_weights: ev.weights.clone(),
                    seconds: t0.elapsed().as_secs_f64(),
                    peak_kv_bytes,
                    full_kv_bytes: len * bytes_per_entry,
                    same_as: None,
                    native_window: Some(ev.native),
                    memory_of: spec.memory_of(),
                    memory_entries,
                    by_window_position: Some(by_window_position(
                        &per_token,
                        len - scored,
                        ev.beacon_window(spec),
                    )),
                };
                pb.set_position(base + len as u64);
                harness::say(
                    &pb,
                    format!(
                        "{name:>12} {:>5} {:<18} ppl {:>9.3}  {:.1}s",
                        fmt_len(len),
                        rec.label,
                        rec.ppl,
                        rec.seconds
                    ),
                );
                if spec.mode == EvalMode::Full {
                    full_result = Some(rec.clone());
                }
                records.push(rec);
            }
        }
    }
    pb.finish_and_clear();
    let out = Output {
        common: &args.common,
        name: "ppl",
        command,
    };
    let md = markdown(&records, ev.native, scored);
    out.write(&ev, &records, &md, t_start.elapsed().as_secs_f64())?;
    if !args.common.no_plot && !records.is_empty() {
        plot(&records, &out.png_path(""), ev.native)?;
        plot_ratio(&records, &out.png_path("_ratio"))?;
    }
    Ok(records)
}

/// `count` reads of `lmax` tokens from one text: the first at its start, the others spread evenly
/// to its end, named `name@offset`; a text too short for several keeps only its start.
pub fn spans_of(name: String, ids: Vec<u32>, lmax: usize, count: usize) -> Vec<(String, Vec<u32>)> {
    if count <= 1 || ids.len() < lmax {
        if count > 1 {
            eprintln!(
                "warning: {name} has {} tokens, fewer than {}: one span only",
                ids.len(),
                fmt_len(lmax)
            );
        }
        return vec![(name, ids)];
    }
    let room = ids.len() - lmax;
    (0..count)
        .map(|j| {
            let start = j * room / (count - 1);
            (format!("{name}@{start}"), ids[start..start + lmax].to_vec())
        })
        .collect()
}

pub type Pooled = (Vec<String>, Vec<usize>, BTreeMap<(String, usize), f64>);

/// Pooled perplexity per (label, length) over files: exp(Σ nll / Σ n); labels and lengths in order.
pub fn pooled(records: &[PplRecord]) -> Pooled {
    let mut labels: Vec<String> = Vec::new();
    let mut lengths: Vec<usize> = Vec::new();
    let mut acc: BTreeMap<(String, usize), (f64, usize)> = BTreeMap::new();
    for r in records {
        if !labels.contains(&r.label) {
            labels.push(r.label.clone());
        }
        if !lengths.contains(&r.context_tokens) {
            lengths.push(r.context_tokens);
        }
        let e = acc.entry((r.label.clone(), r.context_tokens)).or_default();
        e.0 += r.nll;
        e.1 += r.scored_tokens;
    }
    lengths.sort_unstable();
    let map = acc
        .into_iter()
        .map(|(k, (nll, n))| (k, perplexity(nll, n)))
        .collect();
    (labels, lengths, map)
}

pub fn markdown(records: &[PplRecord], native: usize, scored: usize) -> String {
    let (labels, lengths, map) = pooled(records);
    let mut files: Vec<&str> = records.iter().map(|r| r.file.as_str()).collect();
    files.sort_unstable();
    files.dedup();
    let mut header = vec!["mode".to_string()];
    header.extend(lengths.iter().map(|&l| fmt_len(l)));
    let rows: Vec<Vec<String>> = labels
        .iter()
        .map(|lab| {
            let mut row = vec![lab.clone()];
            for &l in &lengths {
                row.push(
                    map.get(&(lab.clone(), l))
                        .map(|p| format!("{p:.2}"))
                        .unwrap_or_else(|| "–".into()),
                );
            }
            row
        })
        .collect();
    let mut kv_rows: Vec<Vec<String>> = Vec::new();
    for lab in &labels {
        let mut row = vec![lab.clone()];
        for &l in &lengths {
            let v = records
                .iter()
                .find(|r| &r.label == lab && r.context_tokens == l);
            row.push(
                v.map(|r| format!("{:.0}", r.peak_kv_bytes as f64 / (1 << 20) as f64))
                    .unwrap_or_else(|| "–".into()),
            );
        }
        kv_rows.push(row);
    }
    // Equal-memory baselines: the K/V entries each was allowed, per length.
    let mut budget_rows: Vec<Vec<String>> = Vec::new();
    for lab in &labels {
        let recs: Vec<&PplRecord> = records.iter().filter(|r| &r.label == lab).collect();
        let Some(of) = recs.iter().find_map(|r| r.memory_of.clone()) else {
            continue;
        };
        let mut row = vec![format!("{lab} (= {of})")];
        for &l in &lengths {
            row.push(
                recs.iter()
                    .find(|r| r.context_tokens == l)
                    .and_then(|r| r.memory_entries)
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "–".into()),
            );
        }
        budget_rows.push(row);
    }
    let budgets = if budget_rows.is_empty() {
        String::new()
    } else {
        format!(
            "\nEqual-memory budgets (K/V entries: the peak beacon ×r held at that length, its peak K/V bytes / bytes \
             per entry; `truncate@xr` holds at most that many tokens, `streaming@xr` keeps 4 sink + the rest recent):\n\n{}",
            md_table(&header, &budget_rows)
        )
    };
    let positions = position_table(records, &labels, &lengths);
    let weights: Vec<&str> = {
        let mut w: Vec<&str> = records.iter().map(|r| r.beacon_weights.as_str()).collect();
        w.sort_unstable();
        w.dedup();
        w
    };
    format!(
        "Perplexity of the same last {scored} tokens after reading the preceding context, pooled over {} \
         ({}); the column is the total tokens read. Beacon weights: {}. The native window is {}; `full` beyond it \
         extrapolates positions. `window-only` keeps the sink and the open beacon window only (no memory of \
         closed windows). `truncate-N` reads only the last N tokens; `streaming-N` keeps 4 sink + N recent \
         entries; `truncate@xr` / `streaming@xr` hold as many K/V entries as `beacon-xr` at its peak at the same \
         length; `truncate@xr` (and `truncate-N` with N below the scored span) scores the span piece by piece, \
         each piece after a fresh read of the last N tokens up to its end.\n\n{}\n\
         Peak K/V held (MiB):\n\n{}{}{}",
        if files.len() == 1 { "1 text".to_string() } else { format!("{} texts", files.len()) },
        files.join(", "),
        weights.join("; "),
        fmt_len(native),
        md_table(&header, &rows),
        md_table(&header, &kv_rows),
        budgets,
        positions
    )
}

/// The scored tokens split by their position in the beacon window (pooled over files): where a
/// method loses — right after a window closes, beacon mode has only the memory as recent context.
fn position_table(records: &[PplRecord], labels: &[String], lengths: &[usize]) -> String {
    let Some(edges) = records
        .iter()
        .find_map(|r| r.by_window_position.as_ref())
        .map(|b| b.iter().map(|x| (x.from, x.to)).collect::<Vec<_>>())
    else {
        return String::new();
    };
    let mut header = vec!["mode @ length".to_string()];
    header.extend(edges.iter().map(|(a, b)| format!("{a}–{}", b - 1)));
    let mut rows = Vec::new();
    for &len in lengths {
        for lab in labels {
            let mut sums = vec![(0usize, 0f64); edges.len()];
            for r in records
                .iter()
                .filter(|r| &r.label == lab && r.context_tokens == len)
            {
                for (k, b) in r.by_window_position.iter().flatten().enumerate() {
                    if k < sums.len() && (b.from, b.to) == edges[k] {
                        sums[k].0 += b.tokens;
                        sums[k].1 += b.ppl.ln() * b.tokens as f64;
                    }
                }
            }
            if sums.iter().all(|s| s.0 == 0) {
                continue;
            }
            let mut row = vec![format!("{lab} @ {}", fmt_len(len))];
            row.extend(sums.iter().map(|&(n, l)| {
                if n == 0 {
                    "–".into()
                } else {
                    format!("{:.2} ({n})", (l / n as f64).exp())
                }
            }));
            rows.push(row);
        }
    }
    format!(
        "\nPerplexity by position of the scored token in its beacon window (counted from the start of \
         the read as beacon mode counts; tokens in parentheses) — the same tokens for every mode:\n\n{}",
        md_table(&header, &rows)
    )
}

/// Perplexity against the beacon ratio (log₂ x), one colour per length: beacon at each integer
/// ratio (solid, dots), the equal-memory truncate@xr (crosses) and streaming@xr (triangles, dashed),
/// and full and window-only as flat lines (dashed, dotted). Nothing is drawn without integer ratios.
pub fn plot_ratio(records: &[PplRecord], path: &std::path::Path) -> Result<()> {
    use crate::plot::{Dash, Marker, StyledSeries};
    let (_, lengths, map) = pooled(records);
    // Full attention beyond the native window extrapolates positions (perplexity in the thousands):
    // not a baseline anyone would use, and it would flatten every other line.
    let native = records.iter().find_map(|r| r.native_window);
    let mut ratios: Vec<usize> = records
        .iter()
        .filter(|r| r.mode == EvalMode::Beacon)
        .filter_map(|r| r.ratio.as_deref()?.parse().ok())
        .filter(|&r| r > 0)
        .collect();
    ratios.sort_unstable();
    ratios.dedup();
    let (Some(&lo), Some(&hi)) = (ratios.first(), ratios.last()) else {
        return Ok(());
    };
    let ppl = |label: &str, l: usize| {
        map.get(&(label.to_string(), l))
            .copied()
            .filter(|p| p.is_finite())
    };
    let mut series = Vec::new();
    for (i, &l) in lengths.iter().enumerate() {
        let per_ratio = |prefix: &str| -> Vec<(f64, f64)> {
            ratios
                .iter()
                .filter_map(|&r| ppl(&format!("{prefix}{r}"), l).map(|p| (r as f64, p)))
                .collect()
        };
        let flat = |label: &str| -> Vec<(f64, f64)> {
            ppl(label, l)
                .map(|p| vec![(lo as f64, p), (hi as f64, p)])
                .unwrap_or_default()
        };
        let kinds = [
            ("beacon", per_ratio("beacon-x"), Dash::Solid, Marker::Circle),
            (
                "truncate@x",
                per_ratio("truncate@x"),
                Dash::Solid,
                Marker::Cross,
            ),
            (
                "streaming@x",
                per_ratio("streaming@x"),
                Dash::Dashed,
                Marker::Triangle,
            ),
            (
                "full",
                if native.is_some_and(|n| l > n) {
                    Vec::new()
                } else {
                    flat("full")
                },
                Dash::Dashed,
                Marker::None,
            ),
            (
                "window-only",
                flat("window-only"),
                Dash::Dotted,
                Marker::None,
            ),
        ];
        for (kind, points, dash, marker) in kinds {
            if points.is_empty() {
                continue;
            }
            series.push(StyledSeries {
                name: format!("{kind} {}", fmt_len(l)),
                points,
                color: i,
                dash,
                marker,
            });
        }
    }
    let ticks: Vec<f64> = ratios.iter().map(|&r| r as f64).collect();
    crate::plot::styled_line_plot(
        path,
        "Perplexity vs beacon ratio (equal-memory baselines at each ratio)",
        "compression ratio",
        "perplexity (log scale)",
        &series,
        &ticks,
    )
}

pub fn plot(records: &[PplRecord], path: &std::path::Path, native: usize) -> Result<()> {
    let native = records
        .iter()
        .find_map(|r| r.native_window)
        .unwrap_or(native);
    let (labels, lengths, map) = pooled(records);
    let series: Vec<(String, Vec<(f64, f64)>)> = labels
        .iter()
        .map(|lab| {
            let pts = lengths
                .iter()
                .filter_map(|&l| {
                    map.get(&(lab.clone(), l))
                        .filter(|p| p.is_finite())
                        .map(|&p| (l as f64, p))
                })
                .collect();
            (lab.clone(), pts)
        })
        .collect();
    crate::plot::line_plot(
        path,
        &format!(
            "Perplexity vs context length (native window {})",
            fmt_len(native)
        ),
        "context tokens",
        "perplexity (log scale)",
        &series,
        true,
        true,
        Some(native as f64),
    )
}

#[cfg(test)]
mod tests {
    use crate::{EvalCli, EvalCommand};
    use clap::Parser;

    fn parse(args: &[&str]) -> super::PplArgs {
        let argv = ["beacon eval", "ppl"].iter().chain(args).copied();
        match EvalCli::try_parse_from(argv).expect("parses").cmd {
            EvalCommand::Ppl(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn text_takes_several_files_and_equal_memory_is_a_switch() {
        let a = parse(&["--text", "a.txt", "b.txt", "c.txt", "--lengths", "2K"]);
        assert_eq!(a.text.len(), 3);
        assert_eq!(a.lengths, [2048]);
        assert_eq!(a.modes.equal_memory, None);
        let a = parse(&["--text", "a.txt", "--text", "b.txt", "--equal-memory"]);
        assert_eq!(a.text.len(), 2);
        assert_eq!(a.modes.equal_memory, Some(true));
        let a = parse(&["--equal-memory=false", "--modes", "full,window-only"]);
        assert_eq!(a.modes.equal_memory, Some(false));
        assert_eq!(a.modes.modes, ["full", "window-only"]);
    }

    #[test]
    fn spans_start_at_the_text_start_and_reach_its_end() {
        let ids: Vec<u32> = (0..1000).collect();
        let one = super::spans_of("b.txt".into(), ids.clone(), 100, 1);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0, "b.txt");
        let four = super::spans_of("b.txt".into(), ids.clone(), 100, 4);
        let names: Vec<&str> = four.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b.txt@0", "b.txt@300", "b.txt@600", "b.txt@900"]);
        for (n, t) in &four {
            let start: u32 = n.split('@').nth(1).unwrap().parse().unwrap();
            assert_eq!(t.len(), 100);
            assert_eq!(t[0], start);
        }
        assert_eq!(*four[3].1.last().unwrap(), 999);
        // too short for the longest length: the whole (short) text once
        let short = super::spans_of("s.txt".into(), ids[..50].to_vec(), 100, 4);
        assert_eq!(short.len(), 1);
        assert_eq!(parse(&["--spans", "3"]).spans, 3);
    }

    #[test]
    fn equal_memory_baselines_follow_the_beacon_ratios() {
        use crate::harness::{expand_modes, with_equal_memory, ModeArgs};
        let args = |modes: &str, ratios: &str| ModeArgs {
            modes: modes.split(',').map(String::from).collect(),
            ratios: ratios.split(',').map(String::from).collect(),
            ..Default::default()
        };
        let labels = |a: ModeArgs, flag: Option<bool>| -> Vec<String> {
            let specs = expand_modes(&a).unwrap();
            with_equal_memory(specs, flag, true)
                .unwrap()
                .iter()
                .map(|s| s.label(8192))
                .collect()
        };
        assert_eq!(
            labels(args("beacon,truncate,window-only", "8,adapt,32"), None),
            [
                "beacon-x8",
                "beacon-adapt",
                "beacon-x32",
                "truncate-8192",
                "window-only",
                "truncate@x8",
                "truncate@x32"
            ]
        );
        // off without a baseline mode unless forced (then both baselines)
        assert_eq!(labels(args("beacon", "8"), None), ["beacon-x8"]);
        assert_eq!(
            labels(args("beacon", "8"), Some(true)),
            ["beacon-x8", "truncate@x8", "streaming@x8"]
        );
        assert_eq!(
            labels(args("beacon,streaming", "8"), Some(false)),
            ["beacon-x8", "streaming-8192"]
        );
        // a tail from the model's config is named like one from --raw-tail; an explicit 0 stays 0
        let with_model_tail = |mode_args: ModeArgs| {
            let mut specs = expand_modes(&mode_args).unwrap();
            let model_config = beacon::BeaconConfig {
                window: 512,
                stride: 512,
                raw_tail: 256,
                ..Default::default()
            };
            crate::harness::name_config_tail(&mut specs, &model_config).unwrap();
            specs
        };
        let tailed = |raw_tails: Vec<usize>| -> Vec<String> {
            let specs = with_model_tail(ModeArgs {
                raw_tails,
                ..args("beacon", "8")
            });
            with_equal_memory(specs, Some(true), true)
                .unwrap()
                .iter()
                .map(|s| s.label(8192))
                .collect()
        };
        assert_eq!(
            tailed(vec![]),
            [
                "beacon-x8+tail256",
                "truncate@x8+tail256",
                "streaming@x8+tail256"
            ]
        );
        // a --window override scales the model's tail as the engine does (256 of 512 -> 64 of 128)
        let specs = with_model_tail(ModeArgs {
            window: Some(128),
            ..args("beacon", "8")
        });
        assert_eq!(specs[0].label(8192), "beacon-x8+tail64");
        assert_eq!(
            tailed(vec![0, 128]),
            [
                "beacon-x8",
                "beacon-x8+tail128",
                "truncate@x8",
                "streaming@x8",
                "truncate@x8+tail128",
                "streaming@x8+tail128"
            ]
        );
        // forced without an integer ratio: an error
        let specs = expand_modes(&args("beacon,truncate", "adapt")).unwrap();
        assert!(with_equal_memory(specs, Some(true), true).is_err());
        // the keep: truncate reads the budget, streaming keeps 4 sink + the rest
        let s = crate::harness::ModeSpec::equal_memory(crate::harness::EvalMode::Streaming, "8")
            .with_memory(600);
        assert_eq!(
            (s.keep, s.label(8192).as_str()),
            (Some(596), "streaming@x8")
        );
        let t = crate::harness::ModeSpec::equal_memory(crate::harness::EvalMode::Truncate, "8")
            .with_memory(600);
        assert_eq!(t.keep_limit(8192), Some(600));
        assert_eq!(t.memory_of().as_deref(), Some("beacon-x8"));
    }
}
