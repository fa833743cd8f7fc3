//! `beacon eval efficiency`: the paper's efficiency table — prefill seconds, decode speed and peak K/V
//! bytes against context length, for full attention, the baselines and beacon ratios.

use crate::harness::{self, bar, fmt_len, md_table, CommonArgs, EvalMode, ModeArgs, Output};
use anyhow::{Context, Result};
use beacon::session::{FeedOptions, Want};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct EfficiencyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub modes: ModeArgs,
    /// Context lengths. Default 4K,8K,16K,32K (--quick: 2K,4K,8K).
    #[arg(long, value_delimiter = ',', value_parser = harness::parse_len)]
    pub lengths: Vec<usize>,
    /// Tokens decoded after the prefill (greedy), for the decode speed.
    #[arg(long, default_value_t = 16)]
    pub decode: usize,
    /// Text the context is cut from. Default: the first held-out book.
    #[arg(long)]
    pub text: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EfficiencyRecord {
    pub mode: EvalMode,
    pub ratio: Option<String>,
    pub keep: Option<usize>,
    pub label: String,
    pub context_tokens: usize,
    pub prefill_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_ms_per_token: f64,
    pub peak_kv_bytes: usize,
    /// K/V full attention would hold for the same tokens.
    pub full_kv_bytes: usize,
    /// Cache entries at the end of the prefill.
    pub kv_entries: usize,
    pub beacon_weights: String,
}

pub fn run(args: &EfficiencyArgs, command: &str) -> Result<Vec<EfficiencyRecord>> {
    let t_start = std::time::Instant::now();
    let (ev, specs) = harness::load_with_modes(&args.common, &args.modes, &["full", "beacon"])?;
    let quick = args.common.quick;
    let lengths = harness::lengths_or(
        &args.lengths,
        quick,
        &[2048, 4096, 8192],
        &[4096, 8192, 16384, 32768],
    );
    let lmax = *lengths.last().context("no lengths")?;
    let path = match &args.text {
        Some(p) => p.clone(),
        None => crate::data::held_out_paths(&harness::data_dir(&args.common)?)[0].clone(),
    };
    let tok = ev.tok();
    let ids = tok.encode(&crate::data::read_prefix(&path, lmax * 8 + 4096)?)?;
    if ids.len() < lmax {
        anyhow::bail!(
            "{} has {} tokens, fewer than {lmax}",
            path.display(),
            ids.len()
        );
    }
    let model = &ev.loaded.model;
    let total: u64 = lengths.iter().map(|&l| (l * specs.len()) as u64).sum();
    let pb = bar(total, "tok");
    let mut records = Vec::new();
    for &len in &lengths {
        for spec in &specs {
            let label = spec.label(ev.native);
            pb.set_message(format!("{} {label}", fmt_len(len)));
            let base = pb.position();
            let mut s = spec.session(&ev, args.common.seed)?;
            let t0 = std::time::Instant::now();
            let mut logits = s
                .feed_with(
                    model,
                    &ids[..len],
                    Want::Last,
                    FeedOptions::default(),
                    &mut |d| pb.set_position(base + d as u64),
                )?
                .context("no logits")?;
            let prefill = t0.elapsed().as_secs_f64();
            let kv_entries = s.layout().context_len();
            let peak_kv_bytes = s.stats().peak_kv_bytes;
            let t1 = std::time::Instant::now();
            for _ in 0..args.decode {
                let rows = harness::logit_rows(&logits)?;
                let next = beacon::generate::argmax(rows.last().context("no logits")?);
                logits = s.feed(model, &[next], Want::Last)?.context("no logits")?;
            }
            let decode = t1.elapsed().as_secs_f64();
            pb.set_position(base + len as u64);
            let r = EfficiencyRecord {
                mode: spec.mode,
                ratio: spec.ratio.clone(),
                keep: spec.keep_limit(ev.native),
                label,
                context_tokens: len,
                prefill_seconds: prefill,
                prefill_tokens_per_second: len as f64 / prefill.max(1e-9),
                decode_ms_per_token: if args.decode > 0 {
                    1000.0 * decode / args.decode as f64
                } else {
                    f64::NAN
                },
                peak_kv_bytes,
                full_kv_bytes: len * s.bytes_per_entry(),
                kv_entries,
                beacon_weights: ev.weights.clone(),
            };
            harness::say(&pb, format!(
                "{:>5} {:<18} prefill {:>7.2}s ({:>6.0} tok/s)  decode {:>6.1} ms/tok  peak K/V {:>8.1} MiB",
                fmt_len(len),
                r.label,
                r.prefill_seconds,
                r.prefill_tokens_per_second,
                r.decode_ms_per_token,
                r.peak_kv_bytes as f64 / 1048576.0
            ));
            records.push(r);
        }
    }
    pb.finish_and_clear();
    let out = Output {
        common: &args.common,
        name: "efficiency",
        command,
    };
    out.write(
        &ev,
        &records,
        &markdown(&records, args.decode),
        t_start.elapsed().as_secs_f64(),
    )?;
    if !args.common.no_plot && !records.is_empty() {
        plot(&records, &out.png_path(""))?;
    }
    Ok(records)
}

