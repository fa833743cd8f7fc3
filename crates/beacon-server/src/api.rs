//! The OpenAI wire format: request bodies, their validation into engine jobs, response bodies and
//! the `{"error": {...}}` object. Nothing here knows about models.

use crate::engine::{Done, EngineError, MemoryReport, PromptInput};
use axum::http::StatusCode;
use beacon::generate::{DryParams, FinishReason, SamplingParams};
use beacon::tokenizer::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Request limits enforced before anything reaches the engine.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Largest `max_tokens` accepted.
    pub max_tokens: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// `repetition_penalty` when a request gives none (`beacon serve --repeat-penalty`).
    pub default_repetition_penalty: f32,
    /// DRY settings a request's `dry_*` fields override (`beacon serve --dry-*`; on by default).
    pub default_dry: DryParams,
}

/// Why a request was refused, in words for the user.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the request body is not valid JSON: {0}")]
    BadJson(String),
    #[error("invalid request: {0}")]
    BadField(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("`messages` must contain at least one message")]
    EmptyMessages,
    #[error(
        "`messages[{index}].role` must be one of system, user, assistant, tool; found `{role}`"
    )]
    BadRole { index: usize, role: String },
    #[error("`prompt` must not be empty")]
    EmptyPrompt,
    #[error("`prompt` must be a string, an array of one string, or an array of token ids")]
    PromptShape,
    #[error("`max_tokens` must be ≥ 1 and ≤ {max}, found {found}")]
    MaxTokens { found: i64, max: usize },
    #[error("`temperature` must be between 0 and 2, found {0}")]
    Temperature(f64),
    #[error("`top_p` must be in (0, 1], found {0}")]
    TopP(f64),
    #[error("`top_k` must be ≥ 1, found {0}")]
    TopK(i64),
    #[error("`seed` must be a non-negative integer, found {0}")]
    Seed(i64),
    #[error("`n` must be 1 (this server returns one choice), found {0}")]
    N(i64),
    #[error("`stop` accepts at most 4 sequences, found {0}")]
    TooManyStops(usize),
    #[error("the model `{asked}` does not exist; this server serves `{served}`")]
    UnknownModel { asked: String, served: String },
    #[error("{0}")]
    Engine(#[from] EngineError),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::UnknownModel { .. } => StatusCode::NOT_FOUND,
            RequestError::Engine(EngineError::Busy(_)) => StatusCode::TOO_MANY_REQUESTS,
            RequestError::Engine(EngineError::ShuttingDown) => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::Engine(EngineError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn param(&self) -> Option<&'static str> {
        Some(match self {
            RequestError::EmptyMessages | RequestError::BadRole { .. } => "messages",
            RequestError::EmptyPrompt | RequestError::PromptShape => "prompt",
            RequestError::MaxTokens { .. } => "max_tokens",
            RequestError::Temperature(_) => "temperature",
            RequestError::TopP(_) => "top_p",
            RequestError::TopK(_) => "top_k",
            RequestError::Seed(_) => "seed",
            RequestError::N(_) => "n",
            RequestError::TooManyStops(_) => "stop",
            RequestError::UnknownModel { .. } => "model",
            RequestError::Engine(EngineError::PromptTooLong { .. } | EngineError::EmptyPrompt) => {
                "messages"
            }
            _ => return None,
        })
    }

    fn code(&self) -> Option<&'static str> {
        Some(match self {
            RequestError::UnknownModel { .. } => "model_not_found",
            RequestError::Engine(EngineError::PromptTooLong { .. }) => "context_length_exceeded",
            RequestError::Engine(EngineError::Busy(_)) => "rate_limit_exceeded",
            _ => return None,
        })
    }

    /// The OpenAI error object.
    pub fn body(&self) -> Value {
        let kind = match self.status().as_u16() {
            500..=599 => "server_error",
            429 => "rate_limit_error",
            404 => "not_found_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": self.param(), "code": self.code()}})
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI, common in compatible servers.
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    /// DRY n-gram penalty (not OpenAI; the names llama.cpp's and text-generation-webui's servers
    /// use). `dry_multiplier: 0` turns it off for the request.
    pub dry_multiplier: Option<f64>,
    pub dry_base: Option<f64>,
    pub dry_allowed_length: Option<u32>,
    /// Most tokens searched for repeats (0 = no limit).
    pub dry_range: Option<u32>,
    /// Prompt tokens before the answer searched too (default 0: the answer's own repeats only).
    pub dry_prompt_tail: Option<u32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    #[serde(flatten)]
    pub common: Common,
}

/// A validated request, ready to become an engine job.
#[derive(Debug)]
pub struct Validated {
    pub prompt: PromptInput,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parse a JSON body, keeping serde's words (they name the field and the expected type).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => RequestError::BadField(e.to_string()),
        _ => RequestError::BadJson(e.to_string()),
    })
}

