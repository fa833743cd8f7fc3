//! Text ⇄ token ids, chat templates and streaming detokenization.
//!
//! A [`Tokenizer`] comes from one of two places:
//! - a Hugging Face `tokenizer.json` (plus `tokenizer_config.json` / `chat_template.jinja` /
//!   `generation_config.json` beside it when present), or
//! - the tokenizer embedded in a GGUF file (`tokenizer.ggml.*`; byte-level BPE, `model == "gpt2"`).
//!   It is rebuilt as a `tokenizers` pipeline that reproduces llama.cpp's ids: the pre-tokenizer
//!   regexes are chosen by `tokenizer.ggml.pre` exactly as llama.cpp chooses them, control tokens
//!   become special added tokens, user-defined tokens plain added tokens.
//!
//! `parse_special` follows llama.cpp: with `true`, control tokens such as `<|im_start|>` in the
//! text become their ids; with `false` they are tokenized as ordinary text (user-defined added
//! tokens are matched either way). BOS is only prepended when the metadata says `add_bos_token`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use minijinja::value::{from_args, Value as JValue, ValueKind};
use minijinja::{Environment, ErrorKind};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{BeaconError, Result};

/// One chat turn, as passed to the chat template.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML, used when the model ships no chat template.
const CHATML_TEMPLATE: &str = r"{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Token texts that end a generation whenever they are control tokens of the vocabulary
/// (llama.cpp treats the same texts as end-of-generation markers).
const EOG_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
];

/// The GPT-2 pre-tokenizer regex (data, as used by llama.cpp for several `tokenizer.ggml.pre` types).
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer regexes (applied in order, each splitting the pieces of the previous one) and
/// whether merges are skipped for whole-word vocabulary hits, per `tokenizer.ggml.pre` value.
fn pre_tokenizer_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
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

