//! Chat templates: the model's Hugging Face template rendered with minijinja as transformers
//! renders it (ChatML when the model ships none), and the user turn split around its content.

use super::Tokenizer;
use crate::error::{BeaconError, Result};
use minijinja::value::{from_args, Value as JValue, ValueKind};
use minijinja::{Environment, ErrorKind};

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
pub(super) const CHATML_TEMPLATE: &str = r"{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl Tokenizer {
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
}

/// Renders a Hugging Face chat template with minijinja, configured like transformers' Jinja
/// environment (`trim_blocks`, `lstrip_blocks`, `raise_exception`, the common Python string/dict methods).
pub(super) fn render_chat_template(
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
