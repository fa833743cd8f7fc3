//! `beacon bench`: prefill time, decode speed and memory per context length × mode, each measured in
//! its own process (so peak RSS is per configuration), optionally side by side with llama.cpp's
//! `llama-bench` on the same GGUF and thread count.

use crate::common::{load_model, EngineArgs, ModelArgs};
use anyhow::{Context, Result};
use beacon::generate::argmax;
use beacon::metrics::peak_rss_bytes;
use beacon::session::Want;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Context lengths (tokens).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2048,4096,8192,16384,32768"
    )]
    pub lengths: Vec<usize>,
    /// Configurations: full, beacon:RATIO (e.g. beacon:8), streaming, truncate.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "full,beacon:2,beacon:4,beacon:8,beacon:16"
    )]
    pub modes: Vec<String>,
    /// Tokens decoded after the context.
    #[arg(long, default_value_t = 16)]
    pub decode: usize,
    /// Repeats per configuration (min and median are reported).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Text the contexts are cut from (repeated if too short).
    #[arg(long, default_value = "data/books/pg1342.txt")]
    pub text: PathBuf,
    /// Also run llama.cpp's llama-bench (path to the binary) on the same GGUF.
    #[arg(long)]
    pub llama_bench: Option<PathBuf>,
    /// Dtype of beacon's cached K/V (f16, f32, bf16); llama.cpp keeps f16.
    #[arg(long = "kv-dtype", default_value = "f16")]
    pub kv_dtype: String,
    /// Threads for both engines.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Longest context for llama.cpp (its full attention at 32K takes many minutes).
    #[arg(long, default_value_t = 32768)]
    pub llama_max_length: usize,
    #[arg(long, default_value = "results/bench.json")]
    pub json: PathBuf,
    #[arg(long, default_value = "results/bench.md")]
    pub markdown: PathBuf,
}

/// One measurement in a child process.
#[derive(clap::Args, Debug)]
pub struct BenchOneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long)]
    pub length: usize,
    #[arg(long, default_value_t = 16)]
    pub decode: usize,
    #[arg(long)]
    pub text: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRecord {
    pub engine: String,
    pub config: String,
    pub context_tokens: usize,
    pub prefill_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_second: f64,
    pub kv_bytes: usize,
    pub kv_bytes_full: usize,
    pub peak_rss_bytes: u64,
}

pub fn context_tokens(loaded: &beacon::Loaded, text: &PathBuf, length: usize) -> Result<Vec<u32>> {
    let tok = loaded
        .tokenizer
        .as_ref()
        .context("model has no tokenizer")?;
    let body =
        std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let ids = tok.encode(&body, false)?;
    anyhow::ensure!(!ids.is_empty(), "{} has no tokens", text.display());
    Ok(ids.iter().copied().cycle().take(length).collect())
}

