//! Token ids of a text file as little-endian u32, for checks outside Rust (e.g. the parity check of
//! `scripts/train_gpu.py --parity`): `cargo run --release --example tokenize -- MODEL TEXT OUT.u32`.
fn main() -> beacon::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 {
        eprintln!("usage: tokenize MODEL TEXT OUT.u32");
        std::process::exit(2);
    }
    let loaded = beacon::load(std::path::Path::new(&a[1]), &beacon::LoadOptions::default())?;
    let Some(tok) = loaded.tokenizer.as_ref() else {
        eprintln!("error: {} has no tokenizer", a[1]);
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(&a[2]).unwrap_or_else(|e| {
        eprintln!("error: {}: {e}", a[2]);
        std::process::exit(2)
    });
    let ids = tok.encode(&text, false)?;
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    beacon::util::atomic_write(std::path::Path::new(&a[3]), &bytes)?;
    println!("{}: {} tokens", a[3], ids.len());
    Ok(())
}
