//! Tokenized recall facts for `scripts/train_gpu.py` (a device machine has PyTorch but neither our
//! tokenizer nor a Rust toolchain): `cargo run --release -p beacon-train --example recall_bank -- \
//! OUT_PREFIX N [SEED]` writes `OUT_PREFIX.u16` (every piece's ids, concatenated) and `OUT_PREFIX.json`
//! (piece lengths: per fact [statement, query head, answer], then the copy phrases), with the default
//! model's tokenizer. The texts come from `recall::training_fact_texts`, so the templates are the
//! Rust trainer's and stay disjoint from the evaluation's (tested in `recall.rs`).
use anyhow::{bail, Context, Result};
use beacon_train::recall::{copy_texts, training_fact_texts};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: recall_bank OUT_PREFIX N [SEED]");
    }
    let prefix = &args[1];
    let n: u64 = args[2].parse().context("N: a count of facts")?;
    let seed: u64 = args
        .get(3)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0xbeac_0f4c);
    let loaded = beacon::loader::load_model(None, &beacon::LoadOptions::default())?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .context("the default model has no tokenizer")?;
    let mut ids: Vec<u16> = Vec::new();
    let mut push = |text: &str| -> Result<usize> {
        let t = tok.encode(text, false)?;
        for &x in &t {
            ids.push(u16::try_from(x).context("token id above u16")?);
        }
        Ok(t.len())
    };
    let mut facts = Vec::new();
    for i in 0..n {
        let (statement, head, answer) = training_fact_texts(seed, i);
        facts.push([push(&statement)?, push(&head)?, push(&answer)?]);
    }
    let (forms, mid) = copy_texts();
    let copy_forms: Vec<usize> = forms.iter().map(|f| push(f)).collect::<Result<_>>()?;
    let copy_mid = push(mid)?;
    let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    beacon::util::atomic_write(std::path::Path::new(&format!("{prefix}.u16")), &bytes)?;
    let index = serde_json::json!({"facts": facts, "copy_forms": copy_forms, "copy_mid": copy_mid, "seed": seed});
    beacon::util::atomic_write(
        std::path::Path::new(&format!("{prefix}.json")),
        index.to_string().as_bytes(),
    )?;
    println!("{n} facts, {} tokens", ids.len());
    Ok(())
}
