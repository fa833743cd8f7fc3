//! Configuration: the backbone's hyper-parameters and the beacon settings.
//!
//! Parsing and running stay apart: [`HfConfig`] mirrors the keys of a Hugging Face `config.json`
//! (including every `beacon_*` key of the released checkpoints), [`ModelConfig`] and [`BeaconConfig`]
//! are the plain, validated runtime values the engine reads.

use crate::error::{BeaconError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Backbone family. All three share the decoder block; Qwen2 adds q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    pub fn from_model_type(model_type: &str, source: &str) -> Result<Self> {
        match model_type {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "mistral" => Ok(Arch::Mistral),
            other => Err(BeaconError::config(
                source,
                "model_type",
                "one of llama, qwen2, mistral",
                other,
            )),
        }
    }
}

/// Runtime backbone hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `rope_scaling.factor` when the checkpoint uses linear scaling; multiplies the position budget
    /// used by `adapt-N` (SPEC §2.10).
    pub rope_scaling_factor: Option<f64>,
    /// GGUF llama weights keep q/k rows in GGML's interleaved-pair order, so RoPE rotates adjacent
    /// pairs instead of halves. Hugging Face checkpoints use halves (`rotate_half`).
    pub rope_interleaved: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Id of the beacon token: one past the vocabulary (SPEC §1.1).
    pub fn beacon_token_id(&self) -> u32 {
        self.vocab_size as u32
    }
}

/// Where beacons go in a window (SPEC §1.4 `beacon_pos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BeaconPos {
    /// One beacon after every α raw tokens (final release).
    #[serde(rename = "interleave")]
    Interleave,
    /// All W/α beacons after the window's raw tokens (early Mistral release).
    #[serde(rename = "append")]
    Append,
}

/// What a beacon may attend to (SPEC §2.6 `beacon_attn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BeaconAttn {
    #[serde(rename = "full-coverage")]
    FullCoverage,
    #[serde(rename = "step-expansion")]
    StepExpansion,
    #[serde(rename = "segmentation")]
    Segmentation,
}

/// How the compression ratio of a window is chosen (SPEC §2.10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RatioMix {
    /// A new seeded random draw for each window.
    StepRandom,
    /// One draw per sequence.
    InstanceRandom,
    /// Cycle through the candidates, one per window.
    Sequence,
    /// Fit-to-budget: chosen once from the prompt length plus `N` expected future tokens.
    Adapt(usize),
}

impl RatioMix {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "step-random" => Some(RatioMix::StepRandom),
            "instance-random" => Some(RatioMix::InstanceRandom),
            "sequence" => Some(RatioMix::Sequence),
            _ => s
                .strip_prefix("adapt-")
                .and_then(|n| n.parse().ok())
                .map(RatioMix::Adapt),
        }
    }
    pub fn name(&self) -> String {
        match self {
            RatioMix::StepRandom => "step-random".into(),
            RatioMix::InstanceRandom => "instance-random".into(),
            RatioMix::Sequence => "sequence".into(),
            RatioMix::Adapt(n) => format!("adapt-{n}"),
        }
    }
}

/// Which projections have separate beacon weights (`beacon_param`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeaconParams {
    pub q: bool,
    pub k: bool,
    pub v: bool,
    pub o: bool,
}

