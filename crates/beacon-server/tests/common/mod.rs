//! Test support: the tiny llama fixture with a character-level tokenizer, a server on loopback,
//! and a small HTTP client.
#![allow(dead_code)]

pub use beacon::cli_args::ModelArgs;
pub use beacon_server::ServeArgs;
use beacon_server::{spawn, ServerHandle};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Characters of the test vocabulary after the three special tokens: printable ASCII, newline,
/// then Latin Extended letters, 253 in all so every id of the 256-entry fixture is a token.
fn vocab_chars() -> Vec<char> {
    let mut chars: Vec<char> = (' '..='~').collect();
    chars.push('\n');
    let mut c = 0x100u32;
    while chars.len() < 253 {
        chars.push(char::from_u32(c).expect("valid scalar"));
        c += 1;
    }
    chars
}

/// A Hugging Face tokenizer.json where each character is one token and every token decodes to
/// exactly its text, so any generated reply re-tokenizes to the same ids.
fn tokenizer_json() -> Value {
    let specials = ["<unk>", "<|im_start|>", "<|im_end|>"];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for (i, c) in vocab_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 3));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh scratch directory under the target dir's temp area.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "beacon-server-test-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/llama-tiny")
}

/// A copy of the tiny llama fixture with the test tokenizer beside it.
pub fn tiny_model() -> PathBuf {
    let dir = scratch("model");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir().join(f), dir.join(f)).expect("copy fixture");
    }
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string())
        .expect("write tokenizer");
    dir
}

pub fn args(model: &Path) -> ServeArgs {
    ServeArgs {
        model: ModelArgs {
            model: Some(model.to_path_buf()),
            ..ModelArgs::default()
        },
        port: 0,
        served_model_name: Some("tiny".into()),
        max_tokens_limit: 100_000,
        default_max_tokens: 16,
        ..ServeArgs::default()
    }
}

pub fn start(args: ServeArgs) -> (ServerHandle, String) {
    let h = spawn(args).expect("server starts");
    let base = format!("http://{}", h.addr);
    (h, base)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(60))
        .build()
}

/// POST raw bytes; returns (status, body text).
pub fn post_raw(url: &str, body: &[u8]) -> (u16, String) {
    match agent()
        .post(url)
        .set("Content-Type", "application/json")
        .send_bytes(body)
    {
        Ok(r) => (r.status(), r.into_string().expect("body")),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    }
}

pub fn post(url: &str, body: &Value) -> (u16, Value) {
    let (status, text) = post_raw(url, body.to_string().as_bytes());
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"));
    (status, v)
}

pub fn get(url: &str) -> (u16, String) {
    match agent().get(url).call() {
        Ok(r) => (r.status(), r.into_string().expect("body")),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// A streamed response: the JSON of every `data:` event, and whether it ended with `[DONE]`.
pub struct Streamed {
    pub status: u16,
    pub chunks: Vec<Value>,
    pub done: bool,
}

pub fn post_stream(url: &str, body: &Value) -> Streamed {
    let r = match agent().post(url).send_string(&body.to_string()) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let v: Value = serde_json::from_str(&r.into_string().unwrap_or_default())
                .expect("JSON error body");
            return Streamed {
                status: code,
                chunks: vec![v],
                done: false,
            };
        }
        Err(e) => panic!("transport error: {e}"),
    };
    let status = r.status();
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/event-stream"),
        "content type {:?}",
        r.header("content-type")
    );
    let mut chunks = Vec::new();
    let mut done = false;
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.expect("stream line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        assert!(!done, "data after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(
                serde_json::from_str(data)
                    .unwrap_or_else(|e| panic!("chunk is not JSON ({e}): {data}")),
            );
        }
    }
    Streamed {
        status,
        chunks,
        done,
    }
}

/// Concatenated text of a chat or completion stream.
pub fn stream_text(s: &Streamed) -> String {
    s.chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|ch| ch["delta"]["content"].as_str().or(ch["text"].as_str()))
        .collect()
}

/// A metric's value from /metrics text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

pub fn chat_body(messages: Value, max_tokens: usize) -> Value {
    json!({"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
}
