//! Saved contexts: a session's memory written to disk so a later run continues from it without
//! re-reading the input (`beacon compress` → `beacon run --context`), and the in-memory snapshots the
//! server keeps of conversations.
//!
//! A file is a safetensors file whose `__metadata__` holds:
//! - `format` = `beacon-context` and `version` (checked first, so an unknown version says so),
//! - `header`: JSON of [`ContextHeader`] (mode, beacon settings, memory layout, ratio-chooser state,
//!   statistics, the model fingerprint, the input's hash),
//! - `checksum`: SHA-256 over the header and every tensor (name, dtype, shape, bytes), so a flipped
//!   byte anywhere is caught; a truncated file already fails safetensors' own offset checks.
//!
//! Tensors: `tokens` (u32, the exact raw prefix the memory has seen), `layers.{i}.k` / `layers.{i}.v`
//! `[kv_heads, entries, head_dim]` (keys rotated, as the session caches them: entry j sits at position j),
//! and optionally `logits` `[vocab]` of the last token, so an empty continuation can still sample.
//! Writes are atomic (temporary file + fsync + rename).

use crate::config::BeaconConfig;
use crate::error::{BeaconError, Result};
use crate::model::Model;
use crate::schedule::RatioChooser;
use crate::session::{MemoryLayout, Mode, Session, Stats};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Value of the `format` metadata key.
pub const FORMAT: &str = "beacon-context";
/// Current file version. Readers refuse any other.
pub const VERSION: u32 = 1;

/// Everything about a saved memory except its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextHeader {
    /// Fingerprint of backbone and beacon weights ([`crate::Loaded::fingerprint`]).
    pub model_fingerprint: String,
    /// SHA-256 (hex) of the input the memory was built from, when known.
    pub input_sha256: Option<String>,
    /// Raw tokens the memory has seen.
    pub token_count: usize,
    pub mode: Mode,
    pub beacon: BeaconConfig,
    pub layout: MemoryLayout,
    pub chooser: RatioChooser,
    pub stats: Stats,
    pub prefill_chunk: usize,
    /// dtype of the K/V tensors (`f32`, `bf16`, `f16`).
    pub kv_dtype: String,
    pub num_layers: usize,
    pub has_logits: bool,
}

/// A session's complete state, detached from the session (tensors are copies).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub header: ContextHeader,
    /// The exact raw prefix the memory has seen.
    pub tokens: Vec<u32>,
    /// Per layer (k_rot, v), each `[kv_heads, entries, head_dim]`.
    pub caches: Vec<(Tensor, Tensor)>,
    /// Logits `[vocab]` after the last token, when captured.
    pub logits: Option<Tensor>,
}

impl Snapshot {
    /// Copy a session's memory. `logits` are those of its last token, if the caller has them.
    pub fn capture(
        session: &Session,
        model_fingerprint: &str,
        logits: Option<&Tensor>,
    ) -> Result<Self> {
        let caches = session.export_caches()?;
        let kv_dtype = caches.first().map(|(k, _)| k.dtype()).unwrap_or(DType::F32);
        let logits = match logits {
            Some(l) => {
                // `[rows, vocab]` from a feed keeps only its last row.
                let l = if l.rank() == 2 {
                    l.get(l.dim(0)? - 1)?
                } else {
                    l.clone()
                };
                Some(l.to_dtype(DType::F32)?.contiguous()?)
            }
            None => None,
        };
        Ok(Snapshot {
            header: ContextHeader {
                model_fingerprint: model_fingerprint.to_string(),
                input_sha256: None,
                token_count: session.tokens.len(),
                mode: session.mode.clone(),
                beacon: session.beacon.clone(),
                layout: session.layout.clone(),
                chooser: session.chooser.clone(),
                stats: session.stats.clone(),
                prefill_chunk: session.prefill_chunk,
                kv_dtype: dtype_name(kv_dtype).to_string(),
                num_layers: caches.len(),
                has_logits: logits.is_some(),
            },
            tokens: session.tokens.clone(),
            caches,
            logits,
        })
    }