impl BeaconParams {
    pub fn parse(list: &[String], source: &str) -> Result<Self> {
        let mut p = BeaconParams::default();
        for name in list {
            match name.as_str() {
                "q" => p.q = true,
                "k" => p.k = true,
                "v" => p.v = true,
                "o" => p.o = true,
                other => {
                    return Err(BeaconError::config(
                        source,
                        "beacon_param",
                        "entries among q, k, v, o (the final code has no mlp option)",
                        other,
                    ))
                }
            }
        }
        Ok(p)
    }
    /// `(name, on)` for q, k, v, o, in that order.
    pub fn each(&self) -> [(&'static str, bool); 4] {
        [("q", self.q), ("k", self.k), ("v", self.v), ("o", self.o)]
    }
    /// The projections of `self` for which `keep(name)` holds.
    pub fn filter(&self, keep: impl Fn(&str) -> bool) -> Self {
        BeaconParams {
            q: self.q && keep("q"),
            k: self.k && keep("k"),
            v: self.v && keep("v"),
            o: self.o && keep("o"),
        }
    }
    pub fn names(&self) -> Vec<String> {
        self.each()
            .into_iter()
            .filter(|&(_, on)| on)
            .map(|(n, _)| n.to_string())
            .collect()
    }
}

/// Validated beacon settings (SPEC §1.4). Defaults are those of the official configuration files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeaconConfig {
    /// Raw tokens per window. Default: 1024.
    pub window: usize,
    /// Raw tokens the window advances. Default: 1024; must equal `window` for interleave.
    pub stride: usize,
    /// Default: full-coverage (plain causal attention).
    pub attn: BeaconAttn,
    /// Candidate ratios α (raw tokens per beacon); 0 = keep the window raw. Default: [2,4,8,16,32].
    pub ratios: Vec<usize>,
    /// Default: step-random.
    pub ratio_mix: RatioMix,
    /// Default: none (the recipes use q,k,v).
    pub params: BeaconParams,
    /// `eos` or `bos`: which embedding row initialises the beacon embedding. Default: eos.
    pub embed_init: String,
    /// Leading entries kept forever as an attention sink. Default: 0.
    pub sink_size: usize,
    /// Append mode: beacons of a window see that window's earlier beacons. Default: true.
    pub attend_prev: bool,
    /// Default: interleave.
    pub pos: BeaconPos,
    /// Seed of the `step-random`/`instance-random` draws (ours; the reference uses numpy seed 42).
    pub seed: u64,
    /// Raw tail (ours, not in the reference): the last `raw_tail` raw entries of the most recently
    /// closed window stay in memory after the beacons until the next window closes, so the first
    /// tokens of a window still see the text just before them. Default 0 (the reference's rule).
    #[serde(default)]
    pub raw_tail: usize,
}

impl Default for BeaconConfig {
    fn default() -> Self {
        BeaconConfig {
            window: 1024,
            stride: 1024,
            attn: BeaconAttn::FullCoverage,
            ratios: vec![2, 4, 8, 16, 32],
            ratio_mix: RatioMix::StepRandom,
            params: BeaconParams::default(),
            embed_init: "eos".into(),
            sink_size: 0,
            attend_prev: true,
            pos: BeaconPos::Interleave,
            seed: 42,
            raw_tail: 0,
        }
    }
}

impl BeaconConfig {
    /// Reject the configurations the reference itself cannot run, and ratios that cannot tile a window.
    pub fn validate(&self, source: &str) -> Result<()> {
        let err = |key: &str, expected: &str, found: String| {
            Err(BeaconError::config(source, key, expected, &found))
        };
        if self.window == 0 {
            return err(
                "beacon_window",
                "a positive number of raw tokens",
                "0".into(),
            );
        }
        if self.stride == 0 || self.stride > self.window {
            return err(
                "beacon_stride",
                &format!("1..={} (stride ≤ window)", self.window),
                self.stride.to_string(),
            );
        }
        if self.pos == BeaconPos::Interleave && self.stride != self.window {
            return err(
                "beacon_stride",
                &format!("{} (interleave requires stride == window)", self.window),
                self.stride.to_string(),
            );
        }
        if self.stride != self.window {
            return err(
                "beacon_stride",
                &format!(
                    "{} (stride < window crashes in the reference's append path, SPEC §6)",
                    self.window
                ),
                self.stride.to_string(),
            );
        }
        if self.attn == BeaconAttn::Segmentation {
            return err(
                "beacon_attn",
                "full-coverage or step-expansion (segmentation is broken in the reference)",
                "segmentation".into(),
            );
        }
        if self.attn == BeaconAttn::StepExpansion && self.pos == BeaconPos::Interleave {
            return err(
                "beacon_attn",
                "full-coverage with interleave (interleave + step-expansion is broken in the reference)",
                "step-expansion".into(),
            );
        }
        if self.ratios.is_empty() {
            return err("beacon_ratio", "at least one ratio", "[]".into());
        }
        for &r in &self.ratios {
            if r > 0 && (r > self.stride || !self.stride.is_multiple_of(r)) {
                // A single ratio is used as given by the reference, so it must tile the window itself.
                if self.ratios.len() == 1 {
                    return err(
                        "beacon_ratio",
                        &format!("a ratio dividing the window {}", self.window),
                        r.to_string(),
                    );
                }
            }
        }
        if self.filtered_ratios().is_empty() {
            return err(
                "beacon_ratio",
                &format!("at least one ratio dividing the window {}", self.window),
                format!("{:?}", self.ratios),
            );
        }
        if self.embed_init != "eos" && self.embed_init != "bos" {
            return err("beacon_embed_init", "eos or bos", self.embed_init.clone());
        }
        if self.raw_tail >= self.window {
            return err(
                "beacon_raw_tail",
                &format!("fewer raw entries than the window ({})", self.window),
                self.raw_tail.to_string(),
            );
        }
        Ok(())
    }

