"""Shared helpers of the Python test suite (run by scripts/test.sh after `cargo test`)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]


def fixture_root() -> Path:
    """The Rust parity fixtures (`BEACON_FIXTURES` overrides, as for crates/beacon/tests/parity.rs)."""
    return Path(os.environ.get("BEACON_FIXTURES", REPO / "tests" / "fixtures" / "reference"))


_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "F16": np.float16}


def read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    """A safetensors file as NumPy arrays (8-byte little-endian header length, JSON header, data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        arr = np.frombuffer(raw[base + a : base + b], dtype=_DTYPES[meta["dtype"]])
        out[name] = arr.reshape(meta["shape"])
    return out


def beacon_binary() -> Path:
    """The `beacon` CLI built by cargo (`BEACON_BIN` overrides)."""
    if "BEACON_BIN" in os.environ:
        return Path(os.environ["BEACON_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "release" / "beacon"


@pytest.fixture(scope="session")
def default_model():
    import beacon

    return beacon.Model.load()
