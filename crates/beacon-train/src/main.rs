//! Standalone `beacon-train` binary (the same as `beacon train`).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "beacon-train",
    about = "Train Activation Beacon parameters on a frozen backbone"
)]
struct Cli {
    #[command(flatten)]
    args: beacon_train::TrainArgs,
}

fn main() -> anyhow::Result<()> {
    beacon_train::run(Cli::parse().args)
}
