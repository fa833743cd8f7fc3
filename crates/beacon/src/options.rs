//! User-facing engine options (CLI flags, server settings) turned into validated engine values.

use crate::config::{BeaconConfig, RatioMix};
use crate::error::{BeaconError, Result};
use crate::model::Model;
use crate::session::{Mode, Session};
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// Overrides of the model's beacon settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineOptions {
    /// `beacon` (default), `full`, `window-only`, `streaming`, `truncate`.
    pub mode: Option<String>,
    /// A ratio (`2`…`32`, `0` = no compression), `adapt` (= adapt-1024), `adapt-N`, or `random` (step-random).
    pub ratio: Option<String>,
    /// Raw tokens per window.
    pub window: Option<usize>,
    /// Sink entries.
    pub sink: Option<usize>,
    /// Raw entries of the last closed window kept beside the beacons (`BeaconConfig::raw_tail`).
    #[serde(default)]
    pub raw_tail: Option<usize>,
    /// Tokens kept by `truncate` and `streaming` (default: the model's native window).
    pub keep: Option<usize>,
    /// Seed of random ratio draws.
    pub seed: Option<u64>,
    /// Dtype of the cached K/V: `f16`, `f32`, `bf16` (default: the model's compute dtype).
    pub kv_dtype: Option<String>,
}

/// The ratio candidates `adapt` chooses from.
pub const ADAPT_RATIOS: [usize; 5] = [2, 4, 8, 16, 32];

impl EngineOptions {
    /// Beacon settings after overrides, validated.
    pub fn beacon_config(&self, base: &BeaconConfig) -> Result<BeaconConfig> {
        let mut c = base.clone();
        if let Some(w) = self.window {
            c.window = w;
            c.stride = w;
            // The model's raw tail is a share of its window: a new window keeps the share.
            if self.raw_tail.is_none() && base.raw_tail > 0 {
                c.raw_tail = base.raw_tail * w / base.window.max(1);
            }
        }
        if let Some(s) = self.sink {
            c.sink_size = s;
        }
        if let Some(t) = self.raw_tail {
            c.raw_tail = t;
        }
        if let Some(seed) = self.seed {
            c.seed = seed;
        }
        if let Some(r) = &self.ratio {
            let r = r.trim();
            if r == "adapt" || r.starts_with("adapt-") {
                let n = if r == "adapt" {
                    1024
                } else {
                    r["adapt-".len()..].parse().map_err(|_| {
                        BeaconError::config("--ratio", "ratio", "adapt-N with N an integer", r)
                    })?
                };
                c.ratios = ADAPT_RATIOS.to_vec();
                c.ratio_mix = RatioMix::Adapt(n);
            } else if r == "random" {
                c.ratios = ADAPT_RATIOS.to_vec();
                c.ratio_mix = RatioMix::StepRandom;
            } else {
                let v: usize = r.parse().map_err(|_| {
                    BeaconError::config(
                        "--ratio",
                        "ratio",
                        "an integer ratio, adapt, adapt-N or random",
                        r,
                    )
                })?;
                c.ratios = vec![v];
            }
        }
        c.validate("engine options")?;
        Ok(c)
    }

    /// The requested K/V cache dtype, if any.
    pub fn kv_dtype(&self) -> Result<Option<DType>> {
        Ok(match self.kv_dtype.as_deref().map(str::trim) {
            None => None,
            Some("f32") => Some(DType::F32),
            Some("f16") => Some(DType::F16),
            Some("bf16") => Some(DType::BF16),
            Some(other) => {
                return Err(BeaconError::config(
                    "--kv-dtype",
                    "kv_dtype",
                    "f16, f32 or bf16",
                    other,
                ))
            }
        })
    }

    /// A fresh session for `model` with these options over the model's beacon settings `base`.
    pub fn session(&self, model: &Model, base: &BeaconConfig) -> Result<Session> {
        let beacon = self.beacon_config(base)?;
        let mut s = Session::new(
            model,
            self.mode_for(model.cfg.max_position_embeddings, &beacon)?,
            beacon,
        );
        if let Some(dtype) = self.kv_dtype()? {
            s.set_kv_dtype(model, dtype)?;
        }
        Ok(s)
    }

    /// The mode, with `window-only` taking its window and sink from `beacon` (the beacon settings
    /// after overrides, as [`EngineOptions::beacon_config`] gives them).
    pub fn mode_for(&self, native_window: usize, beacon: &BeaconConfig) -> Result<Mode> {
        if self.is_window_only() {
            return Ok(Mode::WindowOnly {
                sink: beacon.sink_size,
                window: beacon.window,
            });
        }
        self.mode(native_window)
    }