fn labels_lengths(records: &[EfficiencyRecord]) -> (Vec<String>, Vec<usize>) {
    let mut labels: Vec<String> = Vec::new();
    let mut lengths: Vec<usize> = Vec::new();
    for r in records {
        if !labels.contains(&r.label) {
            labels.push(r.label.clone());
        }
        if !lengths.contains(&r.context_tokens) {
            lengths.push(r.context_tokens);
        }
    }
    lengths.sort_unstable();
    (labels, lengths)
}

pub fn markdown(records: &[EfficiencyRecord], decode: usize) -> String {
    let (labels, lengths) = labels_lengths(records);
    let mut header = vec!["mode".to_string()];
    header.extend(lengths.iter().map(|&l| fmt_len(l)));
    let table = |f: &dyn Fn(&EfficiencyRecord) -> String| -> String {
        let rows: Vec<Vec<String>> = labels
            .iter()
            .map(|lab| {
                let mut row = vec![lab.clone()];
                for &l in &lengths {
                    row.push(
                        records
                            .iter()
                            .find(|r| &r.label == lab && r.context_tokens == l)
                            .map(f)
                            .unwrap_or_else(|| "–".into()),
                    );
                }
                row
            })
            .collect();
        md_table(&header, &rows)
    };
    format!(
        "Prefill seconds (one feed of the whole context, single process, CPU):\n\n{}\n\
         Peak K/V held during the prefill, MiB (full attention's K/V for the same tokens in the `full` row):\n\n{}\n\
         Decode, ms per token (greedy, {decode} tokens after the prefill):\n\n{}",
        table(&|r| format!("{:.2}", r.prefill_seconds)),
        table(&|r| format!("{:.1}", r.peak_kv_bytes as f64 / 1048576.0)),
        table(&|r| format!("{:.1}", r.decode_ms_per_token)),
    )
}

pub fn plot(records: &[EfficiencyRecord], path: &std::path::Path) -> Result<()> {
    let (labels, _) = labels_lengths(records);
    let series = |f: &dyn Fn(&EfficiencyRecord) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        labels
            .iter()
            .map(|lab| {
                (
                    lab.clone(),
                    records
                        .iter()
                        .filter(|r| &r.label == lab)
                        .map(|r| (r.context_tokens as f64, f(r)))
                        .collect(),
                )
            })
            .collect()
    };
    let secs = series(&|r| r.prefill_seconds);
    let kv = series(&|r| r.peak_kv_bytes as f64 / 1048576.0);
    crate::plot::two_line_plots(
        path,
        "Efficiency: prefill time and peak K/V vs context length",
        ("prefill seconds", &secs),
        ("peak K/V (MiB)", &kv),
    )
}
