//! Targets from the frozen backbone, computed once per training sample and reused by every run.
//!
//! The backbone never changes during beacon training, so what it predicts for a sample can be
//! cached: per position p (predicting token p+1)
//! - `nll_full`: the NLL with the whole sample in view (full attention; the sample fits the native
//!   window);
//! - `nll_window`: the NLL with only the sink and the open window in view (every earlier window
//!   dropped: what the model knows with no memory at all);
//! - the full view's top-k token ids and log-probabilities (for distillation without a teacher forward).
//!
//! From these, [`long_gain_weights`] gives the long-context token weights
//! `w = min(exp(nll_window − nll_full), cap)`: tokens that only the far context predicts weigh most.
//!
//! Storage: one safetensors file per sample, named by a hash of (tokens, settings), with a JSON
//! sidecar holding its SHA-256; both written atomically (tensors first, JSON last), verified on load
//! (a file that does not verify is rebuilt). A read takes the file once: the checksum and the tensors
//! come from the same bytes.

use crate::checkpoint::{sha256_file, sha256_hex};
use crate::objective::logsumexp;
use anyhow::{bail, Context, Result};
use beacon::model::Model;
use beacon::session::{Mode, Session, Want};
use beacon::util::{atomic_write, atomic_write_with};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a cache entry depends on besides the tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// Identifies the backbone (file name and vocabulary).
    pub model_id: String,
    pub window: usize,
    pub sink: usize,
    /// Top-k entries kept per position.
    pub k: usize,
}

/// The cached targets of one sample of `len` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleTargets {
    pub nll_full: Vec<f32>,
    pub nll_window: Vec<f32>,
    /// `[len, k]` row-major.
    pub topk_ids: Vec<u32>,
    pub topk_logp: Vec<f32>,
    pub k: usize,
}

/// `w_p = min(exp(nll_window_p − nll_full_p), cap)`, in [exp(−∞), cap]; 1 where the two views agree.
pub fn long_gain_weights(t: &SampleTargets, cap: f32) -> Vec<f32> {
    t.nll_window
        .iter()
        .zip(&t.nll_full)
        .map(|(&w, &f)| (w - f).exp().min(cap))
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct Sidecar {
    spec: TargetSpec,
    tokens: usize,
    tensors_sha256: String,
    build_seconds: f64,
}

/// A directory of cached targets.
pub struct TargetCache {
    pub dir: PathBuf,
    pub spec: TargetSpec,
    /// Seconds spent building entries in this process (for the cost report).
    pub build_seconds: f64,
    pub built: usize,
    pub reused: usize,
}

impl TargetCache {
    pub fn new(dir: &Path, spec: TargetSpec) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TargetCache {
            dir: dir.to_path_buf(),
            spec,
            build_seconds: 0.0,
            built: 0,
            reused: 0,
        })
    }

    fn key(&self, tokens: &[u32]) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.spec).unwrap_or_default());
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        h.finalize()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The targets of `tokens`: read from the cache, or computed with `model` and stored.
    pub fn get_or_build(&mut self, model: &Model, tokens: &[u32]) -> Result<SampleTargets> {
        let key = self.key(tokens);
        let st_path = self.dir.join(format!("{key}.safetensors"));
        let json_path = self.dir.join(format!("{key}.json"));
        if let Some(t) = self.read(&st_path, &json_path, tokens.len())? {
            self.reused += 1;
            return Ok(t);
        }
        let t0 = std::time::Instant::now();
        let t = compute_targets(model, tokens, self.spec.window, self.spec.sink, self.spec.k)?;
        let secs = t0.elapsed().as_secs_f64();
        self.write(&st_path, &json_path, &t, secs)?;
        self.build_seconds += secs;
        self.built += 1;
        Ok(t)
    }

    fn read(&self, st: &Path, json: &Path, len: usize) -> Result<Option<SampleTargets>> {
        let Ok(text) = std::fs::read_to_string(json) else {
            return Ok(None);
        };
        let side: Sidecar = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warning: {}: {e}; rebuilding", json.display());
                return Ok(None);
            }
        };
        let bytes = match std::fs::read(st) {
            Ok(b) => b,
            Err(_) => return Ok(None),
        };
        if side.spec != self.spec || side.tokens != len || sha256_hex(&bytes) != side.tensors_sha256
        {
            eprintln!("warning: {} does not verify; rebuilding", st.display());
            return Ok(None);
        }
        let m = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let get = |n: &str| -> Result<Tensor> {
            m.get(n)
                .cloned()
                .with_context(|| format!("{} lacks {n}", st.display()))
        };
        let k = self.spec.k;
        let t = SampleTargets {
            nll_full: get("nll_full")?.to_vec1()?,
            nll_window: get("nll_window")?.to_vec1()?,
            topk_ids: get("topk_ids")?.flatten_all()?.to_vec1()?,
            topk_logp: get("topk_logp")?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            k,
        };
        if t.nll_full.len() != len || t.topk_ids.len() != len * k {
            bail!("{}: shapes do not match {len} tokens × k {k}", st.display());
        }
        Ok(Some(t))
    }

    fn write(&self, st: &Path, json: &Path, t: &SampleTargets, secs: f64) -> Result<()> {
        let n = t.nll_full.len();
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        map.insert(
            "nll_full".to_string(),
            Tensor::new(t.nll_full.as_slice(), &dev)?,
        );
        map.insert(
            "nll_window".to_string(),
            Tensor::new(t.nll_window.as_slice(), &dev)?,
        );
        map.insert(
            "topk_ids".to_string(),
            Tensor::from_vec(t.topk_ids.clone(), (n, t.k), &dev)?,
        );
        // Log-probabilities in f16: 2 bytes each, plenty for a soft target.
        map.insert(
            "topk_logp".to_string(),
            Tensor::from_vec(t.topk_logp.clone(), (n, t.k), &dev)?.to_dtype(DType::F16)?,
        );
        let mut digest = String::new();
        atomic_write_with(st, |tmp| {
            candle_core::safetensors::save(&map, tmp)?;
            digest = sha256_file(tmp).map_err(|e| beacon::BeaconError::invalid(e.to_string()))?;
            Ok(())
        })?;
        let side = Sidecar {
            spec: self.spec.clone(),
            tokens: n,
            tensors_sha256: digest,
            build_seconds: secs,
        };
        atomic_write(json, serde_json::to_string_pretty(&side)?.as_bytes())?;
        Ok(())
    }
}

