//! The tokenizer embedded in a GGUF file (`tokenizer.ggml.*`, byte-level BPE), rebuilt as a
//! `tokenizers` pipeline that reproduces llama.cpp's ids (pre-tokenizer regexes chosen by
//! `tokenizer.ggml.pre` as llama.cpp chooses them).

use super::{Tokenizer, EOG_TEXTS};
use crate::error::{BeaconError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::{BTreeSet, HashMap};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// The GPT-2 pre-tokenizer regex (data, as used by llama.cpp for several `tokenizer.ggml.pre` types).
pub(super) const RE_GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer regexes (applied in order, each splitting the pieces of the previous one) and
/// whether merges are skipped for whole-word vocabulary hits, per `tokenizer.ggml.pre` value.
pub(super) fn pre_tokenizer_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    let r = match pre {
        "default" => vec![
            r"[\p{P}\$\+<=>\^~\|]+",
            RE_GPT2,
            r"\p{N}+",
            "[0-9][0-9][0-9]",
        ],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => {
            return Some((vec![RE_LLAMA3], true))
        }
        "dbrx" | "smaug-bpe" => vec![RE_LLAMA3],
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" => vec![RE_QWEN2],
        "falcon" => vec![r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"],
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", RE_GPT2]
        }
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es" | "jina-de"
        | "jina-v2-es" | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" | "trillion" => {
            vec![RE_GPT2]
        }
        _ => return None,
    };
    Some((r, false))
}

