//! Training data: documents from text files and JSONL (`"text"` field), tokenized once (cached on
//! disk), packed into fixed-length samples, with a held-out split that never trains.
//!
//! Packing: the documents of a split are concatenated in a fixed order, each followed by the end-of-
//! sequence token, and the stream is cut into samples of `seq_len` tokens (the tail is dropped). Each
//! epoch visits the samples in a seeded random order, so a run's data position is just
//! `(epoch, index)` and a resumed run reads exactly the samples it would have read.

use anyhow::{bail, Context, Result};
use beacon::schedule::SplitMix64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The books held out for perplexity evaluation ("Suggested split" in shared/data/README.md).
pub const DEFAULT_HELDOUT: &[&str] = &[
    "pg28054", "pg6593", "pg3300", "pg4300", "pg4276", "pg6688", "pg2600", "pg1023",
];

/// A text-to-ids function (the model's tokenizer, without special tokens).
pub type Encode<'a> = dyn Fn(&str) -> Result<Vec<u32>> + 'a;

/// One document: a whole text file, or one JSONL record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRef {
    pub file: PathBuf,
    /// Line index for JSONL records.
    pub line: Option<usize>,
}

impl DocRef {
    /// The name used to match the held-out list: the file stem (`pg1023`), or `stem:line`.
    pub fn name(&self) -> String {
        let stem = self
            .file
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        match self.line {
            None => stem,
            Some(l) => format!("{stem}:{l}"),
        }
    }
}

fn is_data_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("txt" | "jsonl" | "md")
    )
}

/// The data files under `paths` (files as given, directories expanded, sorted). Manifest and
/// licence files are skipped.
pub fn data_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && is_data_file(f))
                .filter(|f| {
                    let n = f
                        .file_name()
                        .map(|n| n.to_string_lossy().to_lowercase())
                        .unwrap_or_default();
                    !n.starts_with("manifest")
                        && !n.starts_with("readme")
                        && !n.starts_with("license")
                })
                .collect();
            files.sort();
            out.extend(files);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("data path {} does not exist", p.display());
        }
    }
    if out.is_empty() {
        bail!("no .txt/.jsonl data files under {:?}", paths);
    }
    Ok(out)
}

/// The texts of one file: one document for a text file, one per record (`"text"`) for JSONL.
pub fn read_documents(file: &Path) -> Result<Vec<(DocRef, String)>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    if file.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        return Ok(vec![(
            DocRef {
                file: file.to_path_buf(),
                line: None,
            },
            text,
        )]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", file.display(), i + 1))?;
        let Some(t) = v.get("text").and_then(|t| t.as_str()) else {
            bail!("{}:{}: no \"text\" field", file.display(), i + 1);
        };
        docs.push((
            DocRef {
                file: file.to_path_buf(),
                line: Some(i),
            },
            t.to_string(),
        ));
    }
    Ok(docs)
}

/// Tokenized documents of one split.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub docs: Vec<(String, Vec<u32>)>,
}

impl Split {
    pub fn tokens(&self) -> usize {
        self.docs.iter().map(|(_, t)| t.len()).sum()
    }
}

