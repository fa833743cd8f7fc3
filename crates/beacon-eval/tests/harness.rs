//! The harness end to end on the tiny fixture model (vocab 256, no tokenizer → bytes as ids, native
//! window 256, beacon window 32).

use beacon::session::{Session, Want};
use beacon::{load, LoadOptions};
use beacon_eval::cases::CaseRecord;
use beacon_eval::harness::{CommonArgs, EvalMode, ModeArgs, ModeSpec};
use beacon_eval::needle::NeedleTask;
use beacon_eval::ppl::{nll_of, score_span, score_span_rolling, PplRecord};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/llama-tiny")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beacon-eval-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Pseudo-English text long enough for the grids below.
fn text(n: usize) -> String {
    let words = [
        "the", "sky", "was", "grey.", "A", "ship", "sailed", "north,", "and", "rain", "fell.",
        "They", "waited.",
    ];
    let mut s = String::new();
    let mut x = 12345u64;
    while s.len() < n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(words[(x >> 33) as usize % words.len()]);
        s.push(' ');
    }
    s
}

fn common(out: &Path) -> CommonArgs {
    CommonArgs {
        model: beacon::cli_args::ModelArgs {
            model: Some(tiny()),
            ..Default::default()
        },
        out: out.to_path_buf(),
        seed: 7,
        ..Default::default()
    }
}

fn modes(modes: &str, ratios: &str) -> ModeArgs {
    ModeArgs {
        modes: modes.split(',').map(String::from).collect(),
        ratios: ratios.split(',').map(String::from).collect(),
        ..Default::default()
    }
}

#[test]
fn span_scoring_in_pieces_matches_one_forward() {
    let loaded = load(&tiny(), &LoadOptions::default()).unwrap();
    let model = &loaded.model;
    let ids: Vec<u32> = text(400).bytes().map(u32::from).take(200).collect();
    let (ctx, span) = ids.split_at(150);
    // reference: one feed of everything, logits of every token
    let mut s = Session::new(model, beacon::Mode::Full, loaded.beacon.clone());
    let l = s.feed(model, &ids, Want::From(0)).unwrap().unwrap();
    let rows = beacon_eval::harness::logit_rows(&l).unwrap();
    let want: f64 = (149..199).map(|t| nll_of(&rows[t], ids[t + 1])).sum();
    for piece in [1, 7, 16, 64] {
        let mut s = Session::new(model, beacon::Mode::Full, loaded.beacon.clone());
        let (nll, n) = score_span(model, &mut s, ctx, span, piece, &mut |_| {}).unwrap();
        assert_eq!(n, 50);
        assert!(
            (nll - want).abs() < 1e-3 * want.abs().max(1.0),
            "piece {piece}: {nll} vs {want}"
        );
    }
    // no context: the first token of the span is not scored
    let mut s = Session::new(model, beacon::Mode::Full, loaded.beacon.clone());
    let (_, n) = score_span(model, &mut s, &[], span, 16, &mut |_| {}).unwrap();
    assert_eq!(n, 49);
    // rolling truncation: with a keep covering everything it is full attention; with a small keep
    // every piece holds exactly `keep` entries
    let mut fresh = || {
        Ok(Session::new(
            model,
            beacon::Mode::Full,
            loaded.beacon.clone(),
        ))
    };
    let (scored, _, _) =
        score_span_rolling(model, &mut fresh, &ids, 150, 1000, 16, &mut |_| {}).unwrap();
    let (nll, n): (f64, usize) = (scored.iter().map(|s| s.1).sum(), scored.len());
    assert_eq!(n, 50);
    // every span token once, in order
    assert!(scored.iter().enumerate().all(|(i, s)| s.0 == i));
    // bucketed by window position, the buckets partition the scored tokens and pool back to the total
    let buckets = beacon_eval::ppl::by_window_position(&scored, 150, 32);
    assert_eq!(buckets.iter().map(|b| b.tokens).sum::<usize>(), 50);
    let pooled: f64 = buckets.iter().map(|b| b.ppl.ln() * b.tokens as f64).sum();
    assert!(
        (pooled - nll).abs() < 1e-6 * nll.abs().max(1.0),
        "{pooled} vs {nll}"
    );
    // 150 % 32 = 22: span tokens 0..10 sit at window positions 22..32, tokens 10..18 at 0..8
    assert_eq!(
        (buckets[0].from, buckets[0].to, buckets[0].tokens),
        (0, 8, 8 + 8)
    );
    assert!(
        (nll - want).abs() < 1e-3 * want.abs().max(1.0),
        "{nll} vs {want}"
    );
    let (scored, peak, bpe) =
        score_span_rolling(model, &mut fresh, &ids, 150, 40, 16, &mut |_| {}).unwrap();
    let (nll, n): (f64, usize) = (scored.iter().map(|s| s.1).sum(), scored.len());
    assert_eq!((n, peak), (50, 40 * bpe));
    assert!(nll.is_finite() && (nll - want).abs() > 1e-3);
}

