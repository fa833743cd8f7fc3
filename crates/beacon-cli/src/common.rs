//! Flags shared by subcommands: which model, which beacon weights, which engine settings.

use anyhow::{Context, Result};
use beacon::Loaded;
use std::path::PathBuf;

pub use beacon::cli_args::{EngineArgs, ModelArgs};

pub fn shipped_default_beacons() -> PathBuf {
    beacon::loader::shipped_default_beacons()
}

pub fn load_model(args: &ModelArgs) -> Result<Loaded> {
    args.load().with_context(|| {
        format!(
            "loading model {}",
            args.model
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(default)".into())
        )
    })
}
