//! `beacon compress -f book.txt -o book.beacon`: read a text once, keep its beacon memory in a
//! saved-context file, and report the file size next to the raw K/V it replaces.

use anyhow::Context;
use beacon::cli_args::{EngineArgs, ModelArgs};
use beacon::context_file::{save_context, sha256_hex, SaveReport};
use beacon::metrics::human_bytes;
use beacon::session::FeedOptions;
use beacon::Want;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

/// `beacon compress`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompressArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Text to compress (`-` = standard input).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Saved-context file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Open a user turn of the chat template before the text, so `beacon run --context FILE --chat -p Q`
    /// asks Q inside the same user message (as `beacon run --chat -f FILE -p Q` would).
    #[arg(long)]
    pub chat: bool,
}

/// Compress and save; prints a one-line report and returns it.
pub fn run_compress(args: CompressArgs) -> anyhow::Result<SaveReport> {
    let loaded = args.model.load().context("loading the model")?;
    let path = loaded.path.clone();
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{}: the model has no tokenizer", path.display()))?;
    let mut text = String::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
    } else {
        text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?;
    }
    let ids = if args.chat {
        let (open, _) = beacon::tokenizer::user_turn_parts(tokenizer)?;
        tokenizer.encode(&format!("{open}{text}"), true)?
    } else {
        tokenizer.encode(&text, false)?
    };
    anyhow::ensure!(
        !ids.is_empty(),
        "{}: nothing to compress (no tokens)",
        args.file.display()
    );
    let options = args.engine.options();
    let model = &loaded.model;
    let mut session = options.session(model, &loaded.beacon)?;
    let t0 = Instant::now();
    let logits = session.feed_with(model, &ids, Want::Last, FeedOptions::default(), &mut |_| {})?;
    let seconds = t0.elapsed().as_secs_f64();
    let report = save_context(
        &args.output,
        &session,
        &loaded.fingerprint,
        Some(&sha256_hex(text.as_bytes())),
        logits.as_ref(),
    )
    .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "{}: {} tokens in {:.1} s → {}: {} ({} memory entries); raw K/V of the same tokens: {} ({:.1}× larger)",
        args.file.display(),
        report.tokens,
        seconds,
        args.output.display(),
        human_bytes(report.file_bytes),
        session.layout().context_len(),
        human_bytes(report.kv_bytes_full as u64),
        report.kv_bytes_full as f64 / report.file_bytes.max(1) as f64,
    );
    Ok(report)
}