/// Cache key of a file's tokens: path, size, mtime and the tokenizer's identity.
fn cache_key(file: &Path, tokenizer_id: &str) -> Result<String> {
    let meta = std::fs::metadata(file)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut h = Sha256::new();
    h.update(
        file.canonicalize()
            .unwrap_or(file.to_path_buf())
            .to_string_lossy()
            .as_bytes(),
    );
    h.update(meta.len().to_le_bytes());
    h.update(mtime.to_le_bytes());
    h.update(tokenizer_id.as_bytes());
    Ok(h.finalize()
        .iter()
        .take(10)
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[derive(Serialize, Deserialize)]
struct CachedFile {
    docs: Vec<(String, usize)>,
}

/// Tokenize one file, through an on-disk cache (`<cache>/<key>.json` + `<key>.bin`, u32 LE).
fn tokenize_file(
    file: &Path,
    encode: &Encode,
    cache: Option<&Path>,
    tokenizer_id: &str,
) -> Result<Vec<(String, Vec<u32>)>> {
    let key = cache_key(file, tokenizer_id)?;
    if let Some(dir) = cache {
        let (jp, bp) = (
            dir.join(format!("{key}.json")),
            dir.join(format!("{key}.bin")),
        );
        if let (Ok(j), Ok(b)) = (std::fs::read_to_string(&jp), std::fs::read(&bp)) {
            if let Ok(c) = serde_json::from_str::<CachedFile>(&j) {
                let ids: Vec<u32> = b
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if c.docs.iter().map(|d| d.1).sum::<usize>() == ids.len() {
                    let mut off = 0;
                    return Ok(c
                        .docs
                        .into_iter()
                        .map(|(n, len)| {
                            let d = (n, ids[off..off + len].to_vec());
                            off += len;
                            d
                        })
                        .collect());
                }
            }
        }
    }
    let docs: Vec<(String, Vec<u32>)> = read_documents(file)?
        .into_iter()
        .map(|(d, text)| Ok((d.name(), encode(&text)?)))
        .collect::<Result<_>>()?;
    if let Some(dir) = cache {
        let bytes: Vec<u8> = docs
            .iter()
            .flat_map(|(_, t)| t.iter().flat_map(|x| x.to_le_bytes()))
            .collect();
        beacon::util::atomic_write(&dir.join(format!("{key}.bin")), &bytes)?;
        let c = CachedFile {
            docs: docs.iter().map(|(n, t)| (n.clone(), t.len())).collect(),
        };
        beacon::util::atomic_write(
            &dir.join(format!("{key}.json")),
            serde_json::to_string(&c)?.as_bytes(),
        )?;
    }
    Ok(docs)
}

/// Load and tokenize every document under `paths`, split into (train, held-out): a document is held
/// out when its name or its file's stem is in `heldout`. `max_docs` limits the number of training
/// documents (quick runs). `progress` is told each file as it is read.
pub fn load_splits(
    paths: &[PathBuf],
    heldout: &[String],
    encode: &Encode,
    cache: Option<&Path>,
    tokenizer_id: &str,
    max_docs: Option<usize>,
    progress: &mut dyn FnMut(&Path),
) -> Result<(Split, Split)> {
    let mut train = Split::default();
    let mut held = Split::default();
    for file in data_files(paths)? {
        progress(&file);
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let file_held = heldout.contains(&stem);
        if !file_held && max_docs.is_some_and(|m| train.docs.len() >= m) {
            continue;
        }
        for (name, ids) in tokenize_file(&file, encode, cache, tokenizer_id)? {
            if ids.is_empty() {
                continue;
            }
            if file_held || heldout.contains(&name) {
                held.docs.push((name, ids));
            } else if max_docs.is_none_or(|m| train.docs.len() < m) {
                train.docs.push((name, ids));
            }
        }
    }
    Ok((train, held))
}

/// Fixed-length samples packed from a split (see the module docs).
#[derive(Debug, Clone)]
pub struct Packed {
    stream: Vec<u32>,
    pub seq_len: usize,
}

impl Packed {
    /// Concatenate the documents (each followed by `eos`, if any) and cut into `seq_len` samples.
    pub fn new(split: &Split, seq_len: usize, eos: Option<u32>) -> Result<Self> {
        if seq_len < 2 {
            bail!("--seq-len must be at least 2");
        }
        let mut stream = Vec::with_capacity(split.tokens() + split.docs.len());
        for (_, ids) in &split.docs {
            stream.extend_from_slice(ids);
            stream.extend(eos);
        }
        Ok(Packed { stream, seq_len })
    }

    pub fn len(&self) -> usize {
        self.stream.len() / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn sample(&self, i: usize) -> &[u32] {
        &self.stream[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// The sample order of an epoch: a seeded Fisher–Yates shuffle.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xda7a);
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        order
    }

    /// `count` samples spread evenly over the split (the held-out evaluation set).
    pub fn spread(&self, count: usize) -> Vec<usize> {
        let n = self.len();
        if n == 0 {
            return Vec::new();
        }
        let count = count.min(n);
        (0..count).map(|i| i * n / count).collect()
    }
}

/// Where a run is in its data: epoch and index into that epoch's order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: usize,
}

/// An endless, resumable sequence of training samples.
pub struct SampleStream {
    pub packed: Packed,
    pub seed: u64,
    pub pos: DataPosition,
    order: Vec<usize>,
}

impl SampleStream {
    pub fn new(packed: Packed, seed: u64, pos: DataPosition) -> Result<Self> {
        if packed.is_empty() {
            bail!(
                "the training split has fewer tokens than one sample of {}",
                packed.seq_len
            );
        }
        let order = packed.epoch_order(seed, pos.epoch);
        Ok(SampleStream {
            packed,
            seed,
            pos,
            order,
        })
    }

    /// The next sample (advances the position).
    pub fn next_sample(&mut self) -> Vec<u32> {
        if self.pos.index >= self.order.len() {
            self.pos = DataPosition {
                epoch: self.pos.epoch + 1,
                index: 0,
            };
            self.order = self.packed.epoch_order(self.seed, self.pos.epoch);
        }
        let s = self.packed.sample(self.order[self.pos.index]).to_vec();
        self.pos.index += 1;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> Result<Vec<u32>> {
        Ok(s.bytes().map(u32::from).collect())
    }

    #[test]
    fn split_pack_and_resume() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("beacon-data-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cache"))?;
        std::fs::write(dir.join("a.txt"), "hello world, this is a book")?;
        std::fs::write(dir.join("held.txt"), "never train on me")?;
        std::fs::write(
            dir.join("c.jsonl"),
            "{\"text\": \"fn main() {}\"}\n{\"text\": \"x = 1\"}\n",
        )?;
        let held = vec!["held".to_string()];
        let (train, heldout) = load_splits(
            std::slice::from_ref(&dir),
            &held,
            &bytes,
            Some(&dir.join("cache")),
            "bytes",
            None,
            &mut |_| {},
        )?;
        assert_eq!(train.docs.len(), 3);
        assert_eq!(heldout.docs.len(), 1);
        assert!(train.docs.iter().all(|(n, _)| !n.starts_with("held")));
        // Cached tokens are identical.
        let (train2, _) = load_splits(
            std::slice::from_ref(&dir),
            &held,
            &|_| bail!("must come from the cache"),
            Some(&dir.join("cache")),
            "bytes",
            None,
            &mut |_| {},
        )?;
        assert_eq!(train.docs, train2.docs);
        let packed = Packed::new(&train, 8, Some(0))?;
        assert_eq!(packed.len(), (train.tokens() + 3) / 8);
        let mut a = SampleStream::new(packed.clone(), 7, DataPosition::default())?;
        let first: Vec<Vec<u32>> = (0..10).map(|_| a.next_sample()).collect();
        let mut b = SampleStream::new(packed.clone(), 7, DataPosition::default())?;
        for _ in 0..4 {
            b.next_sample();
        }
        let mut c = SampleStream::new(packed, 7, b.pos)?;
        let rest: Vec<Vec<u32>> = (4..10).map(|_| c.next_sample()).collect();
        assert_eq!(&first[4..], &rest[..]);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
