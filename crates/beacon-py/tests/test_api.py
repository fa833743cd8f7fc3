"""The package's surface: exports, docstrings, stubs, exception hierarchy."""

from __future__ import annotations

import pydoc
from pathlib import Path

import beacon


def test_exports_and_docs():
    for name in ("Model", "Session", "BeaconError", "train", "eval", "__version__"):
        assert hasattr(beacon, name)
    assert beacon.Model.__doc__ and beacon.Model.load.__doc__ and beacon.Session.generate.__doc__
    text = pydoc.render_doc(beacon.Model, renderer=pydoc.plaintext)
    assert "session(" in text and "chat(" in text and "tokenize(" in text
    assert beacon.eval.ppl.__doc__


def test_stubs_ship_with_the_package():
    here = Path(beacon.__file__).parent
    assert (here / "_beacon.pyi").exists() and (here / "py.typed").exists()


def test_exception_hierarchy():
    assert issubclass(beacon.BeaconFileNotFoundError, FileNotFoundError)
    assert issubclass(beacon.BeaconFileNotFoundError, beacon.BeaconError)
    assert issubclass(beacon.BeaconValueError, ValueError)
    assert issubclass(beacon.BeaconValueError, beacon.BeaconError)
    assert issubclass(beacon.BeaconOSError, OSError)