fn validate_common(
    c: &Common,
    served: &str,
    limits: &Limits,
) -> Result<(usize, SamplingParams, Vec<String>), RequestError> {
    if let Some(asked) = &c.model {
        if !asked.is_empty() && asked != served {
            return Err(RequestError::UnknownModel {
                asked: asked.clone(),
                served: served.to_string(),
            });
        }
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => limits.default_max_tokens,
        Some(m) if m >= 1 && (m as u64) <= limits.max_tokens as u64 => m as usize,
        Some(m) => {
            return Err(RequestError::MaxTokens {
                found: m,
                max: limits.max_tokens,
            })
        }
    };
    if let Some(n) = c.n {
        if n != 1 {
            return Err(RequestError::N(n));
        }
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(RequestError::Temperature(temperature));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RequestError::TopP(top_p));
    }
    let top_k = match c.top_k {
        None => None,
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) => return Err(RequestError::TopK(k)),
    };
    let seed = match c.seed {
        None => 0,
        Some(s) if s >= 0 => s as u64,
        Some(s) => return Err(RequestError::Seed(s)),
    };
    let d = limits.default_dry;
    let dry = DryParams {
        multiplier: c.dry_multiplier.map_or(d.multiplier, |x| x as f32),
        base: c.dry_base.map_or(d.base, |x| x as f32),
        allowed_length: c
            .dry_allowed_length
            .map_or(d.allowed_length, |x| x as usize),
        range: c.dry_range.map_or(d.range, |x| x as usize),
        prompt_tail: c.dry_prompt_tail.map_or(d.prompt_tail, |x| x as usize),
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() > 4 => return Err(RequestError::TooManyStops(v.len())),
        Some(Stop::Many(v)) => v.clone(),
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: (top_p < 1.0).then_some(top_p as f32),
        repetition_penalty: c
            .repetition_penalty
            .map_or(limits.default_repetition_penalty, |x| x as f32),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0) as f32,
        presence_penalty: c.presence_penalty.unwrap_or(0.0) as f32,
        dry,
        seed,
    };
    sampling
        .validate()
        .map_err(|e| RequestError::BadField(e.to_string()))?;
    Ok((max_tokens, sampling, stop))
}

