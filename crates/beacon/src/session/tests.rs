//! Baseline steps against full attention on the tiny fixture (the window plan and close rule are
//! tested in `layout.rs`).

use super::*;

/// The tiny Llama fixture (vocab 256, beacon window 32, 3 layers).
fn tiny() -> crate::Loaded {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/reference/llama-tiny");
    crate::load(&dir, &crate::LoadOptions::default()).expect("the tiny fixture loads")
}

fn ids(n: usize, mul: usize) -> Vec<u32> {
    (0..n).map(|i| (i * mul % 251 + 3) as u32).collect()
}

/// Logits of `feeds` (each with its `Want`) in a fresh session, as one flat vector per feed.
fn logits_of(
    l: &crate::Loaded,
    mode: Mode,
    chunk: usize,
    feeds: &[(&[u32], Want)],
) -> (Vec<Vec<f32>>, Session) {
    let m = &l.model;
    let mut s = Session::new(m, mode, l.beacon.clone());
    s.prefill_chunk = chunk;
    let out = feeds
        .iter()
        .filter_map(|(t, w)| s.feed(m, t, *w).unwrap())
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (out, s)
}

#[test]
fn window_only_within_one_window_is_full_attention() {
    let l = tiny();
    let w = l.beacon.window;
    assert_eq!(w, 32);
    let x = ids(w, 37);
    for sink in [0, 2] {
        let mode = Mode::WindowOnly { sink, window: w };
        // up to and including a full window (it closes only when more tokens come)
        for n in [1, 5, w - 1, w] {
            let feeds: [(&[u32], Want); 2] =
                [(&x[..n / 2], Want::From(0)), (&x[n / 2..n], Want::From(0))];
            let (full, _) = logits_of(&l, Mode::Full, 512, &feeds);
            let (wo, s) = logits_of(&l, mode.clone(), 512, &feeds);
            assert_eq!(wo, full, "sink {sink}, {n} tokens");
            assert_eq!(s.layout.context_len(), n);
            assert_eq!((s.layout.sink, s.stats.windows_closed), (0, 0));
            assert_eq!(s.stats.peak_kv_bytes, n * s.bytes_per_entry());
        }
    }
}

#[test]
fn window_only_after_a_close_is_full_attention_over_sink_and_window() {
    let l = tiny();
    let w = l.beacon.window;
    let x = ids(3 * w + 11, 53);
    for sink in [0, 2] {
        let mode = Mode::WindowOnly { sink, window: w };
        for (closed, extra) in [(1, 1), (1, 20), (2, 11)] {
            let start = closed * w;
            let total = start + extra;
            // window-only reads everything; the reference reads only [sink tokens] + the open window
            let (wo, s) = logits_of(&l, mode.clone(), 512, &[(&x[..total], Want::From(start))]);
            let mut reference = x[..sink].to_vec();
            reference.extend_from_slice(&x[start..total]);
            let (full, _) = logits_of(&l, Mode::Full, 512, &[(&reference, Want::From(sink))]);
            let (a, b) = (&wo[0], &full[0]);
            assert_eq!(a.len(), extra * 256);
            if sink == 0 {
                // the same chunks over the same K/V: bit for bit
                assert_eq!(a, b, "{closed} closed + {extra}");
            }
            // with a sink, its K/V were computed in a longer chunk here (the first window) than
            // in the reference: equal up to f32 summation order
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                worst <= 1e-5 * scale,
                "sink {sink}, {closed} closed + {extra}: max |Δ logit| {worst} (scale {scale})"
            );
            // bookkeeping: sink + open window held; the peak is the first window, or the sink
            // plus a later full window
            let lay = &s.layout;
            assert_eq!((lay.sink, lay.beacons, lay.window_raw), (sink, 0, extra));
            assert_eq!(lay.context_len(), sink + extra);
            assert_eq!(s.stats.windows_closed, closed);
            assert_eq!(s.kv_bytes_now(), (sink + extra) * s.bytes_per_entry());
            let peak = if closed >= 2 { sink + w } else { w };
            assert_eq!(s.stats.peak_kv_bytes, peak * s.bytes_per_entry());
            assert_eq!(s.stats.input_tokens, total);
        }
    }
}

