"""Sessions through the binding on the tiny fixture model: saved-context round trip, statistics,
argument and path errors (same messages as the CLI), and what a session refuses."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

import beacon
from conftest import beacon_binary, fixture_root, read_safetensors


@pytest.fixture(scope="module")
def tiny():
    return beacon.Model.load(fixture_root() / "qwen2-tiny", kv_dtype="f32")


@pytest.fixture(scope="module")
def ids():
    inputs = read_safetensors(fixture_root() / "qwen2-tiny" / "expected" / "inputs.safetensors")
    return inputs["input_ids"].reshape(-1).tolist()


def test_model_facts(tiny):
    assert tiny.vocab_size == 256
    assert tiny.config["num_layers"] == 3
    assert tiny.beacon_source == "checkpoint"
    assert not tiny.has_tokenizer
    assert len(tiny.fingerprint) > 8
    assert "qwen2" in repr(tiny)
    assert tiny.memory_plan


def test_saved_context_round_trip(tiny, ids, tmp_path):
    s = tiny.session(ratio=4, window=32)
    s.feed(ids[:150])
    before = s.logits()
    report = s.save(tmp_path / "ctx.beacon")
    assert report["tokens"] == 150 and report["file_bytes"] > 0
    assert report["kv_bytes_held"] < report["kv_bytes_full"]

    r = beacon.Session.load(tiny, tmp_path / "ctx.beacon")
    assert r.tokens == s.tokens == ids[:150]
    np.testing.assert_array_equal(r.logits(), before)
    assert r.stats()["memory_entries"] == s.stats()["memory_entries"]
    # Both continue identically, and identically to one uninterrupted read.
    a = s.feed(ids[150:], logits="all")
    b = r.feed(ids[150:], logits="all")
    np.testing.assert_array_equal(a, b)
    whole = tiny.session(ratio=4, window=32)
    rows = whole.feed(ids, logits=150)
    np.testing.assert_allclose(rows, b, atol=1e-5, rtol=0)


def test_saved_context_other_model_is_refused(tiny, ids, tmp_path):
    s = tiny.session(ratio=2, window=32)
    s.feed(ids[:64])
    s.save(tmp_path / "q.beacon")
    llama = beacon.Model.load(fixture_root() / "llama-tiny", kv_dtype="f32")
    with pytest.raises(beacon.BeaconValueError, match="another model or other beacon weights"):
        beacon.Session.load(llama, tmp_path / "q.beacon")
    with pytest.raises(FileNotFoundError):
        beacon.Session.load(tiny, tmp_path / "missing.beacon")
    (tmp_path / "junk.beacon").write_bytes(b"not a context")
    with pytest.raises(beacon.BeaconError):
        beacon.Session.load(tiny, tmp_path / "junk.beacon")


def test_stats_fields_match_the_cli(tiny, ids):
    s = tiny.session(ratio=8, window=32)
    s.feed(ids)
    st = s.stats()
    assert list(st) == [
        "mode", "ratio", "window", "input_tokens", "windows", "memory_entries", "kv_dtype", "kv_bytes",
        "kv_bytes_full", "prefill_seconds", "prefill_tokens_per_second", "decode_tokens", "decode_seconds",
        "decode_tokens_per_second", "peak_rss_bytes", "finish",
    ]
    assert st["mode"] == "beacon" and st["ratio"] == "8" and st["input_tokens"] == 200
    assert st["windows"] == 7 and st["kv_dtype"] == "f32" and st["finish"] is None
    assert st["memory_entries"] == {"sink": 0, "beacon": 24, "tail": 0, "raw": 9}  # 8 raw + 1 beacon of the open window
    s.reset()
    assert len(s) == 0 and s.stats()["input_tokens"] == 0


def test_modes_read_in_pieces_like_one_feed(tiny, ids):
    # full / streaming / truncate / window-only are fed in pieces (for Ctrl-C); the logits must equal
    # those of the same tokens read one at a time, which the Rust tests tie to one feed.
    for mode, kw in [("full", {}), ("truncate", {"keep": 128}), ("streaming", {"keep": 96}), ("window-only", {})]:
        s = tiny.session(mode, ratio=None, window=32, **kw)
        got = s.feed(ids, logits="all")
        assert got.shape[1] == 256 and np.isfinite(got).all(), mode
        assert s.stats()["mode"] == mode
        if mode in ("full", "window-only"):
            one = tiny.session(mode, ratio=None, window=32, **kw)
            rows = []
            for t in ids:
                one.feed([t])
                rows.append(one.logits())
            np.testing.assert_allclose(got, np.stack(rows), atol=1e-4, rtol=0, err_msg=mode)


def test_cli_and_python_errors_agree(tmp_path):
    exe = beacon_binary()
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as e:
        beacon.Model.load(missing)
    assert isinstance(e.value, beacon.BeaconError)
    assert str(missing) in str(e.value)
    if exe.exists():
        r = subprocess.run([str(exe), "inspect", "-m", str(missing)], capture_output=True, text=True)
        assert r.returncode != 0
        # The CLI prefixes its context ("loading model …: ") to the engine's message, which Python raises as is.
        assert str(e.value) in r.stderr


def test_bad_arguments(tiny, ids):
    with pytest.raises(ValueError, match="ratio"):
        tiny.session(ratio="sometimes")
    with pytest.raises(ValueError, match="mode"):
        tiny.session(mode="everything")
    with pytest.raises(ValueError, match="kv_dtype"):
        tiny.session(kv_dtype="f64")
    with pytest.raises(ValueError, match="window"):
        tiny.session(window=0)
    with pytest.raises(ValueError, match="dtype"):
        beacon.Model.load(fixture_root() / "qwen2-tiny", dtype="f64")
    s = tiny.session(ratio=2, window=32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.feed([1, 2, 256])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.feed([-1])
    with pytest.raises(ValueError, match="no logits yet"):
        s.logits()
    with pytest.raises(ValueError, match="no tokenizer"):
        s.feed("text needs a tokenizer")
    s.feed(ids[:10])
    with pytest.raises(ValueError, match="no tokenizer"):
        s.generate(max_tokens=4)
    with pytest.raises(ValueError, match="logits"):
        s.feed([1], logits="some")
    with pytest.raises(ValueError):
        tiny.chat("not a list")
    with pytest.raises(beacon.BeaconError):
        s.save("/proc/definitely/not/writable.beacon")
    # The session is still usable after every refusal.
    assert len(s) == 10
    assert s.logits().shape == (256,)


def test_ratio_of_window_must_tile(tiny):
    # Engine validation (a config error naming the key) comes through as ValueError with its message.
    with pytest.raises(ValueError, match="ratio"):
        s = tiny.session(ratio=3, window=32)
        s.feed([1] * 40)


def test_eval_ppl_wrapper(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(32, 127)) * 4)
    recs = beacon.eval.ppl(
        model=fixture_root() / "qwen2-tiny", text=[text], lengths=[128], scored=32, piece=16,
        modes=["full", "beacon"], ratios=["4"], window=32, out=tmp_path / "res", no_plot=True,
    )
    assert recs and all(r["ppl"] > 0 for r in recs)
    assert (tmp_path / "res" / "ppl.json").exists()
    with pytest.raises(ValueError, match="--no-such-flag"):
        beacon.eval.ppl(no_such_flag=1)


def test_edge_feeds(tiny, ids):
    s = tiny.session(ratio=2, window=32)
    s.feed(ids[:20])
    before = s.logits()
    assert s.feed([]) is None
    np.testing.assert_array_equal(s.logits(), before)  # an empty feed changes nothing
    rows = s.feed(ids[20:30], logits=10)  # rows from past the end: none, next-token logits kept
    assert rows.shape == (0, 256)
    assert s.logits().shape == (256,)
    rows = s.feed(np.array(ids[30:40]), logits="all")  # NumPy ids
    assert rows.shape == (10, 256)
    np.testing.assert_array_equal(rows[-1], s.logits())