/// Per-row NLL of `next` and the top-k log-probabilities of logits rows `[rows, vocab]`.
fn rows_to_targets(
    logits: &Tensor,
    next: &[Option<u32>],
    k: usize,
    nll: &mut Vec<f32>,
    ids: &mut Vec<u32>,
    logp: &mut Vec<f32>,
) -> Result<()> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    for (row, label) in rows.iter().zip(next) {
        let lse = logsumexp(row);
        nll.push(label.map_or(0.0, |l| lse - row[l as usize]));
        if k == 0 {
            continue;
        }
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let k = k.min(row.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        idx.truncate(k);
        idx.sort_unstable_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        for &i in &idx {
            ids.push(i);
            logp.push(row[i as usize] - lse);
        }
    }
    Ok(())
}

/// Compute a sample's targets: full attention over the whole sample, then every window alone after
/// the sink (fed in pieces so the logits never hold more than one window's rows).
pub fn compute_targets(
    model: &Model,
    tokens: &[u32],
    window: usize,
    sink: usize,
    k: usize,
) -> Result<SampleTargets> {
    let limit = model.cfg.max_position_embeddings;
    if tokens.len() > limit {
        bail!(
            "backbone targets need samples within the native context ({} tokens > {limit}); use a shorter --seq-len",
            tokens.len()
        );
    }
    let n = tokens.len();
    let next = |p: usize| tokens.get(p + 1).copied();
    let (mut nll_full, mut ids, mut logp) = (Vec::with_capacity(n), Vec::new(), Vec::new());
    let mut s = Session::new(model, Mode::Full, beacon::BeaconConfig::default());
    for start in (0..n).step_by(window) {
        let end = (start + window).min(n);
        let l = s
            .feed(model, &tokens[start..end], Want::From(0))?
            .context("full view produced no logits")?;
        let labels: Vec<Option<u32>> = (start..end).map(next).collect();
        rows_to_targets(&l, &labels, k, &mut nll_full, &mut ids, &mut logp)?;
    }
    // Window view: the first window sees exactly what the full view saw.
    let mut nll_window = nll_full[..window.min(n)].to_vec();
    let (mut scratch_ids, mut scratch_logp) = (Vec::new(), Vec::new());
    for start in (window..n).step_by(window) {
        let end = (start + window).min(n);
        let mut s = Session::new(model, Mode::Full, beacon::BeaconConfig::default());
        if sink > 0 {
            s.feed(model, &tokens[..sink.min(start)], Want::None)?;
        }
        let l = s
            .feed(model, &tokens[start..end], Want::From(0))?
            .context("window view produced no logits")?;
        let labels: Vec<Option<u32>> = (start..end).map(next).collect();
        scratch_ids.clear();
        scratch_logp.clear();
        rows_to_targets(
            &l,
            &labels,
            0,
            &mut nll_window,
            &mut scratch_ids,
            &mut scratch_logp,
        )?;
    }
    Ok(SampleTargets {
        nll_full,
        nll_window,
        topk_ids: ids,
        topk_logp: logp,
        k,
    })
}
