"""Evaluation from Python: thin wrappers over ``beacon eval``.

>>> import beacon
>>> recs = beacon.eval.ppl(model="model.gguf", text=["book.txt"], lengths=[2048, 4096],
...                        modes=["full", "beacon"], ratios=[8], out="results/py", no_plot=True)
>>> [(r["mode"], r["length"], r["ppl"]) for r in recs]
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

from . import _beacon

__all__ = ["ppl"]


def ppl(**kwargs: Any) -> List[Dict[str, Any]]:
    """Perplexity of a fixed scored span after contexts of growing length, per mode:
    ``beacon eval ppl`` with keyword arguments as its flags (``lengths=[2048, 4096]`` →
    ``--lengths 2048 --lengths 4096``, ``quick=True`` → ``--quick``).

    Writes the same JSON, markdown and PNG files under ``out`` as the command and returns its
    records as dicts. Not interruptible before it finishes.
    """
    from . import _flags

    return json.loads(_beacon.eval_ppl(_flags(kwargs)))