    /// Candidates that tile a window (SPEC §2.10 step 2, inference part).
    pub fn filtered_ratios(&self) -> Vec<usize> {
        if self.ratios.len() == 1 {
            return self.ratios.clone();
        }
        self.ratios
            .iter()
            .copied()
            .filter(|&r| r == 0 || (r <= self.stride && self.stride.is_multiple_of(r)))
            .collect()
    }
}

/// The keys of a Hugging Face `config.json` that the engine reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub hidden_act: Option<String>,
    /// The `beacon_*` keys (SPEC §1.4); absent = default.
    #[serde(flatten)]
    pub beacon: BeaconKeys,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    4096
}

/// The end ids `generation_config.json` in `dir` lists (an int or a list; none when the file or
/// the key is absent). The loader and the tokenizer both read them through here.
pub fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| BeaconError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| BeaconError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(token_ids(&v.get("eos_token_id").cloned()))
}

/// Token ids in HF configs are an int, a list of ints, or null.
pub fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl HfConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BeaconError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| BeaconError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn model_config(&self, source: &str) -> Result<ModelConfig> {
        let arch = Arch::from_model_type(self.model_type.as_deref().unwrap_or("llama"), source)?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(BeaconError::config(source, "hidden_act", "silu", act));
            }
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(BeaconError::config(
                source,
                "num_key_value_heads",
                &format!(
                    "a divisor of num_attention_heads={}",
                    self.num_attention_heads
                ),
                &num_kv_heads.to_string(),
            ));
        }
        let rope_scaling_factor = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("type")
                    .or_else(|| v.get("rope_type"))
                    .and_then(|t| t.as_str());
                if kind != Some("linear") {
                    return Err(BeaconError::config(
                        source,
                        "rope_scaling.type",
                        "null or linear",
                        &format!("{v}"),
                    ));
                }
                v.get("factor").and_then(|f| f.as_f64())
            }
        };
        Ok(ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling_factor,
            rope_interleaved: false,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias.unwrap_or(arch == Arch::Qwen2),
            bos_token_id: token_ids(&self.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&self.eos_token_id),
        })
    }

    /// Beacon settings from the `beacon_*` keys, defaults as SPEC §1.4.
    pub fn beacon_config(&self, source: &str) -> Result<BeaconConfig> {
        self.beacon.clone().resolve(BeaconConfig::default(), source)
    }
}

/// The `beacon_*` keys alone, as found in `config.json`, `beacon_config.json` or a fixture's
/// `beacon_settings`. Every key is optional; [`BeaconKeys::resolve`] applies them over a base.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BeaconKeys {
    pub beacon_window: Option<usize>,
    pub beacon_stride: Option<usize>,
    pub beacon_attn: Option<String>,
    pub beacon_ratio: Option<Vec<usize>>,
    pub beacon_ratio_mix: Option<String>,
    pub beacon_param: Option<Vec<String>>,
    pub beacon_embed_init: Option<String>,
    pub beacon_sink_size: Option<usize>,
    pub beacon_attend_prev: Option<bool>,
    pub beacon_pos: Option<String>,
    pub beacon_parallel_window: Option<usize>,
    /// Ours (see [`BeaconConfig::raw_tail`]); absent = 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beacon_raw_tail: Option<usize>,
}

impl BeaconKeys {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BeaconError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| BeaconError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn from_config(c: &BeaconConfig) -> Self {
        BeaconKeys {
            beacon_window: Some(c.window),
            beacon_stride: Some(c.stride),
            beacon_attn: Some(
                match c.attn {
                    BeaconAttn::FullCoverage => "full-coverage",
                    BeaconAttn::StepExpansion => "step-expansion",
                    BeaconAttn::Segmentation => "segmentation",
                }
                .into(),
            ),
            beacon_ratio: Some(c.ratios.clone()),
            beacon_ratio_mix: Some(c.ratio_mix.name()),
            beacon_param: Some(c.params.names()),
            beacon_embed_init: Some(c.embed_init.clone()),
            beacon_sink_size: Some(c.sink_size),
            beacon_attend_prev: Some(c.attend_prev),
            beacon_pos: Some(
                match c.pos {
                    BeaconPos::Interleave => "interleave",
                    BeaconPos::Append => "append",
                }
                .into(),
            ),
            beacon_parallel_window: Some(1),
            beacon_raw_tail: (c.raw_tail > 0).then_some(c.raw_tail),
        }
    }

