//! Memory accounting: compression actually frees raw K/V (scaled-down version of "32K tokens at ×8
//! holds ≤ 1/7 of full attention's K/V": 64 windows on the tiny model).

use beacon::config::RatioMix;
use beacon::session::{Mode, Session, Want};
use beacon::testing::max_abs_diff;
use beacon::{load, BeaconConfig, LoadOptions, Loaded};
use std::path::Path;

/// The tiny Llama fixture.
fn tiny() -> Loaded {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/llama-tiny");
    load(&dir, &LoadOptions::default()).unwrap()
}

/// Its beacon settings at one fixed ratio, with one sink entry.
fn fixed_ratio(l: &Loaded, ratio: usize) -> BeaconConfig {
    let mut cfg = l.beacon.clone();
    cfg.ratios = vec![ratio];
    cfg.ratio_mix = RatioMix::StepRandom;
    cfg.sink_size = 1;
    cfg
}

#[test]
fn ratio8_holds_under_a_seventh_of_full_kv() {
    let l = tiny();
    let m = &l.model;
    let cfg = fixed_ratio(&l, 8);
    let ids: Vec<u32> = (0..32 * 64 + 20).map(|i| (i * 31 % 256) as u32).collect();
    let mut s = Session::new(m, Mode::Beacon, cfg);
    s.feed(m, &ids, Want::Last).unwrap();
    for t in 0..8 {
        s.feed(m, &[t], Want::Last).unwrap();
    }
    let (peak, full) = (s.stats().peak_kv_bytes, s.kv_bytes_full());
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
        (
            s.layout().sink,
            s.layout().beacons,
            s.layout().window_flags.len()
        ),
        (1, 256, 31)
    );

    // full attention holds every token
    let mut f = Session::new(m, Mode::Full, l.beacon.clone());
    f.feed(m, &ids, Want::Last).unwrap();
    assert_eq!(f.stats().peak_kv_bytes, f.kv_bytes_full());
}

/// Logits of `ids` then 8 single tokens, in every mode, with the cache in `kv` dtype.
fn run_with_kv(kv: candle_core::DType, mode: Mode) -> (Vec<Vec<f32>>, usize) {
    let l = tiny();
    let m = &l.model;
    let cfg = fixed_ratio(&l, 4);
    let ids: Vec<u32> = (0..32 * 6 + 20).map(|i| (i * 37 % 256) as u32).collect();
    let mut s = Session::new(m, mode, cfg);
    s.set_kv_dtype(m, kv).unwrap();
    s.set_prefill_chunk(24); // several chunks, and streaming evictions
    let mut out = Vec::new();
    let logits = s.feed(m, &ids, Want::Last).unwrap().unwrap();
    out.push(logits.flatten_all().unwrap().to_vec1().unwrap());
    for t in 0..8 {
        let logits = s.feed(m, &[t * 5], Want::Last).unwrap().unwrap();
        out.push(logits.flatten_all().unwrap().to_vec1().unwrap());
    }
    assert_eq!(s.kv_dtype(), kv);
    (out, s.stats().peak_kv_bytes)
}

/// f16 K/V (window closes, re-rotation, streaming eviction, decode): the same logits as f32 K/V up
/// to f16 rounding of the cached values (relative 2⁻¹¹), at half the bytes.
#[test]
fn f16_kv_cache_matches_f32_at_half_the_bytes() {
    use candle_core::DType;
    for mode in [
        Mode::Beacon,
        Mode::Full,
        Mode::Streaming {
            sink: 4,
            recent: 64,
        },
    ] {
        let (want, bytes32) = run_with_kv(DType::F32, mode.clone());
        let (got, bytes16) = run_with_kv(DType::F16, mode.clone());
        assert_eq!(bytes16 * 2, bytes32, "{mode:?}: K/V bytes");
        let mut worst = 0f32;
        for (g, w) in got.iter().zip(&want) {
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs() / scale);
            }
        }
        println!("{mode:?}: worst |Δ logit| / max |logit| = {worst:.2e}");
        assert!(
            worst < 2e-3,
            "{mode:?}: f16 K/V logits differ by {worst} of the largest"
        );
    }
}

/// A context saved from an f16 session restores as f16 and continues exactly.
#[test]
fn f16_context_round_trip_continues_exactly() {
    use beacon::context_file::Snapshot;
    let l = tiny();
    let m = &l.model;
    let mut s = Session::new(m, Mode::Beacon, l.beacon.clone());
    s.set_kv_dtype(m, candle_core::DType::F16).unwrap();
    let ids: Vec<u32> = (0..100).map(|i| (i * 13 % 256) as u32).collect();
    s.feed(m, &ids, Want::Last).unwrap();
    let tmp = std::env::temp_dir().join(format!("beacon-f16-{}.ctx", std::process::id()));
    Snapshot::capture(&s, &l.fingerprint, None)
        .unwrap()
        .save(&tmp)
        .unwrap();
    let mut r = Snapshot::load(&tmp).unwrap().restore(m).unwrap();
    std::fs::remove_file(&tmp).ok();
    assert_eq!(r.kv_dtype(), candle_core::DType::F16);
    let next = |session: &mut Session| -> Vec<f32> {
        let logits = session.feed(m, &[7, 8, 9], Want::Last).unwrap().unwrap();
        logits.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (a, b) = (next(&mut s), next(&mut r));
    assert_eq!(a, b);
}

/// In the open window a beacon is inserted after every α-th raw token and the raw tokens after it
/// see it (SPEC §2.3, §2.6: full-coverage attention, positions contiguous), so beacon mode is full
/// attention's computation exactly until the window's first beacon and differs after it.
#[test]
fn open_window_is_full_attention_until_its_first_beacon() {
    let l = tiny();
    let m = &l.model;
    let w = l.beacon.window;
    let ids: Vec<u32> = (0..w).map(|i| (i * 37 % 251 + 3) as u32).collect();
    // One logits row per raw token, as [1, vocab] tensors.
    let logits = |mode: Mode, cfg: BeaconConfig, n: usize| -> Vec<candle_core::Tensor> {
        let mut s = Session::new(m, mode, cfg);
        // two feeds, so the second chunk reads the first from the cache
        let a = s.feed(m, &ids[..n / 2], Want::From(0)).unwrap();
        let b = s.feed(m, &ids[n / 2..n], Want::From(0)).unwrap();
        assert_eq!(s.stats().windows_closed, 0);
        let rows =
            |t: candle_core::Tensor| t.squeeze(0).unwrap().chunk(t.dim(1).unwrap(), 0).unwrap();
        a.into_iter().chain(b).flat_map(rows).collect()
    };
    // W − 1 raw tokens: the window is still open (it closes at its W-th)
    let n = w - 1;
    let full = logits(Mode::Full, l.beacon.clone(), n);
    for ratio in [2, 8, w] {
        let b = logits(Mode::Beacon, fixed_ratio(&l, ratio), n);
        assert_eq!(b.len(), n, "one row per raw token at x{ratio}");
        for t in 0..n {
            let d = max_abs_diff(&full[t], &b[t]);
            if t < ratio {
                assert!(
                    d <= 1e-5,
                    "x{ratio}, raw token {t} (before the first beacon): max |Δlogit| {d}"
                );
            } else {
                assert!(
                    d > 1e-3,
                    "x{ratio}, raw token {t} (after a beacon) did not see it: max |Δlogit| {d}"
                );
            }
        }
    }
}