    fn is_window_only(&self) -> bool {
        matches!(self.mode.as_deref().map(str::trim), Some("window-only"))
    }

    /// The mode. `window-only` needs the beacon settings (its window and sink): use
    /// [`EngineOptions::mode_for`] or [`EngineOptions::session`]; here it is an error unless both
    /// `window` and `sink` are set in these options.
    pub fn mode(&self, native_window: usize) -> Result<Mode> {
        let keep = self.keep.unwrap_or(native_window);
        if self.is_window_only() {
            return match (self.window, self.sink) {
                (Some(window), Some(sink)) if window > 0 => Ok(Mode::WindowOnly { sink, window }),
                _ => Err(BeaconError::invalid(
                    "--mode window-only takes its window and sink from the beacon settings \
                     (EngineOptions::mode_for), or from both --window and --sink",
                )),
            };
        }
        Ok(match self.mode.as_deref().unwrap_or("beacon") {
            "beacon" => Mode::Beacon,
            "full" => Mode::Full,
            "streaming" => Mode::Streaming {
                sink: self.sink.unwrap_or(4).max(1),
                recent: keep,
            },
            "truncate" => Mode::Truncate { keep },
            other => {
                return Err(BeaconError::config(
                    "--mode",
                    "mode",
                    "beacon, full, window-only, streaming or truncate",
                    other,
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model's raw tail follows a --window override as a share of the window (a tail of 256
    /// with a window of 64 would be refused); an explicit --raw-tail wins and is validated.
    #[test]
    fn raw_tail_follows_a_window_override() {
        let base = BeaconConfig {
            window: 512,
            stride: 512,
            raw_tail: 256,
            ..Default::default()
        };
        let with = |window: Option<usize>, raw_tail: Option<usize>| {
            EngineOptions {
                window,
                raw_tail,
                ..Default::default()
            }
            .beacon_config(&base)
        };
        assert_eq!(with(None, None).unwrap().raw_tail, 256);
        assert_eq!(with(Some(64), None).unwrap().raw_tail, 32);
        assert_eq!(with(Some(64), Some(0)).unwrap().raw_tail, 0);
        assert_eq!(with(None, Some(100)).unwrap().raw_tail, 100);
        let e = with(Some(64), Some(64)).unwrap_err().to_string();
        assert!(e.contains("beacon_raw_tail") && e.contains("64"), "{e}");
    }

    #[test]
    fn ratio_flags() {
        let base = BeaconConfig {
            window: 512,
            stride: 512,
            ..Default::default()
        };
        let o = EngineOptions {
            ratio: Some("8".into()),
            ..Default::default()
        };
        assert_eq!(o.beacon_config(&base).unwrap().ratios, vec![8]);
        let o = EngineOptions {
            ratio: Some("adapt".into()),
            ..Default::default()
        };
        assert_eq!(
            o.beacon_config(&base).unwrap().ratio_mix,
            RatioMix::Adapt(1024)
        );
        let o = EngineOptions {
            ratio: Some("3".into()),
            ..Default::default()
        };
        let e = o.beacon_config(&base).unwrap_err().to_string();
        assert!(e.contains("beacon_ratio") && e.contains('3'), "{e}");
        let o = EngineOptions {
            ratio: Some("x".into()),
            ..Default::default()
        };
        assert!(o.beacon_config(&base).is_err());
        let o = EngineOptions {
            mode: Some("nope".into()),
            ..Default::default()
        };
        assert!(o.mode(8192).is_err());
        // window-only: the beacon settings' window and sink, after overrides
        let base = BeaconConfig {
            sink_size: 1,
            ..base
        };
        let o = EngineOptions {
            mode: Some("window-only".into()),
            ..Default::default()
        };
        let c = o.beacon_config(&base).unwrap();
        assert_eq!(
            o.mode_for(8192, &c).unwrap(),
            Mode::WindowOnly {
                sink: 1,
                window: 512
            }
        );
        assert!(o.mode(8192).is_err());
        let o = EngineOptions {
            mode: Some("window-only".into()),
            window: Some(64),
            sink: Some(4),
            ..Default::default()
        };
        let c = o.beacon_config(&base).unwrap();
        let want = Mode::WindowOnly {
            sink: 4,
            window: 64,
        };
        assert_eq!(o.mode_for(8192, &c).unwrap(), want);
        assert_eq!(o.mode(8192).unwrap(), want);
        let o = EngineOptions {
            kv_dtype: Some("f8".into()),
            ..Default::default()
        };
        let e = o.kv_dtype().unwrap_err().to_string();
        assert!(e.contains("kv_dtype") && e.contains("f8"), "{e}");
    }
}
