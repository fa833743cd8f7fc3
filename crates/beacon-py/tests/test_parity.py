"""Python-side logits against the official implementation's golden outputs (the fixtures that
crates/beacon/tests/parity.rs checks), through the binding: feed, logits, memory sizes, token-by-token
feeding and greedy decoding. Cases whose settings a session cannot express (the append layout) are
left to the Rust test."""

from __future__ import annotations

import json

import numpy as np
import pytest

import beacon
from conftest import fixture_root, read_safetensors

ATOL = 1e-4


def _cases():
    root = fixture_root()
    for model_dir in sorted(p for p in root.iterdir() if (p / "expected" / "cases.json").exists()):
        cases = json.loads((model_dir / "expected" / "cases.json").read_text())
        for name, case in cases.items():
            yield pytest.param(model_dir, name, case, id=f"{model_dir.name}/{name}")


def _session_args(b: dict) -> dict | None:
    """Session arguments for a case's beacon settings, or None when a session cannot express them."""
    if b.get("beacon_pos", "interleave") != "interleave" or b.get("beacon_attn", "full-coverage") != "full-coverage":
        return None
    ratios, mix = b["beacon_ratio"], b.get("beacon_ratio_mix", "step-random")
    if mix.startswith("adapt"):
        ratio = mix
    elif len(ratios) == 1:
        ratio = ratios[0]
    else:
        return None
    return dict(ratio=ratio, window=b["beacon_window"], sink=b.get("beacon_sink_size", 0))


_MODELS = {}


def _model(model_dir):
    if model_dir not in _MODELS:
        _MODELS[model_dir] = beacon.Model.load(model_dir, kv_dtype="f32")
    return _MODELS[model_dir]


def test_fixtures_exist():
    assert list(_cases()), f"no parity cases under {fixture_root()}"


@pytest.mark.parametrize("model_dir,name,case", list(_cases()))
def test_parity(model_dir, name, case):
    args = _session_args(case["beacon_settings"])
    if args is None:
        pytest.skip("append layout: not a session option (covered by the Rust parity test)")
    model = _model(model_dir)
    inputs = read_safetensors(model_dir / "expected" / "inputs.safetensors")
    expected = read_safetensors(model_dir / "expected" / f"{name}.safetensors")
    ids = inputs[case.get("input", "input_ids")].reshape(-1).tolist()
    first = case["logits_last_chunk_token_positions"][0]

    s = model.session(**args)
    rows = s.feed(ids, logits=first)
    assert rows.dtype == np.float32 and rows.shape == (len(ids) - first, model.vocab_size)
    if "logits_last_chunk" in expected:
        np.testing.assert_allclose(rows, expected["logits_last_chunk"].reshape(rows.shape), atol=ATOL, rtol=0)
    if "logits_last" in expected:
        np.testing.assert_allclose(rows[-1], expected["logits_last"].reshape(-1), atol=ATOL, rtol=0)
    np.testing.assert_allclose(s.logits(), rows[-1], atol=0, rtol=0)
    if "argmax_last" in case:
        assert int(np.argmax(s.logits())) == case["argmax_last"]
    if "memory_sizes" in expected:
        m = s.stats()["memory_entries"]
        for row in expected["memory_sizes"].tolist():
            assert [m["sink"], m["beacon"], m["raw"]] == row

    if "logits_stream" in expected:
        t = model.session(**args)
        got = []
        for tok in ids:
            t.feed([tok])
            got.append(t.logits())
        np.testing.assert_allclose(np.stack(got), expected["logits_stream"].reshape(len(ids), -1), atol=ATOL, rtol=0)

    if "gen.output_ids" in expected:
        want = expected["gen.output_ids"].reshape(-1).tolist()
        g = model.session(**args)
        g.feed(inputs["prompt_ids"].reshape(-1).tolist())
        got = []
        for _ in want:
            nxt = int(np.argmax(g.logits()))
            got.append(nxt)
            g.feed([nxt])
        assert got == want
