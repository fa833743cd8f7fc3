//! Stand-alone `beacon eval` (the main `beacon` binary exposes the same subcommands as `beacon eval …`).
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = beacon_eval::EvalCli::parse();
    beacon_eval::run(cli.cmd)
}
