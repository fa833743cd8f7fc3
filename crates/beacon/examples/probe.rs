//! Quick speed probe on synthetic ids: `cargo run --release --example probe -- MODEL LEN MODE RATIO`.
use beacon::options::EngineOptions;
use beacon::session::{Session, Want};
use std::time::Instant;

fn main() -> beacon::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let loaded = beacon::load(std::path::Path::new(&a[1]), &beacon::LoadOptions::default())?;
    let len: usize = a[2].parse().unwrap_or(2048);
    let o = EngineOptions {
        kv_dtype: None,
        mode: Some(a[3].clone()),
        ratio: a.get(4).cloned(),
        window: a.get(5).and_then(|w| w.parse().ok()),
        ..Default::default()
    };
    let m = &loaded.model;
    let mut s = Session::new(m, o.mode(8192)?, o.beacon_config(&loaded.beacon)?);
    let ids: Vec<u32> = (0..len as u32)
        .map(|i| (i * 7919 + 13) % 40000 + 100)
        .collect();
    let t = Instant::now();
    s.feed(m, &ids, Want::Last)?;
    let p = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..16 {
        s.feed(m, &[100 + i], Want::Last)?;
    }
    let d = t.elapsed().as_secs_f64();
    println!("len {len} prefill {p:.2}s ({:.0} tok/s) decode {:.1} tok/s peak_kv {} MiB full {} MiB rss {} MiB", len as f64 / p, 16.0 / d,
        s.stats().peak_kv_bytes >> 20, s.kv_bytes_full() >> 20, beacon::metrics::peak_rss_bytes() >> 20);
    Ok(())
}