impl Tokenizer {
    /// Builds the tokenizer stored in GGUF metadata (`tokenizer.ggml.model == "gpt2"`).
    /// `source` names the file in error messages.
    pub fn from_gguf(content: &Content, source: &str) -> Result<Self> {
        let md = &content.metadata;
        let model = meta_str(md, source, "tokenizer.ggml.model")?.ok_or_else(|| {
            BeaconError::config(source, "tokenizer.ggml.model", "\"gpt2\"", "nothing")
        })?;
        if model != "gpt2" {
            return Err(BeaconError::config(
                source,
                "tokenizer.ggml.model",
                "\"gpt2\" (byte-level BPE; the only GGUF tokenizer supported)",
                &format!("{model:?}"),
            ));
        }
        let tokens = meta_str_array(md, source, "tokenizer.ggml.tokens")?;
        let merges = meta_str_array(md, source, "tokenizer.ggml.merges")?;
        let n_vocab = tokens.len();
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            None => vec![1; n_vocab],
            Some(v) => {
                let list = v.to_vec().map_err(|_| {
                    BeaconError::config(
                        source,
                        "tokenizer.ggml.token_type",
                        "an array of integers",
                        &value_kind(v),
                    )
                })?;
                let ints = list
                    .iter()
                    .map(value_int)
                    .collect::<Option<Vec<i64>>>()
                    .ok_or_else(|| {
                        BeaconError::config(
                            source,
                            "tokenizer.ggml.token_type",
                            "an array of integers",
                            "other values",
                        )
                    })?;
                if ints.len() != n_vocab {
                    return Err(BeaconError::config(
                        source,
                        "tokenizer.ggml.token_type",
                        &format!("{n_vocab} entries (one per token)"),
                        &ints.len().to_string(),
                    ));
                }
                ints
            }
        };
        let pre = meta_str(md, source, "tokenizer.ggml.pre")?.unwrap_or("default");
        let (regexes, ignore_merges) = pre_tokenizer_regexes(pre).ok_or_else(|| {
            BeaconError::config(
                source,
                "tokenizer.ggml.pre",
                "a supported pre-tokenizer (default, gpt-2, llama-bpe, qwen2, smollm, starcoder, ...)",
                &format!("{pre:?}"),
            )
        })?;

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        BeaconError::config(
                            source,
                            &format!("tokenizer.ggml.merges[{i}]"),
                            "two tokens separated by a space",
                            &format!("{m:?}"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| {
                BeaconError::invalid(format!(
                    "{source}: tokenizer.ggml.tokens/merges: cannot build BPE: {e}"
                ))
            })?;

        let mut steps = Vec::with_capacity(regexes.len() + 1);
        for re in regexes {
            let split = Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| BeaconError::invalid(format!("pre-tokenizer regex {re:?}: {e}")))?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        // The regexes did the splitting; ByteLevel only maps bytes to its printable alphabet.
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, false, false,
        )));

        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
        tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

        // 2 = unknown, 3 = control: matched only with parse_special; 4 = user-defined: always matched.
        let mut added = Vec::new();
        for (text, &ty) in tokens.iter().zip(&types) {
            if text.is_empty() {
                continue;
            }
            match ty {
                2 | 3 => added.push(AddedToken::from(text.to_string(), true).normalized(false)),
                4 => added.push(AddedToken::from(text.to_string(), false).normalized(false)),
                _ => {}
            }
        }
        tok.add_special_tokens(added.iter().filter(|t| t.special).cloned())
            .map_err(|e| {
                BeaconError::invalid(format!("{source}: cannot add control tokens: {e}"))
            })?;
        tok.add_tokens(added.into_iter().filter(|t| !t.special))
            .map_err(|e| {
                BeaconError::invalid(format!("{source}: cannot add user-defined tokens: {e}"))
            })?;

        let token_id = |key: &str| -> Result<Option<u32>> {
            match md.get(key) {
                None => Ok(None),
                Some(v) => match value_int(v) {
                    Some(id) if id >= 0 && (id as usize) < n_vocab => Ok(Some(id as u32)),
                    // llama.cpp writes -1 / u32::MAX for "none".
                    Some(-1) | Some(0xFFFF_FFFF) => Ok(None),
                    _ => Err(BeaconError::config(
                        source,
                        key,
                        &format!("a token id below the vocabulary size {n_vocab}"),
                        &format!("{v:?}"),
                    )),
                },
            }
        };
        let bos_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = token_id("tokenizer.ggml.eos_token_id")?;
        let mut eos = BTreeSet::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            eos.extend(token_id(key)?);
        }
        for (i, (text, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty == 3 && EOG_TEXTS.contains(text) {
                eos.insert(i as u32);
            }
        }
        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            None => false,
            Some(v) => v.to_bool().map_err(|_| {
                BeaconError::config(
                    source,
                    "tokenizer.ggml.add_bos_token",
                    "a boolean",
                    &value_kind(v),
                )
            })?,
        };
        if add_bos && bos_id.is_none() {
            return Err(BeaconError::config(
                source,
                "tokenizer.ggml.bos_token_id",
                "a BOS id (add_bos_token is true)",
                "none",
            ));
        }
        let chat_template = meta_str(md, source, "tokenizer.chat_template")?.map(str::to_string);

        let mut plain = tok.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            special: tok,
            plain,
            chat_template,
            bos_token: bos_id.map(|i| tokens[i as usize].to_string()),
            eos_token: eos_id.map(|i| tokens[i as usize].to_string()),
            bos_id,
            eos_ids: eos.into_iter().collect(),
            add_bos,
            source: source.to_string(),
        })
    }
}

fn value_kind(v: &Value) -> String {
    format!("{:?}", v.value_type())
}

/// Any GGUF integer as i64 (writers differ in the integer type they use for ids and flags).
fn value_int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn meta_str<'a>(
    md: &'a HashMap<String, Value>,
    source: &str,
    key: &str,
) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(BeaconError::config(source, key, "a string", &value_kind(v))),
    }
}

fn meta_str_array<'a>(
    md: &'a HashMap<String, Value>,
    source: &str,
    key: &str,
) -> Result<Vec<&'a str>> {
    let v = md
        .get(key)
        .ok_or_else(|| BeaconError::config(source, key, "an array of strings", "nothing"))?;
    let list = v
        .to_vec()
        .map_err(|_| BeaconError::config(source, key, "an array of strings", &value_kind(v)))?;
    list.iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.as_str()),
            other => Err(BeaconError::config(
                source,
                &format!("{key}[{i}]"),
                "a string",
                &value_kind(other),
            )),
        })
        .collect()
}