impl ChatRequest {
    pub fn validate(self, served: &str, limits: &Limits) -> Result<Validated, RequestError> {
        let (max_tokens, sampling, stop) = validate_common(&self.common, served, limits)?;
        if self.messages.is_empty() {
            return Err(RequestError::EmptyMessages);
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (index, m) in self.messages.into_iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "tool" | "developer"
            ) {
                return Err(RequestError::BadRole {
                    index,
                    role: m.role,
                });
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text)
                    .collect::<Vec<_>>()
                    .join(""),
            };
            messages.push(ChatMessage {
                role: m.role,
                content,
            });
        }
        Ok(Validated {
            prompt: PromptInput::Chat(messages),
            max_tokens,
            sampling,
            stop,
            stream: self.common.stream.unwrap_or(false),
            include_usage: self
                .common
                .stream_options
                .map(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

impl CompletionRequest {
    pub fn validate(self, served: &str, limits: &Limits) -> Result<Validated, RequestError> {
        let (max_tokens, sampling, stop) = validate_common(&self.common, served, limits)?;
        let prompt = match self.prompt {
            PromptField::Text(t) if t.is_empty() => return Err(RequestError::EmptyPrompt),
            PromptField::Text(t) => PromptInput::Text(t),
            PromptField::Ids(ids) if ids.is_empty() => return Err(RequestError::EmptyPrompt),
            PromptField::Ids(ids) => PromptInput::Ids(ids),
            PromptField::Texts(mut v) if v.len() == 1 && !v[0].is_empty() => {
                PromptInput::Text(v.remove(0))
            }
            PromptField::Texts(v) if v.is_empty() => return Err(RequestError::EmptyPrompt),
            PromptField::Texts(_) => return Err(RequestError::PromptShape),
        };
        Ok(Validated {
            prompt,
            max_tokens,
            sampling,
            stop,
            stream: self.common.stream.unwrap_or(false),
            include_usage: self
                .common
                .stream_options
                .map(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn of(done: &Done) -> Self {
        Usage {
            prompt_tokens: done.prompt_tokens,
            completion_tokens: done.completion_tokens,
            total_tokens: done.prompt_tokens + done.completion_tokens,
        }
    }
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// A whole (non-stream) response.
pub fn response(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    text: String,
    done: &Done,
) -> Value {
    let reason = finish_reason(done.finish);
    let choice = match endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": reason,
        }),
        Endpoint::Completions => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason})
        }
    };
    json!({
        "id": id,
        "object": match endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completions => "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": Usage::of(done),
        "beacon": beacon_block(&done.memory),
    })
}

pub fn beacon_block(m: &MemoryReport) -> Value {
    serde_json::to_value(m).unwrap_or(Value::Null)
}

/// One streamed chunk. `delta` is the new text (None for the role-only first chat chunk).
pub fn chunk(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    delta: Option<&str>,
    finish: Option<&Done>,
) -> Value {
    let reason = finish.map(|d| finish_reason(d.finish));
    let choice = match endpoint {
        Endpoint::Chat => {
            let delta = match delta {
                None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                None => json!({}),
                Some(t) => json!({"content": t}),
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
        }
        Endpoint::Completions => {
            json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": reason})
        }
    };
    let mut v = json!({
        "id": id,
        "object": match endpoint { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completions => "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
    });
    if let Some(d) = finish {
        v["beacon"] = beacon_block(&d.memory);
    }
    v
}

/// The usage chunk sent last when `stream_options.include_usage` is set.
pub fn usage_chunk(endpoint: Endpoint, id: &str, created: u64, model: &str, done: &Done) -> Value {
    json!({
        "id": id,
        "object": match endpoint { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completions => "text_completion" },
        "created": created,
        "model": model,
        "choices": [],
        "usage": Usage::of(done),
        "beacon": beacon_block(&done.memory),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_body_bytes: 1 << 20,
            max_tokens: 100,
            default_max_tokens: 16,
            default_repetition_penalty: 1.0,
            default_dry: DryParams::CHAT,
        }
    }

    #[test]
    fn max_tokens_bounds() {
        for (v, ok) in [
            (0i64, false),
            (-5, false),
            (1, true),
            (100, true),
            (101, false),
            (i64::MAX, false),
        ] {
            let r: ChatRequest = parse(
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"max_tokens":{v}}}"#)
                    .as_bytes(),
            )
            .unwrap();
            assert_eq!(r.validate("m", &limits()).is_ok(), ok, "{v}");
        }
    }

    #[test]
    fn wrong_types_name_the_problem() {
        let e = parse::<ChatRequest>(br#"{"messages":"hi"}"#).unwrap_err();
        assert!(matches!(e, RequestError::BadField(_)), "{e}");
        let e = parse::<ChatRequest>(b"{not json").unwrap_err();
        assert!(matches!(e, RequestError::BadJson(_)), "{e}");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn unknown_model_is_404_with_code() {
        let r: CompletionRequest = parse(br#"{"prompt":"x","model":"gpt-9"}"#).unwrap();
        let e = r.validate("tiny", &limits()).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.body()["error"]["code"], "model_not_found");
    }

    #[test]
    fn repetition_fields() {
        let sampling = |extra: &str| {
            parse::<ChatRequest>(
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#).as_bytes(),
            )
            .unwrap()
            .validate("m", &limits())
            .map(|v| v.sampling)
        };
        // DRY is on unless a request turns it off; each field overrides the server's default.
        let s = sampling("").unwrap();
        assert_eq!((s.dry, s.repetition_penalty), (DryParams::CHAT, 1.0));
        assert!(!sampling(r#","dry_multiplier":0"#).unwrap().dry.enabled());
        let s = sampling(
            r#","dry_multiplier":1.5,"dry_base":2,"dry_allowed_length":3,"dry_range":0,"dry_prompt_tail":64,"repetition_penalty":1.1,"frequency_penalty":0.5,"presence_penalty":-0.5"#,
        )
        .unwrap();
        assert_eq!(
            s.dry,
            DryParams {
                multiplier: 1.5,
                base: 2.0,
                allowed_length: 3,
                range: 0,
                prompt_tail: 64,
            }
        );
        assert_eq!(
            (
                s.repetition_penalty,
                s.frequency_penalty,
                s.presence_penalty
            ),
            (1.1, 0.5, -0.5)
        );
        for bad in [
            r#","dry_base":0.5"#,
            r#","dry_multiplier":-1"#,
            r#","dry_allowed_length":0"#,
            r#","frequency_penalty":3"#,
        ] {
            let e = sampling(bad).unwrap_err();
            assert!(matches!(e, RequestError::BadField(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn prompt_shapes() {
        let ok = |b: &[u8]| {
            parse::<CompletionRequest>(b)
                .unwrap()
                .validate("m", &limits())
                .map(|v| v.prompt)
        };
        assert!(matches!(
            ok(br#"{"prompt":[1,2,3]}"#),
            Ok(PromptInput::Ids(_))
        ));
        assert!(matches!(
            ok(br#"{"prompt":["a"]}"#),
            Ok(PromptInput::Text(_))
        ));
        assert!(ok(br#"{"prompt":""}"#).is_err());
        assert!(ok(br#"{"prompt":["a","b"]}"#).is_err());
    }
}
