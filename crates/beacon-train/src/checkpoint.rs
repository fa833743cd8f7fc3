//! Checkpoints: `checkpoints/ckpt-<step>.safetensors` (parameters and AdamW moments) plus
//! `checkpoints/ckpt-<step>.json` (everything else: step, data position, RNG states, settings, and
//! the SHA-256 of the tensor file).
//!
//! Both files are written atomically (temporary file, fsync, rename), tensors first; the JSON is the
//! commit marker. A run killed at any moment leaves either a complete checkpoint or an orphan tensor
//! file without JSON, which is ignored. Loading verifies the checksum and falls back to the previous
//! checkpoint if the newest one does not verify.

use anyhow::{bail, Context, Result};
use beacon::util::atomic_write_with;
use candle_core::{Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The JSON part: `meta` is the trainer's own state (serde), wrapped with integrity data.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Envelope<M> {
    pub step: u64,
    pub tensors_file: String,
    pub tensors_sha256: String,
    pub meta: M,
}

/// Lower-case hex SHA-256 of `bytes` (checkpoints and cached targets).
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

fn stem(step: u64) -> String {
    format!("ckpt-{step:09}")
}

/// Write checkpoint `step` into `dir`, then keep only the newest `keep` checkpoints.
pub fn save<M: Serialize>(
    dir: &Path,
    step: u64,
    tensors: &HashMap<String, Tensor>,
    meta: &M,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tensors_name = format!("{}.safetensors", stem(step));
    let tensors_path = dir.join(&tensors_name);
    let mut digest = String::new();
    atomic_write_with(&tensors_path, |tmp| {
        candle_core::safetensors::save(tensors, tmp)?;
        digest = sha256_file(tmp).map_err(|e| beacon::BeaconError::invalid(e.to_string()))?;
        Ok(())
    })?;
    let env = Envelope {
        step,
        tensors_file: tensors_name,
        tensors_sha256: digest,
        meta,
    };
    let json_path = dir.join(format!("{}.json", stem(step)));
    let text = serde_json::to_string_pretty(&env)?;
    beacon::util::atomic_write(&json_path, text.as_bytes())?;
    prune(dir, keep)?;
    Ok(json_path)
}

/// Checkpoint steps present in `dir` (by their JSON marker), newest first.
pub fn list(dir: &Path) -> Result<Vec<u64>> {
    let mut steps = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(steps);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("ckpt-")
            .and_then(|s| s.strip_suffix(".json"))
        {
            if let Ok(s) = n.parse() {
                steps.push(s);
            }
        }
    }
    steps.sort_unstable_by(|a, b| b.cmp(a));
    Ok(steps)
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let steps = list(dir)?;
    let kept: Vec<u64> = steps.iter().copied().take(keep.max(1)).collect();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("ckpt-") else {
            continue;
        };
        let num: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(s) = num.parse::<u64>() {
            if !kept.contains(&s) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// A loaded checkpoint: its JSON envelope and its tensors by name.
pub type Loaded<M> = (Envelope<M>, HashMap<String, Tensor>);

/// Load checkpoint `step`, verifying the tensor file's checksum.
pub fn load<M: DeserializeOwned>(dir: &Path, step: u64) -> Result<Loaded<M>> {
    let json_path = dir.join(format!("{}.json", stem(step)));
    let text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let env: Envelope<M> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json_path.display()))?;
    let tensors_path = dir.join(&env.tensors_file);
    let digest = sha256_file(&tensors_path)?;
    if digest != env.tensors_sha256 {
        bail!(
            "{}: checksum mismatch (file damaged)",
            tensors_path.display()
        );
    }
    let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
        .with_context(|| format!("loading {}", tensors_path.display()))?;
    Ok((env, tensors))
}

/// The newest checkpoint of `dir` that verifies; damaged ones are reported and skipped.
pub fn load_latest<M: DeserializeOwned>(dir: &Path) -> Result<Option<Loaded<M>>> {
    for step in list(dir)? {
        match load(dir, step) {
            Ok(c) => return Ok(Some(c)),
            Err(e) => eprintln!("warning: skipping checkpoint {step}: {e:#}"),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_prune_and_damage() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("beacon-ckpt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut t = HashMap::new();
        for step in 1..=3u64 {
            t.insert(
                "x".to_string(),
                Tensor::new(&[step as f32, 2.0], &Device::Cpu)?,
            );
            save(&dir, step, &t, &format!("meta{step}"), 2)?;
        }
        assert_eq!(list(&dir)?, vec![3, 2]);
        let (env, tensors) = load_latest::<String>(&dir)?.expect("a checkpoint");
        assert_eq!((env.step, env.meta.as_str()), (3, "meta3"));
        assert_eq!(tensors["x"].to_vec1::<f32>()?, vec![3.0, 2.0]);
        // Damage the newest tensor file: loading falls back to the previous checkpoint.
        let p = dir.join(&env.tensors_file);
        let mut bytes = std::fs::read(&p)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&p, bytes)?;
        let (env, _) = load_latest::<String>(&dir)?.expect("a checkpoint");
        assert_eq!(env.step, 2);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
