//! The real default model (GGUF path) against llama.cpp's own numbers:
//! perplexity with llama-perplexity's protocol (fixtures/smollm2/README.md).
//! llama.cpp quantizes activations to 8 bits inside its matmuls; we compute with f32 activations,
//! so we expect to land within ~2 %, not exactly.

use beacon::session::{Mode, Session, Want};
use beacon::{load, LoadOptions};
use std::path::Path;

/// Running PPL printed by `llama-perplexity -c 512 --chunks 16 -fa off` after each chunk.
const LLAMA_CPP_RUNNING_PPL: [f64; 16] = [
    19.3233, 26.9841, 30.0247, 33.8432, 31.8677, 33.1868, 33.3892, 33.1064, 32.1896, 31.2040,
    30.4448, 29.9996, 29.7815, 29.5474, 29.2378, 28.8747,
];

#[test]
fn perplexity_matches_llama_cpp() {
    let chunks: usize = std::env::var("BEACON_PPL_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let path = beacon::fetch::default_model_path().expect("default model");
    let loaded = load(&path, &LoadOptions::default()).expect("load");
    let tok = loaded.tokenizer.as_ref().expect("tokenizer");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2/ppl_text.txt"),
    )
    .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let model = &loaded.model;
    let mut nll = 0f64;
    let mut count = 0usize;
    for c in 0..chunks {
        let chunk = &ids[512 * c..512 * c + 512];
        let mut s = Session::new(model, Mode::Full, loaded.beacon.clone());
        // rows 256..510 score tokens 257..511
        let logits = s.feed(model, chunk, Want::From(256)).unwrap().unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        let logp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
        for (r, row) in logp.iter().enumerate().take(255) {
            let target = chunk[256 + r + 1] as usize;
            nll -= row[target] as f64;
            count += 1;
        }
    }
    let ppl = (nll / count as f64).exp();
    let reference = LLAMA_CPP_RUNNING_PPL[chunks - 1];
    let rel = (ppl - reference).abs() / reference;
    println!(
        "PPL over {chunks} chunks: ours {ppl:.4}, llama.cpp {reference:.4} (Δ {:.2} %)",
        rel * 100.0
    );
    assert!(
        rel < 0.02,
        "perplexity {ppl:.4} differs from llama.cpp's {reference:.4} by {:.2} %",
        rel * 100.0
    );
}