    pub fn resolve(&self, base: BeaconConfig, source: &str) -> Result<BeaconConfig> {
        let mut c = base;
        if let Some(w) = self.beacon_window {
            c.window = w;
            // An unset stride follows the window (the interleave requirement).
            c.stride = w;
        }
        if let Some(s) = self.beacon_stride {
            c.stride = s;
        }
        if let Some(a) = &self.beacon_attn {
            c.attn = match a.as_str() {
                "full-coverage" => BeaconAttn::FullCoverage,
                "step-expansion" => BeaconAttn::StepExpansion,
                "segmentation" => BeaconAttn::Segmentation,
                other => {
                    return Err(BeaconError::config(
                        source,
                        "beacon_attn",
                        "full-coverage, step-expansion or segmentation",
                        other,
                    ))
                }
            };
        }
        if let Some(r) = &self.beacon_ratio {
            c.ratios = r.clone();
        }
        if let Some(m) = &self.beacon_ratio_mix {
            c.ratio_mix = RatioMix::parse(m).ok_or_else(|| {
                BeaconError::config(
                    source,
                    "beacon_ratio_mix",
                    "step-random, instance-random, sequence or adapt-N",
                    m,
                )
            })?;
        }
        if let Some(p) = &self.beacon_param {
            c.params = BeaconParams::parse(p, source)?;
        }
        if let Some(e) = &self.beacon_embed_init {
            c.embed_init = e.clone();
        }
        if let Some(s) = self.beacon_sink_size {
            c.sink_size = s;
        }
        if let Some(a) = self.beacon_attend_prev {
            c.attend_prev = a;
        }
        if let Some(p) = &self.beacon_pos {
            c.pos = match p.as_str() {
                "interleave" => BeaconPos::Interleave,
                "append" => BeaconPos::Append,
                other => {
                    return Err(BeaconError::config(
                        source,
                        "beacon_pos",
                        "interleave or append",
                        other,
                    ))
                }
            };
        }
        if let Some(t) = self.beacon_raw_tail {
            c.raw_tail = t;
        }
        if let Some(pw) = self.beacon_parallel_window {
            if pw != 1 {
                return Err(BeaconError::config(
                    source,
                    "beacon_parallel_window",
                    "1 (parallel windows are not supported)",
                    &pw.to_string(),
                ));
            }
        }
        c.validate(source)?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(json: &str) -> BeaconKeys {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_the_official_config() {
        let c = BeaconConfig::default();
        assert_eq!((c.window, c.stride, c.sink_size), (1024, 1024, 0));
        assert_eq!(c.ratios, vec![2, 4, 8, 16, 32]);
    }

    #[test]
    fn rejects_modes_the_reference_breaks_on() {
        let e = keys(r#"{"beacon_attn":"step-expansion"}"#)
            .resolve(BeaconConfig::default(), "cfg")
            .unwrap_err();
        assert!(e.to_string().contains("beacon_attn"), "{e}");
        let e = keys(r#"{"beacon_attn":"segmentation","beacon_pos":"append"}"#)
            .resolve(BeaconConfig::default(), "cfg")
            .unwrap_err();
        assert!(e.to_string().contains("segmentation"), "{e}");
        let e = keys(r#"{"beacon_window":1024,"beacon_stride":512}"#)
            .resolve(BeaconConfig::default(), "cfg")
            .unwrap_err();
        assert!(e.to_string().contains("beacon_stride"), "{e}");
    }

    #[test]
    fn ratio_must_divide_window() {
        let e = keys(r#"{"beacon_window":30,"beacon_ratio":[4]}"#)
            .resolve(BeaconConfig::default(), "cfg")
            .unwrap_err();
        assert!(e.to_string().contains("beacon_ratio"), "{e}");
        // In a list, the ratios that do not divide are filtered out (SPEC §2.10).
        let c = keys(r#"{"beacon_window":24,"beacon_ratio":[2,16,8,0]}"#)
            .resolve(BeaconConfig::default(), "cfg")
            .unwrap();
        assert_eq!(c.filtered_ratios(), vec![2, 8, 0]);
    }

    #[test]
    fn parses_adapt() {
        assert_eq!(RatioMix::parse("adapt-1024"), Some(RatioMix::Adapt(1024)));
        assert_eq!(RatioMix::parse("adapt-x"), None);
    }
}
