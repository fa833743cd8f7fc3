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

use std::collections::BTreeSet;
use std::path::Path;

mod chat;
mod gguf;
mod stream;

pub use chat::{user_turn_parts, ChatMessage};
pub use stream::StreamDecoder;

use crate::error::{BeaconError, Result};

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
        eos.extend(crate::config::generation_eos_ids(dir)?);
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

#[cfg(test)]
mod tests {
    use super::chat::{render_chat_template, CHATML_TEMPLATE};
    use super::gguf::{pre_tokenizer_regexes, RE_GPT2};
    use super::*;
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::AddedToken;

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