    /// A new session holding this memory, continuing exactly where the captured one stood.
    pub fn restore(&self, model: &Model) -> Result<Session> {
        let h = &self.header;
        let cfg = &model.cfg;
        if self.caches.len() != cfg.num_layers {
            return Err(BeaconError::invalid(format!(
                "saved context has {} layers, the model has {}",
                self.caches.len(),
                cfg.num_layers
            )));
        }
        let entries = h.layout.context_len();
        for (i, (k, v)) in self.caches.iter().enumerate() {
            let want = [cfg.num_kv_heads, entries, cfg.head_dim];
            for (name, t) in [("k", k), ("v", v)] {
                if t.dims() != want {
                    return Err(BeaconError::Shape {
                        file: "saved context".into(),
                        name: format!("layers.{i}.{name}"),
                        expected: want.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
            }
        }
        if self.tokens.len() != h.token_count {
            return Err(BeaconError::invalid(format!(
                "saved context: header says {} tokens, the token list has {}",
                h.token_count,
                self.tokens.len()
            )));
        }
        let mut session = Session::new(model, h.mode.clone(), h.beacon.clone());
        // Continue in the dtype the memory was saved in (converting would change nothing but size).
        if let Some((k, _)) = self.caches.first() {
            session.set_kv_dtype(model, k.dtype())?;
        }
        session.chooser = h.chooser.clone();
        session.layout = h.layout.clone();
        session.stats = h.stats.clone();
        session.tokens = self.tokens.clone();
        session.prefill_chunk = h.prefill_chunk;
        session.import_caches(model, self.caches.clone())?;
        Ok(session)
    }

    /// Bytes of the tensors held (K/V plus logits).
    pub fn bytes(&self) -> usize {
        let kv: usize = self
            .caches
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum();
        kv + self
            .logits
            .as_ref()
            .map(|l| l.elem_count() * 4)
            .unwrap_or(0)
            + self.tokens.len() * 4
    }

    /// Write atomically. Returns the file size in bytes.
    pub fn save(&self, path: &Path) -> Result<u64> {
        let header_json = serde_json::to_string(&self.header)
            .map_err(|e| BeaconError::invalid(format!("cannot encode the context header: {e}")))?;
        let mut named: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let tokens: Vec<u8> = self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        named.push((
            "tokens".into(),
            StDtype::U32,
            vec![self.tokens.len()],
            tokens,
        ));
        for (i, (k, v)) in self.caches.iter().enumerate() {
            for (name, t) in [("k", k), ("v", v)] {
                let (dtype, bytes) = tensor_bytes(t)?;
                named.push((
                    format!("layers.{i}.{name}"),
                    dtype,
                    t.dims().to_vec(),
                    bytes,
                ));
            }
        }
        if let Some(l) = &self.logits {
            let (dtype, bytes) = tensor_bytes(l)?;
            named.push(("logits".into(), dtype, l.dims().to_vec(), bytes));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let checksum = checksum(
            &header_json,
            named
                .iter()
                .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())),
        );
        let views = named
            .iter()
            .map(|(n, d, s, b)| {
                TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| BeaconError::invalid(format!("saved context: tensor {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("header".to_string(), header_json),
            ("checksum".to_string(), checksum),
        ]);
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| {
            BeaconError::invalid(format!("{}: cannot serialise: {e}", path.display()))
        })?;
        crate::util::atomic_write(path, &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// Read and verify a file: format, version, checksum, shapes. The model fingerprint is checked by
    /// [`load_context`], which knows the model.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| BeaconError::io(path, e))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    fn from_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        let bad = |message: String| BeaconError::Parse {
            path: file.to_string(),
            message,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
            bad(format!(
                "not a saved context, or truncated or corrupted ({e})"
            ))
        })?;
        let info = meta.metadata().clone().unwrap_or_default();
        let get = |key: &str| {
            info.get(key).ok_or_else(|| {
                bad(format!(
                    "not a saved context: metadata key `{key}` is missing"
                ))
            })
        };
        if get("format")? != FORMAT {
            return Err(bad(format!(
                "not a saved context: format is `{}`, expected `{FORMAT}`",
                get("format")?
            )));
        }
        let version = get("version")?;
        if version.parse::<u32>().ok() != Some(VERSION) {
            return Err(bad(format!(
                "saved-context version {version} is not supported (this build reads version {VERSION})"
            )));
        }
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("truncated or corrupted ({e})")))?;
        let header_json = get("header")?;
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        let views = names
            .iter()
            .map(|n| st.tensor(n).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("corrupted ({e})")))?;
        let sum = checksum(
            header_json,
            views
                .iter()
                .map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())),
        );
        if &sum != get("checksum")? {
            return Err(bad("checksum mismatch: the file is corrupted".to_string()));
        }
        let header: ContextHeader =
            serde_json::from_str(header_json).map_err(|e| bad(format!("header: {e}")))?;
        let by_name: HashMap<&str, &TensorView> =
            views.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let tensor = |name: &str| -> Result<Tensor> {
            let v = by_name
                .get(name)
                .ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
            let dtype = match v.dtype() {
                StDtype::F32 => DType::F32,
                StDtype::BF16 => DType::BF16,
                StDtype::F16 => DType::F16,
                StDtype::U32 => DType::U32,
                other => return Err(bad(format!("tensor `{name}`: unsupported dtype {other:?}"))),
            };
            Ok(Tensor::from_raw_buffer(
                v.data(),
                dtype,
                v.shape(),
                &Device::Cpu,
            )?)
        };
        let tokens: Vec<u32> = tensor("tokens")?.to_vec1()?;
        let caches = (0..header.num_layers)
            .map(|i| {
                Ok((
                    tensor(&format!("layers.{i}.k"))?,
                    tensor(&format!("layers.{i}.v"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let logits = if header.has_logits {
            Some(tensor("logits")?)
        } else {
            None
        };
        Ok(Snapshot {
            header,
            tokens,
            caches,
            logits,
        })
    }
}

/// What [`save_context`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    pub file_bytes: u64,
    /// K/V bytes the memory holds.
    pub kv_bytes_held: usize,
    /// K/V bytes full attention would hold for the same tokens (what the file replaces).
    pub kv_bytes_full: usize,
    pub tokens: usize,
}

/// Save a session's memory to `path` (atomically).
pub fn save_context(
    path: &Path,
    session: &Session,
    model_fingerprint: &str,
    input_sha256: Option<&str>,
    logits: Option<&Tensor>,
) -> Result<SaveReport> {
    let mut snap = Snapshot::capture(session, model_fingerprint, logits)?;
    snap.header.input_sha256 = input_sha256.map(String::from);
    let file_bytes = snap.save(path)?;
    Ok(SaveReport {
        file_bytes,
        kv_bytes_held: session.kv_bytes_now(),
        kv_bytes_full: session.kv_bytes_full(),
        tokens: session.tokens.len(),
    })
}

/// A session restored from a file, with the logits of its last token when the file has them.
pub struct LoadedContext {
    pub session: Session,
    pub logits: Option<Tensor>,
    pub header: ContextHeader,
}

/// Load a saved context for `model`, whose fingerprint must match the one it was saved with.
pub fn load_context(path: &Path, model: &Model, model_fingerprint: &str) -> Result<LoadedContext> {
    let snap = Snapshot::load(path)?;
    if snap.header.model_fingerprint != model_fingerprint {
        return Err(BeaconError::invalid(format!(
            "{}: this context was saved with another model or other beacon weights \
             (fingerprint {}, the loaded model's is {model_fingerprint})",
            path.display(),
            snap.header.model_fingerprint
        )));
    }
    let session = snap.restore(model)?;
    Ok(LoadedContext {
        session,
        logits: snap.logits,
        header: snap.header,
    })
}

/// SHA-256 (hex) of bytes, e.g. an input file's text for [`ContextHeader::input_sha256`].
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn checksum<'a>(
    header: &str,
    tensors: impl Iterator<Item = (&'a str, StDtype, &'a [usize], &'a [u8])>,
) -> String {
    let mut h = Sha256::new();
    h.update((header.len() as u64).to_le_bytes());
    h.update(header.as_bytes());
    for (name, dtype, shape, data) in tensors {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{dtype:?}").as_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// Little-endian bytes of a tensor (f32, bf16, f16).
fn tensor_bytes(t: &Tensor) -> Result<(StDtype, Vec<u8>)> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            StDtype::F32,
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            StDtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            StDtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(BeaconError::invalid(format!(
                "saved context: unsupported K/V dtype {other:?}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_covers_names_and_bytes() {
        let a = checksum(
            "{}",
            [("x", StDtype::F32, &[1usize][..], &[0u8, 0, 0, 0][..])].into_iter(),
        );
        let b = checksum(
            "{}",
            [("x", StDtype::F32, &[1usize][..], &[0u8, 0, 0, 1][..])].into_iter(),
        );
        let c = checksum(
            "{}",
            [("y", StDtype::F32, &[1usize][..], &[0u8, 0, 0, 0][..])].into_iter(),
        );
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
