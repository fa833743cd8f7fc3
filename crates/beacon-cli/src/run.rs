//! `beacon run`: read a (long) input, compress it progressively, answer, report what it cost.

use crate::common::{EngineArgs, ModelArgs};
use anyhow::{Context, Result};
use beacon::cli_args::PenaltyArgs;
use beacon::generate::{generate, GenerateOptions, SamplingParams};
use beacon::metrics::{human_bytes, RunStats};
use beacon::tokenizer::ChatMessage;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// A file to read (the long context).
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// The prompt or question (after the file's text).
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Wrap file + prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Keep only the first N tokens of the file (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_file_tokens: usize,
    /// Maximum new tokens.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Repetition penalty and DRY (on by default with --chat: `--dry-multiplier 0` turns it off).
    #[command(flatten)]
    pub penalties: PenaltyArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Continue from a saved compressed context (`beacon compress`) instead of reading a file.
    #[arg(long, conflicts_with = "file")]
    pub context: Option<PathBuf>,
    /// Write the statistics as JSON here.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Don't print the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// File and prompt as token ids (in the chat template with `--chat`).
fn read_input(args: &RunArgs, tok: &beacon::tokenizer::Tokenizer) -> Result<Vec<u32>> {
    let mut text = String::new();
    if let Some(f) = &args.file {
        let mut body =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        if args.max_file_tokens > 0 {
            let ids = tok.encode(&body, false)?;
            if ids.len() > args.max_file_tokens {
                body = tok.decode(&ids[..args.max_file_tokens])?;
            }
        }
        text.push_str(&body);
    }
    if let Some(p) = &args.prompt {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(p);
    }
    if text.is_empty() {
        anyhow::bail!("nothing to read: give -f FILE and/or -p PROMPT");
    }
    Ok(if args.chat {
        let templated = tok.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: text,
            }],
            true,
        )?;
        tok.encode(&templated, true)?
    } else {
        tok.encode(&text, false)?
    })
}

/// Tokens the run will hold at most, estimated before the tokenizer is loaded (≥ 1 token per 3 bytes
/// of text), for the memory plan.
fn planned_tokens(args: &RunArgs) -> usize {
    let file = args
        .file
        .as_ref()
        .and_then(|f| std::fs::metadata(f).ok())
        .map(|m| m.len() as usize / 3)
        .unwrap_or(0);
    let file = if args.max_file_tokens > 0 {
        file.min(args.max_file_tokens)
    } else {
        file
    };
    file + args.prompt.as_ref().map_or(0, |p| p.len() / 3 + 1) + args.max_tokens + 64
}

pub fn run(args: RunArgs) -> Result<()> {
    let kv = args.engine.kv_needs(planned_tokens(&args));
    let loaded = args.model.load_for(Some(kv)).with_context(|| {
        format!(
            "loading model {}",
            args.model
                .model
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(default)".into())
        )
    })?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .context("this model has no tokenizer (tokenizer.json or GGUF metadata)")?;
    let model = &loaded.model;
    let opts = args.engine.options();
    // Built (and the flags validated) even when a saved context replaces it.
    let fresh = opts.session(model, &loaded.beacon)?;
    let (mut session, ids, first_logits) = match &args.context {
        Some(path) => {
            let saved = beacon::context_file::load_context(path, model, &loaded.fingerprint)
                .with_context(|| format!("loading saved context {}", path.display()))?;
            if args.engine.mode.is_some()
                || args.engine.ratio.is_some()
                || args.engine.window.is_some()
            {
                eprintln!(
                    "note: --mode/--ratio/--window are fixed by the saved context and are ignored"
                );
            }
            // The question continues the saved text exactly as `-f FILE -p PROMPT` would: after a blank
            // line, inside the same user message when the context was compressed with --chat.
            let prompt = args.prompt.clone().unwrap_or_default();
            let cont = if args.chat {
                let (_, close) = beacon::tokenizer::user_turn_parts(tok)?;
                format!("\n\n{prompt}{close}")
            } else if prompt.is_empty() {
                String::new()
            } else {
                format!("\n\n{prompt}")
            };
            let ids = if cont.is_empty() {
                Vec::new()
            } else {
                tok.encode(&cont, args.chat)?
            };
            eprintln!(
                "continuing from {} ({} tokens read earlier, {} memory entries)",
                path.display(),
                saved.session.tokens().len(),
                saved.session.layout().context_len()
            );
            (saved.session, ids, saved.logits)
        }
        None => {
            let ids = read_input(&args, tok)?;
            (fresh, ids, None)
        }
    };
    let input_tokens = session.tokens().len() + ids.len();
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(ids.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} reading {pos}/{len} tokens [{bar:30}] {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let eos = loaded.stop_ids();
    let gen_opts = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.penalties.repeat_penalty,
            // DRY stops the loops greedy chat answers fall into; plain continuation keeps the raw model.
            dry: args.penalties.dry_params(args.chat),
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop_strings: args.stop.clone(),
        eos_ids: eos,
    };
    let mut stdout = std::io::stdout();
    let mut first = true;
    let g = generate(
        model,
        &mut session,
        tok,
        &ids,
        first_logits,
        &gen_opts,
        &mut |piece| {
            if first {
                bar.finish_and_clear();
                first = false;
            }
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            true
        },
        &mut |done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    println!();
    let stats = RunStats::of(
        &session,
        input_tokens,
        (ids.len(), g.prefill_seconds),
        (g.tokens.len(), g.decode_seconds),
        Some(format!("{:?}", g.finish).to_lowercase()),
    );
    eprintln!(
        "[{} ratio {}] {} tokens read in {:.2}s ({:.0} tok/s), {} generated at {:.1} tok/s (finish: {}) | {} K/V peak {} vs {} full ({:.1}x less) | memory sink {} + beacon {}{} + raw {} | peak RSS {}",
        stats.mode,
        stats.ratio,
        stats.input_tokens,
        stats.prefill_seconds,
        stats.prefill_tokens_per_second,
        stats.decode_tokens,
        stats.decode_tokens_per_second,
        stats.finish.as_deref().unwrap_or("-"),
        stats.kv_dtype,
        human_bytes(stats.kv_bytes as u64),
        human_bytes(stats.kv_bytes_full as u64),
        stats.kv_bytes_full as f64 / stats.kv_bytes.max(1) as f64,
        stats.memory_entries.sink,
        stats.memory_entries.beacon,
        match stats.memory_entries.tail {
            0 => String::new(),
            t => format!(" + tail {t}"),
        },
        stats.memory_entries.raw,
        human_bytes(stats.peak_rss_bytes),
    );
    if let Some(p) = &args.stats_json {
        let json = serde_json::to_vec_pretty(&stats)?;
        beacon::util::atomic_write(p, &json)?;
    }
    Ok(())
}