#[test]
fn ppl_grid_on_tiny_model() {
    let out = tmp("ppl");
    let file = out.join("book.txt");
    std::fs::write(&file, text(3000)).unwrap();
    let args = beacon_eval::ppl::PplArgs {
        common: common(&out),
        modes: ModeArgs {
            // (the equal-memory baselines are checked in their own test below)
            equal_memory: Some(false),
            ..modes("beacon,full,truncate,streaming", "2,8,adapt")
        },
        text: vec![file.clone()],
        lengths: vec![64, 128, 384],
        scored: 32,
        piece: 16,
        spans: 1,
    };
    let recs = beacon_eval::ppl::run(&args, "beacon eval ppl (test)").unwrap();
    // 3 lengths × (full, truncate, streaming, beacon×3)
    assert_eq!(recs.len(), 3 * 6);
    for r in &recs {
        assert!(r.ppl.is_finite() && r.ppl > 1.0, "{r:?}");
        assert_eq!(r.scored_tokens, 32);
        assert_eq!(r.file, "book.txt");
    }
    let find = |label: &str, len: usize| {
        recs.iter()
            .find(|r| r.label == label && r.context_tokens == len)
            .unwrap()
    };
    // within the native window (256) truncate and streaming are full attention
    assert_eq!(find("truncate-256", 128).ppl, find("full", 128).ppl);
    assert_eq!(find("streaming-256", 128).same_as.as_deref(), Some("full"));
    // beyond it they differ and hold less K/V
    assert!(find("truncate-256", 384).same_as.is_none());
    assert!(find("streaming-256", 384).peak_kv_bytes < find("full", 384).peak_kv_bytes);
    assert!(find("beacon-x8", 384).peak_kv_bytes < find("beacon-x2", 384).peak_kv_bytes);
    // outputs
    let json: Vec<PplRecord> =
        serde_json::from_str(&std::fs::read_to_string(out.join("ppl.json")).unwrap()).unwrap();
    assert_eq!(json.len(), recs.len());
    let md = std::fs::read_to_string(out.join("ppl.md")).unwrap();
    assert!(
        md.contains("beacon eval ppl (test)") && md.contains("| beacon-adapt |"),
        "{md}"
    );
    assert!(std::fs::metadata(out.join("ppl.png")).unwrap().len() > 1000);
    // deterministic under the seed (random ratio draws included)
    let mut a2 = args.clone();
    a2.modes = modes("beacon", "random");
    a2.common.out = out.join("again");
    a2.common.no_plot = true;
    let r1 = beacon_eval::ppl::run(&a2, "x").unwrap();
    let r2 = beacon_eval::ppl::run(&a2, "x").unwrap();
    assert_eq!(
        r1.iter().map(|r| r.nll).collect::<Vec<_>>(),
        r2.iter().map(|r| r.nll).collect::<Vec<_>>()
    );
    // equal-memory comparison: --keep
    let mut a3 = args.clone();
    a3.modes = ModeArgs {
        keep: vec![128],
        ..modes("truncate,streaming", "8")
    };
    a3.lengths = vec![384];
    a3.common.out = out.join("keep");
    a3.common.no_plot = true;
    let r3 = beacon_eval::ppl::run(&a3, "x").unwrap();
    assert_eq!(
        r3.iter().map(|r| r.label.as_str()).collect::<Vec<_>>(),
        ["truncate-128", "streaming-128"]
    );
    assert!(r3.iter().all(|r| r.keep == Some(128)));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn needle_and_passkey_grid_on_tiny_model() {
    let out = tmp("needle");
    let hay = out.join("hay.json");
    std::fs::write(&hay, serde_json::json!({ "text": text(20000) }).to_string()).unwrap();
    let args = beacon_eval::needle::NeedleArgs {
        common: common(&out),
        modes: modes("full,beacon", "4"),
        lengths: vec![512, 1024],
        depths: vec![0.0, 50.0, 100.0],
        tasks: vec![NeedleTask::Needle, NeedleTask::Passkey],
        samples: 1,
        haystack: Some(hay),
        max_new: 4,
        no_chat: false,
    };
    let recs: Vec<CaseRecord> = beacon_eval::needle::run(&args, "t").unwrap();
    assert_eq!(recs.len(), 2 * 2 * 3 * 2);
    for r in &recs {
        assert!(r.score == 0.0 || r.score == 1.0);
        // prompts leave ANSWER_ROOM (64) tokens for the answer
        assert!(
            r.prompt_tokens + 64 <= r.context_tokens + 2
                && r.prompt_tokens + 64 + 2 >= r.context_tokens,
            "{} vs {}",
            r.prompt_tokens,
            r.context_tokens
        );
        assert_eq!(r.expected[0].len(), if r.task == "needle" { 7 } else { 5 });
    }
    assert!(out.join("needle.png").exists() && out.join("needle_passkey.png").exists());
    // the same seed gives the same needles and answers
    let mut a2 = args.clone();
    a2.common.out = out.join("b");
    a2.common.no_plot = true;
    let again = beacon_eval::needle::run(&a2, "t").unwrap();
    let key = |r: &CaseRecord| (r.expected.clone(), r.output.clone());
    assert_eq!(
        recs.iter().map(key).collect::<Vec<_>>(),
        again.iter().map(key).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `window-only` and the equal-memory baselines (`truncate@xr`, `streaming@xr`, on by default when
/// beacon and truncate/streaming are both selected): their keeps are beacon ×r's measured peak.
#[test]
fn ppl_window_only_and_equal_memory_on_tiny_model() {
    let out = tmp("ppl-eqmem");
    let file = out.join("book.txt");
    std::fs::write(&file, text(3000)).unwrap();
    let args = beacon_eval::ppl::PplArgs {
        common: common(&out),
        modes: modes("full,window-only,truncate,streaming,beacon", "2,8"),
        text: vec![file.clone()],
        lengths: vec![64, 384],
        scored: 32,
        piece: 16,
        spans: 1,
    };
    let recs = beacon_eval::ppl::run(&args, "beacon eval ppl (test)").unwrap();
    let find = |label: &str, len: usize| {
        recs.iter()
            .find(|r| r.label == label && r.context_tokens == len)
            .unwrap_or_else(|| panic!("no {label} at {len}"))
    };
    for len in [64, 384] {
        let full = find("full", len);
        let bpe = full.full_kv_bytes / len;
        // window-only holds one beacon window (32) at most, and is not full attention beyond it
        let wo = find("window-only", len);
        assert_eq!(wo.peak_kv_bytes, 32 * bpe, "{len}");
        assert!(wo.ppl.is_finite() && wo.ppl != full.ppl, "{len}");
        assert!(wo.same_as.is_none());
        for r in ["2", "8"] {
            let beacon = find(&format!("beacon-x{r}"), len);
            let entries = beacon.peak_kv_bytes / bpe;
            let t = find(&format!("truncate@x{r}"), len);
            assert_eq!(
                t.memory_of.as_deref(),
                Some(format!("beacon-x{r}").as_str())
            );
            assert_eq!((t.memory_entries, t.keep), (Some(entries), Some(entries)));
            assert_eq!(t.mode, EvalMode::Truncate);
            if t.same_as.is_none() {
                // each piece is read with the `entries` tokens ending with it: exactly that much K/V
                assert_eq!(t.peak_kv_bytes, entries * bpe, "{len} x{r}");
            } else {
                assert!(entries >= len, "{len} x{r}: {entries}");
            }
            // streaming keeps 4 sink + the rest recent; too small a budget is skipped
            let s = recs
                .iter()
                .find(|x| x.label == format!("streaming@x{r}") && x.context_tokens == len);
            match s {
                Some(s) => {
                    assert_eq!(s.memory_entries, Some(entries));
                    assert_eq!(s.keep, Some(entries - 4));
                }
                None => assert!(entries <= 68, "{len} x{r}: {entries} entries"),
            }
        }
        // more memory at ×2 than at ×8
        assert!(
            find("truncate@x2", len).memory_entries > find("truncate@x8", len).memory_entries
                || len <= 64
        );
    }
    // the native-window baselines are still there
    assert!(recs.iter().any(|r| r.label == "truncate-256"));
    let md = std::fs::read_to_string(out.join("ppl.md")).unwrap();
    for row in [
        "| window-only |",
        "| truncate@x8 |",
        "| truncate@x2 (= beacon-x2) |",
    ] {
        assert!(md.contains(row), "{row} missing:\n{md}");
    }
    assert!(md.contains("Beacon weights:"), "{md}");
    assert!(std::fs::metadata(out.join("ppl.png")).unwrap().len() > 1000);
    assert!(std::fs::metadata(out.join("ppl_ratio.png")).unwrap().len() > 1000);
    // off when asked
    let mut a2 = args.clone();
    a2.modes.equal_memory = Some(false);
    a2.lengths = vec![384];
    a2.common.out = out.join("off");
    a2.common.no_plot = true;
    let r2 = beacon_eval::ppl::run(&a2, "x").unwrap();
    assert!(r2
        .iter()
        .all(|r| r.memory_of.is_none() && !r.label.contains('@')));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn needle_window_only_and_equal_memory_on_tiny_model() {
    let out = tmp("needle-eqmem");
    let hay = out.join("hay.json");
    std::fs::write(&hay, serde_json::json!({ "text": text(20000) }).to_string()).unwrap();
    let args = beacon_eval::needle::NeedleArgs {
        common: CommonArgs {
            no_plot: true,
            ..common(&out)
        },
        modes: modes("full,window-only,truncate,beacon", "4"),
        lengths: vec![512],
        depths: vec![50.0],
        tasks: vec![NeedleTask::Needle],
        samples: 1,
        haystack: Some(hay),
        max_new: 4,
        no_chat: false,
    };
    let recs: Vec<CaseRecord> = beacon_eval::needle::run(&args, "t").unwrap();
    let labels: Vec<&str> = recs.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "full",
            "window-only",
            "truncate-256",
            "beacon-x4",
            "truncate@x4"
        ]
    );
    let beacon = &recs[3];
    let eq = &recs[4];
    let loaded = load(&tiny(), &LoadOptions::default()).unwrap();
    let bpe =
        Session::new(&loaded.model, beacon::Mode::Full, loaded.beacon.clone()).bytes_per_entry();
    assert_eq!(eq.memory_of.as_deref(), Some("beacon-x4"));
    assert_eq!(eq.memory_entries, Some(beacon.peak_kv_bytes / bpe));
    assert_eq!(eq.keep, eq.memory_entries);
    // window-only never holds more than one window of 32 entries (+ the token being decoded)
    assert!(
        recs[1].peak_kv_bytes <= 33 * bpe,
        "{}",
        recs[1].peak_kv_bytes
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn synthetic_retrieval_and_efficiency_on_tiny_model() {
    let out = tmp("retr");
    let data = out.join("data");
    // a minimal data directory: the haystack only (word lists fall back to built-in ones)
    std::fs::create_dir_all(data.join("haystack")).unwrap();
    std::fs::write(
        data.join("haystack/pd_essays_ruler_format.json"),
        serde_json::json!({ "text": text(20000) }).to_string(),
    )
    .unwrap();
    let mut c = common(&out);
    c.data = Some(data.clone());
    let args = beacon_eval::retrieval::RetrievalArgs {
        common: c.clone(),
        modes: modes("beacon", "8"),
        tasks: vec![
            "niah_multikey".into(),
            "niah_multivalue".into(),
            "vt".into(),
            "cwe".into(),
        ],
        lengths: vec![1024],
        lines: vec![],
        kv_keys: vec![],
        samples: Some(1),
        no_chat: false,
        penalties: Default::default(),
    };
    let recs = beacon_eval::retrieval::run(&args, "t").unwrap();
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert!((0.0..=1.0).contains(&r.score));
        assert!(
            r.prompt_tokens <= 1024 - 64 + 2 && r.prompt_tokens > 800,
            "{}: {}",
            r.task,
            r.prompt_tokens
        );
    }
    let eff = beacon_eval::efficiency::EfficiencyArgs {
        common: CommonArgs {
            out: out.join("eff"),
            ..c.clone()
        },
        modes: modes("full,beacon,streaming", "2,8"),
        lengths: vec![128, 512],
        decode: 2,
        text: Some({
            let f = out.join("t.txt");
            std::fs::write(&f, text(2000)).unwrap();
            f
        }),
    };
    let er = beacon_eval::efficiency::run(&eff, "t").unwrap();
    assert_eq!(er.len(), 2 * 4);
    let get = |l: &str, n: usize| {
        er.iter()
            .find(|r| r.label == l && r.context_tokens == n)
            .unwrap()
    };
    assert_eq!(
        get("full", 512).peak_kv_bytes,
        get("full", 512).full_kv_bytes
    );
    assert!(get("beacon-x8", 512).peak_kv_bytes < get("beacon-x2", 512).peak_kv_bytes);
    assert!(get("beacon-x2", 512).peak_kv_bytes < get("full", 512).peak_kv_bytes);
    assert!(out.join("eff/efficiency.png").exists());
    // the report picks up the sections
    let rep = beacon_eval::report::ReportArgs {
        common: CommonArgs {
            out: out.join("eff"),
            ..c
        },
        report: out.join("RESULTS.md"),
        run: false,
        trained: None,
        task_keep: None,
        ratios: vec![],
        task_ratios: vec![],
    };
    beacon_eval::report::run(&rep, "beacon eval report (test)").unwrap();
    let md = std::fs::read_to_string(out.join("RESULTS.md")).unwrap();
    assert!(
        md.contains("## Efficiency")
            && md.contains("efficiency.png")
            && md.contains("## Trained beacons"),
        "{md}"
    );
    // a hand-written part after the mark survives regeneration, once
    let hand = format!(
        "{}\n\n## Measured by hand\n\nkept\n",
        beacon_eval::report::HAND_WRITTEN_MARK
    );
    std::fs::write(out.join("RESULTS.md"), format!("{md}{hand}")).unwrap();
    beacon_eval::report::run(&rep, "beacon eval report (test)").unwrap();
    beacon_eval::report::run(&rep, "beacon eval report (test)").unwrap();
    let again = std::fs::read_to_string(out.join("RESULTS.md")).unwrap();
    assert!(again.ends_with(&hand), "{again}");
    assert_eq!(again.matches("## Measured by hand").count(), 1);
    assert!(again.contains("## Efficiency"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn data_sets_load_when_present() {
    // The shared data is not part of the repository; check the readers when it is there.
    let c = CommonArgs::default();
    let Ok(data) = beacon_eval::harness::data_dir(&c) else {
        return;
    };
    if !data.join("eval").exists() {
        return;
    }
    let lines =
        beacon_eval::data::longchat_lines(&data.join("eval/longchat_lines/200_lines.jsonl"))
            .unwrap();
    assert_eq!(lines.len(), 50);
    assert!(lines[0]
        .prompt
        .contains(&format!("<{}>", lines[0].expected_number)));
    let kv = beacon_eval::data::kv_retrieval(
        &data.join("eval/lost_in_the_middle/kv-retrieval-75_keys.jsonl.gz"),
    )
    .unwrap();
    assert_eq!(kv.len(), 500);
    assert!(kv[0]
        .ordered_kv_records
        .iter()
        .any(|(k, v)| k == &kv[0].key && v == &kv[0].value));
    let (items, pool) = beacon_eval::data::squad(&data.join("eval/ruler/squad.json")).unwrap();
    assert!(items.len() > 5000 && pool.len() > 1000);
    let (h, _) =
        beacon_eval::data::hotpotqa(&data.join("eval/ruler/hotpotqa_first2000.json")).unwrap();
    assert!(h.len() > 1900 && h[0].gold.len() >= 2);
    for p in beacon_eval::data::held_out_paths(&data) {
        assert!(p.exists(), "{}", p.display());
    }
    // a QA case on bytes: the gold paragraph is inside, the length is met
    let tok = beacon_eval::harness::Tok::Bytes;
    let cases =
        beacon_eval::retrieval::qa_cases(&tok, false, "qa_squad", &items, &pool, &[4096], 2, 1)
            .unwrap();
    for c in &cases {
        let ctx = String::from_utf8_lossy(&c.context.iter().map(|&b| b as u8).collect::<Vec<_>>())
            .into_owned();
        assert!(c.context.len() <= 4096 && c.context.len() > 3000);
        assert!(c.expected.iter().any(|a| ctx.contains(a.as_str())));
    }
    let _ = ModeSpec::new(EvalMode::Full, None, None);
}
