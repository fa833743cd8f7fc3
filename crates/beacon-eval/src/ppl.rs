//! `beacon eval ppl`: perplexity of a fixed scored span after reading a preceding context of each
//! length, for every engine mode.
//!
//! For a text and a largest length `Lmax`, the scored span is the tokens `[Lmax − S, Lmax)`; at
//! length `L` the model first reads `[Lmax − L, Lmax − S)` and then the span, so every length scores
//! the *same* tokens and only the amount of context differs. `context_tokens` is `L` (context + span).

use crate::harness::{
    self, bar, fmt_len, logit_rows, md_table, CommonArgs, ModeArgs, ModeSpec, Output,
};
use anyhow::{bail, Context, Result};
use beacon::engine::{FeedOptions, Session, Want};
use beacon::model::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct PplArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub modes: ModeArgs,
    /// Text files to score (default: held-out books; 2, or 1 with --quick).
    #[arg(long = "text")]
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
}

/// One perplexity measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PplRecord {
    pub mode: String,
    pub ratio: Option<String>,
    /// K/V tokens kept (truncate/streaming).
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
    let (mut nll, mut n) = (0.0f64, 0usize);
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
            nll += nll_of(&p, chunk[0]);
            n += 1;
        }
        for (r, row) in rows.iter().enumerate().take(chunk.len() - 1) {
            nll += nll_of(row, chunk[r + 1]);
            n += 1;
        }
        prev = rows.into_iter().last();
        done += chunk.len();
        progress(done);
    }
    Ok((nll, n))
}

/// The context a configuration reads before the span: truncate keeps only what fits `keep` together
/// with the span (so the model never sees more than `keep` tokens); the others read all of it.
pub fn context_for<'a>(
    spec: &ModeSpec,
    native: usize,
    context: &'a [u32],
    scored: usize,
) -> &'a [u32] {
    if spec.mode == "truncate" {
        let keep = spec.keep.unwrap_or(native);
        let n = keep.saturating_sub(scored).min(context.len());
        &context[context.len() - n..]
    } else {
        context
    }
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
    let mut texts = Vec::new();
    for f in &files {
        let text = crate::data::read_prefix(f, lmax * 8 + 4096)?;
        let ids = tok
            .encode(&text)
            .with_context(|| format!("tokenizing {}", f.display()))?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        texts.push((name, ids));
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
            for spec in &specs {
                let label = spec.label(ev.native);
                pb.set_message(format!("{name} {} {label}", fmt_len(len)));
                let base = pb.position();
                if let (true, Some(full)) = (same_as_full(spec, ev.native, len), &full_result) {
                    let mut r = full.clone();
                    r.mode = spec.mode.clone();
                    r.ratio = spec.ratio.clone();
                    r.keep = Some(spec.keep.unwrap_or(ev.native));
                    r.label = label;
                    r.same_as = Some("full".into());
                    records.push(r);
                    pb.set_position(base + len as u64);
                    continue;
                }
                let ctx = context_for(spec, ev.native, context, scored);
                let mut session = spec.session(&ev, args.common.seed)?;
                let t0 = std::time::Instant::now();
                let skipped = (context.len() - ctx.len()) as u64;
                let (nll, n) = score_span(model, &mut session, ctx, span, args.piece, &mut |d| {
                    pb.set_position(base + skipped + d as u64)
                })?;
                let rec = PplRecord {
                    mode: spec.mode.clone(),
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
                    peak_kv_bytes: session.stats.peak_kv_bytes,
                    full_kv_bytes: session.kv_bytes_full().max(len * session.bytes_per_entry()),
                    same_as: None,
                    native_window: Some(ev.native),
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
                if spec.mode == "full" {
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
    }
    Ok(records)
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
    format!(
        "Perplexity of the same last {scored} tokens after reading the preceding context, pooled over {} \
         ({}); the column is the total tokens read. The native window is {}; `full` beyond it extrapolates \
         positions. `truncate-N` reads only the last N tokens; `streaming-N` keeps 4 sink + N recent entries.\n\n{}\n\
         Peak K/V held (MiB):\n\n{}",
        if files.len() == 1 { "1 text".to_string() } else { format!("{} texts", files.len()) },
        files.join(", "),
        fmt_len(native),
        md_table(&header, &rows),
        md_table(&header, &kv_rows)
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
