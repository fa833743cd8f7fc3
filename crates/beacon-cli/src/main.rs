//! The `beacon` command line: run | bench | inspect (and train, eval, serve, compress as they land).

mod bench;
mod common;
mod inspect;
mod run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "beacon",
    version,
    about = "Activation Beacon: read inputs far longer than the model's window by compressing them into beacon K/V"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read a file and/or prompt, compress it window by window, and answer.
    Run(run::RunArgs),
    /// Prefill/decode speed and memory per context length and mode (optionally vs llama.cpp).
    Bench(bench::BenchArgs),
    /// One benchmark measurement (used by `bench`, one process per configuration).
    #[command(hide = true)]
    BenchOne(bench::BenchOneArgs),
    /// Show a model's architecture, beacon settings and weights.
    Inspect(common::ModelArgs),
    /// Evaluate: perplexity vs length, needle/passkey, retrieval/QA, efficiency; JSON + markdown + PNG.
    #[command(subcommand)]
    Eval(beacon_eval::EvalCommand),
    /// Train beacon parameters on a frozen backbone (resumable).
    Train(beacon_train::TrainArgs),
    /// Compress a file into a saved context (`beacon run --context FILE` continues from it).
    Compress(beacon_server::CompressArgs),
    /// OpenAI-compatible HTTP server that reuses each conversation's beacon memory.
    Serve(beacon_server::ServeArgs),
}

fn main() {
    // Threads: candle's dense GEMMs use rayon's pool (RAYON_NUM_THREADS, default all cores) and its
    // quantized single-row kernels (decode) a spinning barrier pool sized by CANDLE_NUM_THREADS, which
    // defaults to the same count. On a quiet 2-core machine two decode threads give 93 tok/s against 65
    // for one; when another process holds a core the spinning pool stalls, and CANDLE_NUM_THREADS=1
    // is the better setting (docs/BENCHMARKS.md).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEACON_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Bench(a) => bench::bench(a),
        Command::BenchOne(a) => bench::bench_one(a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::Train(a) => beacon_train::run(a),
        Command::Eval(c) => beacon_eval::run(c),
        Command::Compress(a) => beacon_server::run_compress(a).map(|_| ()),
        Command::Serve(a) => beacon_server::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