#[test]
fn window_only_chunks_stop_at_window_boundaries() {
    let l = tiny();
    let w = l.beacon.window;
    let x = ids(2 * w + 9, 29);
    let mode = Mode::WindowOnly { sink: 2, window: w };
    let (one, a) = logits_of(&l, mode.clone(), 512, &[(&x, Want::From(0))]);
    // small chunks, and token by token: same memory, same logits up to summation order
    for chunk in [7, 1] {
        let (many, b) = logits_of(&l, mode.clone(), chunk, &[(&x, Want::From(0))]);
        assert_eq!(a.layout, b.layout, "chunk {chunk}");
        assert_eq!(
            a.stats.peak_kv_bytes, b.stats.peak_kv_bytes,
            "chunk {chunk}"
        );
        let worst = one[0]
            .iter()
            .zip(&many[0])
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst < 1e-4, "chunk {chunk}: {worst}");
    }
    // one step per window at chunk 512: [0, w), [w, 2w), [2w, 2w + 9)
    assert_eq!(a.stats.steps, 3);
    let mut c = Session::new(&l.model, mode, l.beacon.clone());
    for t in &x {
        c.feed(&l.model, &[*t], Want::Last).unwrap();
    }
    assert_eq!(c.layout, a.layout);
    assert_eq!(c.stats.windows_closed, 2);
    assert_eq!(
        Mode::WindowOnly { sink: 1, window: 8 }.name(),
        "window-only"
    );
}

fn vec_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Un-rotated keys and values of `layer`'s cache entries `at`.
fn pre_rope_entries(s: &Session, m: &Model, layer: usize, at: &[usize]) -> Vec<f32> {
    let (k, v) = s.caches[layer].view().unwrap().unwrap();
    let (k, v) = (
        k.to_dtype(DType::F32).unwrap(),
        v.to_dtype(DType::F32).unwrap(),
    );
    let len = k.dim(1).unwrap();
    let back: Vec<i64> = (0..len as i64).map(|p| -p).collect();
    let (k, v) = (
        rotate_by(m, &k, &back, false)
            .unwrap()
            .contiguous()
            .unwrap(),
        v.contiguous().unwrap(),
    );
    let idx: Vec<u32> = at.iter().map(|&i| i as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
    let mut out: Vec<f32> = k
        .index_select(&idx, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    out.extend(
        v.index_select(&idx, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    );
    out
}

#[test]
fn raw_tail_keeps_the_windows_last_raw_entries_after_the_beacons() {
    let l = tiny();
    let m = &l.model;
    let (w, tail) = (l.beacon.window, 8);
    let cfg = BeaconConfig {
        ratios: vec![4],
        sink_size: 1,
        raw_tail: tail,
        ..l.beacon.clone()
    };
    let x = ids(3 * w + 5, 41);
    // One token short of the first close: the open window holds w − 1 raw entries + 7 beacons.
    let mut s = Session::new(m, Mode::Beacon, cfg.clone());
    s.feed(m, &x[..w - 1], Want::None).unwrap();
    let raw_at: Vec<usize> = (0..s.layout.window_flags.len())
        .filter(|&i| !s.layout.window_flags[i])
        .collect();
    let before: Vec<Vec<f32>> = (0..m.cfg.num_layers)
        .map(|layer| {
            // the last tail − 1 raw entries (the closing token is not fed yet), between beacons
            pre_rope_entries(&s, m, layer, &raw_at[raw_at.len() - (tail - 1)..])
        })
        .collect();
    s.feed(m, &x[w - 1..w], Want::None).unwrap();
    let lay = &s.layout;
    assert_eq!((lay.sink, lay.beacons, lay.tail), (1, w / 4, tail));
    for (layer, want) in before.iter().enumerate() {
        // the tail sits right after the beacons, re-rotated to its memory positions
        let at: Vec<usize> = (1 + w / 4..1 + w / 4 + tail - 1).collect();
        let got = pre_rope_entries(&s, m, layer, &at);
        let diff = vec_diff(&got, want);
        assert!(
            diff < 1e-5,
            "layer {layer}: tail differs from the window's raw entries by {diff}"
        );
    }
    // The next close replaces the tail: memory = sink + two windows' beacons + one tail.
    s.feed(m, &x[w..2 * w + 3], Want::None).unwrap();
    let lay = s.layout.clone();
    assert_eq!((lay.sink, lay.beacons, lay.tail), (1, 2 * (w / 4), tail));
    assert_eq!(s.caches[0].len(), lay.context_len());
    // The tail is what the next window's first tokens see: their logits differ from no tail's,
    // and the logits before the first close do not.
    let no_tail = BeaconConfig {
        raw_tail: 0,
        ..cfg.clone()
    };
    let first_of_next = |c: &BeaconConfig| {
        let mut s = Session::new(m, Mode::Beacon, c.clone());
        let a = s.feed(m, &x[..w - 1], Want::Last).unwrap().unwrap();
        let b = s.feed(m, &x[w - 1..w + 2], Want::From(0)).unwrap().unwrap();
        (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        )
    };
    let (a_tail, b_tail) = first_of_next(&cfg);
    let (a_none, b_none) = first_of_next(&no_tail);
    assert_eq!(a_tail, a_none);
    assert!(vec_diff(&b_tail, &b_none) > 1e-3);
}
