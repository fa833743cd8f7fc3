//! Memory accounting: compression actually frees raw K/V (scaled-down version of "32K tokens at ×8
//! holds ≤ 1/7 of full attention's K/V": 64 windows on the tiny model).

use beacon::config::RatioMix;
use beacon::engine::{Mode, Session, Want};
use beacon::{load, LoadOptions};
use std::path::Path;

#[test]
fn ratio8_holds_under_a_seventh_of_full_kv() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/llama-tiny");
    let l = load(&dir, &LoadOptions::default()).unwrap();
    let m = &l.model;
    let mut cfg = l.beacon.clone();
    cfg.ratios = vec![8];
    cfg.ratio_mix = RatioMix::StepRandom;
    cfg.sink_size = 1;
    let ids: Vec<u32> = (0..32 * 64 + 20).map(|i| (i * 31 % 256) as u32).collect();
    let mut s = Session::new(m, Mode::Beacon, cfg);
    s.feed(m, &ids, Want::Last).unwrap();
    for t in 0..8 {
        s.feed(m, &[t], Want::Last).unwrap();
    }
    let (peak, full) = (s.stats.peak_kv_bytes, s.kv_bytes_full());
    println!(
        "peak {peak} B, full {full} B, ratio 1/{:.2}",
        full as f64 / peak as f64
    );
    assert!(
        peak * 7 <= full,
        "peak K/V {peak} B is more than 1/7 of full attention's {full} B"
    );
    // what is held now: sink + 64 windows × 4 beacons + the open window (28 raw + 3 beacons)
    assert_eq!(
        (s.layout.sink, s.layout.beacons, s.layout.window_flags.len()),
        (1, 256, 31)
    );

    // full attention holds every token
    let mut f = Session::new(m, Mode::Full, l.beacon.clone());
    f.feed(m, &ids, Want::Last).unwrap();
    assert_eq!(f.stats.peak_kv_bytes, f.kv_bytes_full());
}