/// A tokenizer with its chat template and special-token metadata.
pub struct Tokenizer {
    /// Matches all added tokens: `parse_special = true`.
    special: tokenizers::Tokenizer,
    /// Same pipeline, but special (control) tokens are left to the model: `parse_special = false`.
    plain: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    /// File the tokenizer came from, for error messages.
    source: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`; reads `tokenizer_config.json` beside it if present
    /// (`chat_template`, `bos_token`, `eos_token`, `add_bos_token`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| BeaconError::io(path, e))?;
        let mut tok =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| BeaconError::Parse {
                path: source.clone(),
                message: format!("expected a Hugging Face tokenizer.json: {e}"),
            })?;
        // Encoding must return every id of the text; drop any truncation/padding baked into the file.
        tok.with_truncation(None)
            .map_err(|e| BeaconError::invalid(format!("{source}: {e}")))?;
        tok.with_padding(None);

        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let config_name = dir.join("tokenizer_config.json").display().to_string();
        let cfg = |key: &str| config.as_ref().and_then(|c| c.get(key));

        let token_text = |key: &str| -> Result<Option<String>> {
            match cfg(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                // Older configs store an AddedToken dict: {"content": "...", ...}.
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    other => Err(BeaconError::config(
                        &config_name,
                        key,
                        "a string or {\"content\": string}",
                        &format!("{other:?}"),
                    )),
                },
                Some(other) => Err(BeaconError::config(
                    &config_name,
                    key,
                    "a string or {\"content\": string}",
                    &json_kind(other),
                )),
            }
        };
        let bos_token = token_text("bos_token")?;
        let eos_token = token_text("eos_token")?;
        let add_bos = match cfg("add_bos_token") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => {
                return Err(BeaconError::config(
                    &config_name,
                    "add_bos_token",
                    "a boolean",
                    &json_kind(other),
                ))
            }
        };
        let mut chat_template = match cfg("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // Multiple named templates: [{"name": "default", "template": "..."}, ...].
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            Some(other) => {
                return Err(BeaconError::config(
                    &config_name,
                    "chat_template",
                    "a string or a list of {name, template}",
                    &json_kind(other),
                ))
            }
        };
        // Newer checkpoints keep the template in its own file.
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.is_file() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| BeaconError::io(&jinja, e))?);
        }

        let bos_id = bos_token.as_deref().and_then(|t| tok.token_to_id(t));
        let mut eos = BTreeSet::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| tok.token_to_id(t)) {
            eos.insert(id);
        }
        // generation_config.json may list several end ids (e.g. Llama-3's <|eot_id|>).
        let gen_path = dir.join("generation_config.json");
        if let Some(gen) = read_json_if_exists(&gen_path)? {
            match gen.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().map(|v| v as u32)),
                Some(serde_json::Value::Array(a)) => {
                    eos.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                _ => {}
            }
        }
        for (id, added) in tok.get_added_tokens_decoder() {
            if added.special && EOG_TEXTS.contains(&added.content.as_str()) {
                eos.insert(id);
            }
        }

        let mut plain = tok.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            special: tok,
            plain,
            chat_template,
            bos_token,
            eos_token,
            bos_id,
            eos_ids: eos.into_iter().collect(),
            add_bos,
            source,
        })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (e.g. one built from GGUF metadata).
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.special.save(path, false).map_err(|e| {
            BeaconError::invalid(format!("{}: cannot write tokenizer: {e}", path.display()))
        })
    }

    /// Loads a Hugging Face model directory (`tokenizer.json` [+ `tokenizer_config.json`]).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(BeaconError::invalid(format!(
                "{}: expected a Hugging Face model directory containing tokenizer.json, found none",
                dir.display()
            )));
        }
        Self::from_file(&path)
    }

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

    /// Token ids of `text`. With `parse_special`, control-token texts become their ids; without,
    /// they are tokenized as plain text. BOS is prepended only if the metadata asks for it.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        let enc = tok.encode_fast(text, false).map_err(|e| {
            BeaconError::invalid(format!(
                "{}: cannot tokenize a text of {} bytes: {e}",
                self.source,
                text.len()
            ))
        })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab_size = self.vocab_size();
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| self.special.id_to_token(id).is_none())
        {
            return Err(BeaconError::invalid(format!(
                "{}: cannot decode token id {bad}: expected an id below the vocabulary size {vocab_size}",
                self.source
            )));
        }
        self.special.decode(ids, false).map_err(|e| {
            BeaconError::invalid(format!(
                "{}: cannot decode {} ids: {e}",
                self.source,
                ids.len()
            ))
        })
    }

    /// Renders `messages` with the model's chat template (ChatML if it has none).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE);
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
        .map_err(|e| BeaconError::invalid(format!("{}: chat template: {e}", self.source)))
    }

    /// The model's chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Ids that end a generation (EOS plus end-of-turn tokens).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.special.get_vocab_size(true)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.special.id_to_token(id)
    }

    /// An incremental detokenizer for streaming output.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Incremental detokenizer: push ids one at a time, get back only newly completed text.
///
/// Byte-level BPE can split one UTF-8 character over several tokens; text is held back until
/// the character is complete, so no U+FFFD is emitted for an incomplete sequence. Decoding a
/// small window (previous token(s) + new ones) and emitting the difference also keeps decoders
/// that treat the first token specially (e.g. leading-space stripping) correct.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the context window decoded with the pending ids.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes (often empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self
            .tok
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = full.get(prefix.len()..) else {
            return Ok(String::new());
        };
        let new = new.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Only the window from prefix_offset on is ever decoded again.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(new)
    }

    /// Flushes whatever is still held back (an incomplete character becomes U+FFFD) and resets.
    pub fn finish(&mut self) -> Result<String> {
        let out = if self.read_offset < self.ids.len() {
            let prefix = self
                .tok
                .decode(&self.ids[self.prefix_offset..self.read_offset])?;
            let full = self.tok.decode(&self.ids[self.prefix_offset..])?;
            match full.get(prefix.len()..) {
                Some(rest) if full.starts_with(&prefix) => rest.to_string(),
                _ => self.tok.decode(&self.ids[self.read_offset..])?,
            }
        } else {
            String::new()
        };
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(out)
    }
}

/// Renders a Hugging Face chat template with minijinja, configured like transformers' Jinja
/// environment (`trim_blocks`, `lstrip_blocks`, `raise_exception`, the common Python string/dict methods).
fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("raise_exception: {msg}"),
            ))
        },
    );
    env.set_unknown_method_callback(python_method);
    let tmpl = env.template_from_str(template)?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
}

/// The Python `str` / `dict` methods chat templates call (`.strip()`, `.startswith()`, `.items()`, ...).
fn python_method(
    state: &minijinja::State,
    value: &JValue,
    method: &str,
    args: &[JValue],
) -> std::result::Result<JValue, minijinja::Error> {
    if let Some(s) = value.as_str() {
        let trim_set = |chars: Option<&str>| -> Vec<char> {
            chars.map(|c| c.chars().collect()).unwrap_or_default()
        };
        return match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                let set = trim_set(chars);
                let pred = |c: char| {
                    if chars.is_some() {
                        set.contains(&c)
                    } else {
                        c.is_whitespace()
                    }
                };
                Ok(JValue::from(match method {
                    "strip" => s.trim_matches(pred),
                    "lstrip" => s.trim_start_matches(pred),
                    _ => s.trim_end_matches(pred),
                }))
            }
            "startswith" | "endswith" => {
                let (arg,): (JValue,) = from_args(args)?;
                // Python accepts one prefix or a tuple (list here) of them.
                let candidates: Vec<String> = if let Some(p) = arg.as_str() {
                    vec![p.to_string()]
                } else {
                    arg.try_iter()?
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                };
                let hit = candidates.iter().any(|p| {
                    if method == "startswith" {
                        s.starts_with(p.as_str())
                    } else {
                        s.ends_with(p.as_str())
                    }
                });
                Ok(JValue::from(hit))
            }
            "split" => {
                let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
                let max = maxsplit
                    .filter(|&m| m >= 0)
                    .map(|m| m as usize + 1)
                    .unwrap_or(usize::MAX);
                let parts: Vec<JValue> = match sep {
                    Some("") => {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            "split: empty separator",
                        ))
                    }
                    Some(sep) => s.splitn(max, sep).map(JValue::from).collect(),
                    None => s.split_whitespace().map(JValue::from).collect(),
                };
                Ok(JValue::from(parts))
            }
            "replace" => {
                let (old, new): (&str, &str) = from_args(args)?;
                Ok(JValue::from(s.replace(old, new)))
            }
            "upper" => Ok(JValue::from(s.to_uppercase())),
            "lower" => Ok(JValue::from(s.to_lowercase())),
            "title" | "capitalize" => state.apply_filter(method, std::slice::from_ref(value)),
            "join" => {
                let (items,): (JValue,) = from_args(args)?;
                let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
                Ok(JValue::from(parts.join(s)))
            }
            _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        };
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => Ok(JValue::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let keys: Vec<JValue> = value.try_iter()?.collect();
                Ok(JValue::from(
                    keys.iter()
                        .map(|k| value.get_item(k))
                        .collect::<std::result::Result<Vec<_>, _>>()?,
                ))
            }
            "get" => {
                let (key, default): (JValue, Option<JValue>) = from_args(args)?;
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    default.unwrap_or(JValue::from(()))
                } else {
                    v
                })
            }
            _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(minijinja::Error::from(ErrorKind::UnknownMethod))
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| BeaconError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| BeaconError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

fn json_kind(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
    .to_string()
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

/// The chat template around one user message, split at the message's content: (text before it,
/// text after it incl. the assistant turn's opening). Lets a long document be read first and a
/// question appended later inside the same user message.
pub fn user_turn_parts(tok: &Tokenizer) -> Result<(String, String)> {
    const MARK: &str = "\u{1}BEACON-CONTENT\u{1}";
    let full = tok.apply_chat_template(
        &[ChatMessage {
            role: "user".into(),
            content: MARK.into(),
        }],
        true,
    )?;
    match full.split_once(MARK) {
        Some((a, b)) => Ok((a.to_string(), b.to_string())),
        None => Err(BeaconError::invalid(
            "the chat template does not contain the user message verbatim",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("user", "Hi there"),
            ChatMessage::new("assistant", "Hello!"),
        ]
    }

    #[test]
    fn chatml_fallback() {
        let out = render_chat_template(CHATML_TEMPLATE, &conversation(), true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
        );
        let out =
            render_chat_template(CHATML_TEMPLATE, &conversation()[..1], false, "", "").unwrap();
        assert_eq!(out, "<|im_start|>user\nHi there<|im_end|>\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = "{% if messages[0].role != 'system' %}{{ raise_exception('need a system message') }}{% endif %}";
        let err = render_chat_template(t, &conversation(), false, "", "").unwrap_err();
        assert!(err.to_string().contains("need a system message"), "{err}");
    }

    #[test]
    fn python_string_methods() {
        let t = "{{ bos_token }}{% for m in messages %}[{{ m.content.strip() }}|{{ m.content.lstrip('x') }}|\
                 {{ m.content.startswith('  a') }}|{{ m.content.split(' b')[1] }}|{{ m.role.upper() }}]{% endfor %}\
                 {{ {'k': 1}.get('k') }}{{ {'k': 1}.get('z', 7) }}{% for k, v in {'a': 2}.items() %}{{ k }}={{ v }}{% endfor %}";
        let msgs = [ChatMessage::new("user", "  a b  ")];
        let out = render_chat_template(t, &msgs, false, "<s>", "</s>").unwrap();
        assert_eq!(out, "<s>[a b|  a b  |True|  |USER]17a=2");
    }

    fn tmp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("beacon-tok-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A byte-level tokenizer.json without merges (one token per byte) plus three special tokens,
    /// with a config in the older dict / template-list forms.
    #[test]
    fn hf_directory_metadata() {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort();
        let mut vocab: Vocab = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        for (i, t) in ["<s>", "</s>", "<|eot|>"].iter().enumerate() {
            vocab.insert(t.to_string(), (alphabet.len() + i) as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, false, true,
        ))));
        tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
        tok.add_special_tokens(["<s>", "</s>", "<|eot|>"].map(|t| AddedToken::from(t, true)))
            .unwrap();
        let dir = tmp_dir("hf");
        tok.save(dir.join("tokenizer.json"), false).unwrap();
        let config = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}],
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [257, 258]}"#,
        )
        .unwrap();

        let t = Tokenizer::from_hf_dir(&dir).unwrap();
        let (bos, eos, eot) = (256u32, 257u32, 258u32);
        assert_eq!(t.bos_id(), Some(bos));
        assert_eq!(t.eos_ids(), vec![eos, eot]);
        assert_eq!(t.vocab_size(), 259);
        let ids = t.encode("a</s>", true).unwrap();
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert_eq!(
            (ids[0], t.id_to_token(ids[1]).as_deref(), ids[2]),
            (bos, Some("a"), eos)
        );
        assert_eq!(t.encode("a</s>", false).unwrap().len(), 1 + 5);
        assert_eq!(t.decode(&ids).unwrap(), "<s>a</s>");
        let chat = t
            .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
            .unwrap();
        assert_eq!(chat, "<s>hi</s>");

        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"add_bos_token": "yes"}"#,
        )
        .unwrap();
        let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("add_bos_token"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Tokenizer::from_hf_dir(&dir).is_err());
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn regex_table_covers_smollm() {
        let (r, ignore) = pre_tokenizer_regexes("smollm").unwrap();
        assert_eq!(r, vec![r"\p{N}", RE_GPT2]);
        assert!(!ignore);
        assert!(pre_tokenizer_regexes("no-such-pre").is_none());
    }
}