pub fn bench_one(args: BenchOneArgs) -> Result<()> {
    let loaded = load_model(&args.model)?;
    let model = &loaded.model;
    let opts = args.engine.options();
    let ids = context_tokens(&loaded, &args.text, args.length)?;
    let mut s = opts.session(model, &loaded.beacon)?;
    let t0 = Instant::now();
    let mut logits = s.feed(model, &ids, Want::Last)?.context("no logits")?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..args.decode {
        let row: Vec<f32> = logits.get(0)?.to_vec1()?;
        let next = argmax(&row);
        logits = s.feed(model, &[next], Want::Last)?.context("no logits")?;
    }
    let decode = t1.elapsed().as_secs_f64();
    let rec = BenchRecord {
        engine: "beacon".into(),
        config: String::new(),
        context_tokens: ids.len(),
        prefill_seconds: prefill,
        prefill_tokens_per_second: ids.len() as f64 / prefill,
        decode_tokens: args.decode,
        decode_tokens_per_second: args.decode as f64 / decode.max(1e-9),
        kv_bytes: s.stats().peak_kv_bytes,
        kv_bytes_full: s.kv_bytes_full(),
        peak_rss_bytes: peak_rss_bytes(),
    };
    println!("{}", serde_json::to_string(&rec)?);
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut records: Vec<BenchRecord> = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    let model_path = match &args.model.model {
        Some(p) => p.clone(),
        None => beacon::fetch::default_model_path()?,
    };
    let total = args.lengths.len() * args.modes.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for &len in &args.lengths {
        for m in &args.modes {
            bar.set_message(format!("{m} @ {len}"));
            let mut runs = Vec::new();
            for _ in 0..args.repeats.max(1) {
                let mut cmd = std::process::Command::new(&exe);
                cmd.arg("bench-one")
                    .arg("--length")
                    .arg(len.to_string())
                    .arg("--decode")
                    .arg(args.decode.to_string());
                cmd.arg("--text").arg(&args.text).arg("-m").arg(&model_path);
                if let Some(b) = &args.model.beacon_weights {
                    cmd.arg("--beacon").arg(b);
                }
                if let Some(b) = &args.model.beacon_config {
                    cmd.arg("--beacon-config").arg(b);
                } else if args.model.model.is_none() {
                    cmd.arg("--beacon-config")
                        .arg(crate::common::shipped_default_beacons().join("beacon_config.json"));
                }
                if args.model.untrained {
                    cmd.arg("--untrained");
                }
                match m.split_once(':') {
                    Some(("beacon", r)) => {
                        cmd.args(["--mode", "beacon", "--ratio", r]);
                    }
                    _ => {
                        cmd.args(["--mode", m]);
                    }
                }
                cmd.args(["--kv-dtype", &args.kv_dtype]);
                cmd.env("RAYON_NUM_THREADS", args.threads.to_string());
                let out = cmd
                    .output()
                    .with_context(|| format!("running {}", exe.display()))?;
                if !out.status.success() {
                    anyhow::bail!(
                        "bench-one {m} @ {len} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let line = String::from_utf8_lossy(&out.stdout);
                let last = line.lines().last().unwrap_or("");
                let mut rec: BenchRecord =
                    serde_json::from_str(last).with_context(|| format!("parsing {last}"))?;
                rec.config = m.clone();
                runs.push(rec);
            }
            let mut pre: Vec<f64> = runs.iter().map(|r| r.prefill_seconds).collect();
            let mut dec: Vec<f64> = runs.iter().map(|r| r.decode_tokens_per_second).collect();
            let best = runs[0].clone();
            let pmin = pre.iter().cloned().fold(f64::INFINITY, f64::min);
            let pmed = median(&mut pre);
            let dmax = dec.iter().cloned().fold(0.0, f64::max);
            let dmed = median(&mut dec);
            rows.push(format!(
                "| beacon | {m} | {len} | {pmin:.2} / {pmed:.2} | {:.0} | {dmax:.1} / {dmed:.1} | {:.1} | {:.1} | {:.0} |",
                len as f64 / pmin,
                best.kv_bytes as f64 / (1 << 20) as f64,
                best.kv_bytes_full as f64 / (1 << 20) as f64,
                best.peak_rss_bytes as f64 / (1 << 20) as f64
            ));
            records.extend(runs);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if let Some(lb) = &args.llama_bench {
        for &len in args.lengths.iter().filter(|&&l| l <= args.llama_max_length) {
            for (what, extra) in [
                (
                    "prefill",
                    vec![
                        "-p".to_string(),
                        len.to_string(),
                        "-n".into(),
                        "0".into(),
                        "-fa".into(),
                        "1".into(),
                    ],
                ),
                (
                    "decode",
                    vec![
                        "-p".into(),
                        "0".into(),
                        "-n".into(),
                        args.decode.to_string(),
                        "-d".into(),
                        len.to_string(),
                        "-fa".into(),
                        "0".into(),
                    ],
                ),
            ] {
                eprintln!("llama-bench {what} @ {len} ...");
                let out = std::process::Command::new(lb)
                    .arg("-m")
                    .arg(&model_path)
                    .args([
                        "-t",
                        &args.threads.to_string(),
                        "--repack",
                        "0",
                        "-r",
                        &args.repeats.max(1).to_string(),
                        "-o",
                        "json",
                    ])
                    .args(&extra)
                    .output()
                    .with_context(|| format!("running {}", lb.display()))?;
                if !out.status.success() {
                    anyhow::bail!(
                        "llama-bench failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).context("parsing llama-bench json")?;
                let tps = v[0]["avg_ts"].as_f64().unwrap_or(0.0);
                let rec = BenchRecord {
                    engine: "llama.cpp".into(),
                    config: format!("full {what}"),
                    context_tokens: len,
                    prefill_seconds: if what == "prefill" {
                        len as f64 / tps.max(1e-9)
                    } else {
                        0.0
                    },
                    prefill_tokens_per_second: if what == "prefill" { tps } else { 0.0 },
                    decode_tokens: if what == "decode" { args.decode } else { 0 },
                    decode_tokens_per_second: if what == "decode" { tps } else { 0.0 },
                    kv_bytes: 0,
                    kv_bytes_full: 0,
                    peak_rss_bytes: 0,
                };
                rows.push(format!(
                    "| llama.cpp | full ({}) | {len} | {} | {} | {} | – | – | – |",
                    if what == "prefill" { "fa on" } else { "fa off" },
                    if what == "prefill" {
                        format!("{:.2}", len as f64 / tps)
                    } else {
                        "–".into()
                    },
                    if what == "prefill" {
                        format!("{tps:.0}")
                    } else {
                        "–".into()
                    },
                    if what == "decode" {
                        format!("{tps:.1}")
                    } else {
                        "–".into()
                    },
                ));
                records.push(rec);
            }
        }
    }
    let mut md = String::from("| engine | config | context | prefill s (min / median) | prefill tok/s | decode tok/s (max / median) | peak K/V MiB | full K/V MiB | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        md.push_str(r);
        md.push('\n');
    }
    println!("{md}");
    beacon::util::atomic_write(&args.json, &serde_json::to_vec_pretty(&records)?)?;
    beacon::util::atomic_write(&args.markdown, md.as_bytes())?;
    eprintln!(
        "wrote {} and {}",
        args.json.display(),
        args.markdown.display()
    );
    Ok(())
}
