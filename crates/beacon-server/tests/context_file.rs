//! Saved contexts: round trip equality and clear errors for corrupted, truncated, foreign and
//! future-version files.

mod common;

use beacon::context_file::{load_context, save_context, Snapshot};
use beacon::generate::{generate, GenerateOptions};
use beacon::testing::max_abs_diff;
use beacon::{LoadOptions, Mode, Session, Want};
use common::*;

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i * 37 + seed * 11) % 250)
        .collect()
}

#[test]
fn round_trip_continues_exactly() {
    let dir = tiny_model();
    let loaded = beacon::load(&dir, &LoadOptions::default()).unwrap();
    let tok = loaded.tokenizer.as_ref().expect("test tokenizer");
    let model = &loaded.model;
    let book = ids(203, 1);
    let question = ids(17, 2);

    let mut original = Session::new(model, Mode::Beacon, loaded.beacon.clone());
    let logits = original.feed(model, &book, Want::Last).unwrap();
    let file = scratch("ctx").join("book.beacon");
    let report = save_context(
        &file,
        &original,
        &loaded.fingerprint,
        Some("abc"),
        logits.as_ref(),
    )
    .unwrap();
    assert_eq!(report.tokens, book.len());
    assert!(
        report.file_bytes < report.kv_bytes_full as u64,
        "{report:?}: the file is smaller than the raw K/V it replaces"
    );
    assert!(!file.with_file_name(".book.beacon.tmp").exists());

    let restored = load_context(&file, model, &loaded.fingerprint).unwrap();
    assert_eq!(restored.header.input_sha256.as_deref(), Some("abc"));
    assert_eq!(
        max_abs_diff(
            &restored.logits.unwrap(),
            &logits.unwrap().squeeze(0).unwrap()
        ),
        0.0
    );
    let mut resumed = restored.session;
    assert_eq!(resumed.tokens(), original.tokens());
    assert_eq!(resumed.layout(), original.layout());

    // Continuing from the file is bit-identical to continuing the original session…
    let a = original
        .feed(model, &question, Want::Last)
        .unwrap()
        .unwrap();
    let b = resumed.feed(model, &question, Want::Last).unwrap().unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let opts = GenerateOptions {
        max_new_tokens: 24,
        sampling: Default::default(),
        stop_strings: vec![],
        eos_ids: vec![],
    };
    let g1 = generate(
        model,
        &mut original,
        tok,
        &[],
        Some(a.clone()),
        &opts,
        &mut |_| true,
        &mut |_| {},
    )
    .unwrap();
    let g2 = generate(
        model,
        &mut resumed,
        tok,
        &[],
        Some(b),
        &opts,
        &mut |_| true,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(g1.tokens, g2.tokens);
    assert_eq!(g1.text, g2.text);

    // …and matches reading book + question in one run (the same up to float rounding).
    let mut one_run = Session::new(model, Mode::Beacon, loaded.beacon.clone());
    let all: Vec<u32> = book.iter().chain(&question).copied().collect();
    let c = one_run.feed(model, &all, Want::Last).unwrap().unwrap();
    assert!(max_abs_diff(&a, &c) < 1e-4, "diff {}", max_abs_diff(&a, &c));
    let g3 = generate(
        model,
        &mut one_run,
        tok,
        &[],
        Some(c),
        &opts,
        &mut |_| true,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(g1.tokens, g3.tokens);
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tiny_model();
    let loaded = beacon::load(&dir, &LoadOptions::default()).unwrap();
    let model = &loaded.model;
    let mut s = Session::new(model, Mode::Beacon, loaded.beacon.clone());
    s.feed(model, &ids(90, 3), Want::None).unwrap();
    let scratch = scratch("bad");
    let good = scratch.join("good.beacon");
    save_context(&good, &s, &loaded.fingerprint, None, None).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let err = |name: &str, data: &[u8]| -> String {
        let p = scratch.join(name);
        std::fs::write(&p, data).unwrap();
        match load_context(&p, model, &loaded.fingerprint) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => e.to_string(),
        }
    };

    let mut flipped = bytes.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x40;
    let e = err("flipped.beacon", &flipped);
    assert!(e.contains("checksum") && e.contains("corrupted"), "{e}");

    let e = err("truncated.beacon", &bytes[..bytes.len() - 333]);
    assert!(e.contains("truncated"), "{e}");
    let e = err("stub.beacon", &bytes[..5]);
    assert!(
        e.contains("truncated") || e.contains("not a saved context"),
        "{e}"
    );

    // The safetensors header (its length is the first 8 bytes); metadata keys come in any order.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let text = String::from_utf8_lossy(&bytes[8..8 + header_len]).into_owned();
    assert!(text.contains("\"version\":\"1\""), "{text}");
    let future = replace_once(&bytes, b"\"version\":\"1\"", b"\"version\":\"7\"");
    let e = err("future.beacon", &future);
    assert!(e.contains("version 7 is not supported"), "{e}");

    let p = scratch.join("other-model.beacon");
    save_context(&p, &s, "0123456789abcdef01234567", None, None).unwrap();
    let e = load_context(&p, model, &loaded.fingerprint)
        .err()
        .expect("another model")
        .to_string();
    assert!(e.contains("another model"), "{e}");

    let e = err(
        "not-safetensors.beacon",
        b"hello world, this is not a context file at all",
    );
    assert!(e.contains("not a saved context"), "{e}");

    // Saving over an existing file replaces it whole.
    save_context(&good, &s, &loaded.fingerprint, None, None).unwrap();
    assert!(Snapshot::load(&good).is_ok());
}

fn replace_once(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let i = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = haystack.to_vec();
    out[i..i + from.len()].copy_from_slice(to);
    out
}

#[test]
fn compress_command_writes_a_loadable_context() {
    let dir = tiny_model();
    let scratch = scratch("compress");
    let book = scratch.join("book.txt");
    std::fs::write(
        &book,
        "A lighthouse keeper counted ships at night. ".repeat(8),
    )
    .unwrap();
    let out = scratch.join("book.beacon");
    let report = beacon_server::run_compress(beacon_server::CompressArgs {
        model: beacon::cli_args::ModelArgs {
            model: Some(dir.clone()),
            ..Default::default()
        },
        engine: beacon::cli_args::EngineArgs {
            ratio: Some("4".into()),
            ..Default::default()
        },
        file: book.clone(),
        output: out.clone(),
        chat: false,
    })
    .unwrap();
    assert_eq!(report.file_bytes, std::fs::metadata(&out).unwrap().len());
    assert!(
        report.file_bytes < report.kv_bytes_full as u64,
        "{report:?}"
    );
    let loaded = beacon::load(&dir, &LoadOptions::default()).unwrap();
    let ctx = load_context(&out, &loaded.model, &loaded.fingerprint).unwrap();
    assert_eq!(ctx.session.tokens().len(), report.tokens);
    assert!(ctx.logits.is_some());
    let text = std::fs::read(&book).unwrap();
    assert_eq!(
        ctx.header.input_sha256,
        Some(beacon::context_file::sha256_hex(&text))
    );
}
