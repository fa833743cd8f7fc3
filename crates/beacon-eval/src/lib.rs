//! `beacon eval`: evaluation of the engine's modes (full, truncate, streaming, beacon at each ratio and
//! adapt) on the offline data — perplexity, needle/passkey, retrieval and QA, efficiency — writing JSON
//! records, markdown tables and PNG plots under a results directory, deterministic under a seed.
//!
//! Scorers are pure functions ([`qa`], [`ppl::nll_of`], [`cases::grade`]); the harness runs on any model
//! the engine loads, and on tokenizer-free test models by treating bytes as ids.

pub mod cases;
pub mod data;
pub mod efficiency;
pub mod harness;
pub mod needle;
pub mod plot;
pub mod ppl;
pub mod qa;
pub mod report;
pub mod retrieval;

use anyhow::Result;

/// `beacon eval …` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum EvalCommand {
    /// Perplexity of a fixed scored span after contexts of growing length, per mode.
    Ppl(ppl::PplArgs),
    /// Needle-in-a-haystack (lengths × depths) and passkey retrieval.
    Needle(needle::NeedleArgs),
    /// Line / key-value retrieval, RULER-style tasks, and QA over packed SQuAD/HotpotQA paragraphs.
    Retrieval(retrieval::RetrievalArgs),
    /// Prefill seconds, decode speed and peak K/V bytes vs context length.
    Efficiency(efficiency::EfficiencyArgs),
    /// Write docs/RESULTS.md from a results directory (optionally running the suite first).
    Report(report::ReportArgs),
}

/// Parser for `beacon eval` on its own (used by the `beacon-eval` binary and by the report's suite).
#[derive(clap::Parser, Debug)]
#[command(
    name = "beacon eval",
    about = "Evaluate the engine's modes on the offline data"
)]
pub struct EvalCli {
    #[command(subcommand)]
    pub cmd: EvalCommand,
}

/// The command line that reproduces this run, as `beacon eval …` (from the process arguments).
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match args.iter().position(|a| a == "eval") {
        Some(i) if i == 0 || args[..i].iter().all(|a| a.starts_with('-')) => args[i + 1..].to_vec(),
        _ => args,
    };
    format!("beacon eval {}", shell_join(&args))
}

/// Arguments joined into one shell line, single-quoting those with spaces or quotes.
pub fn shell_join(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.chars()
                .any(|c| c.is_whitespace() || c == '\'' || c == '"')
            {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run a subcommand; the recorded command is taken from the process arguments.
pub fn run(cmd: EvalCommand) -> Result<()> {
    run_with_command(cmd, &command_line())
}

/// Run a subcommand, recording `command` as what reproduces it.
pub fn run_with_command(cmd: EvalCommand, command: &str) -> Result<()> {
    match cmd {
        EvalCommand::Ppl(a) => ppl::run(&a, command).map(|_| ()),
        EvalCommand::Needle(a) => needle::run(&a, command).map(|_| ()),
        EvalCommand::Retrieval(a) => retrieval::run(&a, command).map(|_| ()),
        EvalCommand::Efficiency(a) => efficiency::run(&a, command).map(|_| ()),
        EvalCommand::Report(a) => report::run(&a, command),
    }
}

/// Parse and run `beacon eval ARGS…` (ARGS without the `beacon eval` prefix).
pub fn run_args(args: &[String]) -> Result<()> {
    use clap::Parser;
    let cli = EvalCli::try_parse_from(
        std::iter::once("beacon eval".to_string()).chain(args.iter().cloned()),
    )?;
    run_with_command(cli.cmd, &format!("beacon eval {}", shell_join(args)))
}
