#!/usr/bin/env python3
"""Overhead of the Python binding: the same job through `beacon run` and through `import beacon`,
alternated (ABAB) in fresh processes, on the same machine.

Job: the first 4,096 tokens of data/books/pg1342.txt + a question, beacon x8, f16 K/V, greedy, 64 new
tokens (plain continuation, no chat template, as `beacon run -f FILE --max-file-tokens 4096 -p Q -n 64
--ratio 8`). For each run: the engine's own time (read + decode seconds from `--stats-json` /
`Session.stats()`) and the process's wall time (start, model load, read, decode, exit).

    python scripts/bench_python.py --beacon target/release/beacon --pairs 5   # needs `beacon` importable

Prints one line per run and the per-pair ratios Python / CLI (min and median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "books", "pg1342.txt")
QUESTION = "Who is the narrator of this story?"

PY_RUN = r"""
import json, sys, beacon
book, question, n_file, n_new, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = beacon.Model.load()
body = open(book, encoding="utf-8").read()
ids = model.tokenize(body)
if len(ids) > n_file:
    body = model.detokenize(ids[:n_file])
s = model.session(ratio=8)
text = s.generate(body + "\n\n" + question, max_tokens=n_new)
st = s.stats()
st["text"] = text
json.dump(st, open(out, "w"))
"""


def run_cli(exe: str, out: str, n_file: int, n_new: int) -> float:
    t = time.perf_counter()
    subprocess.run(
        [exe, "run", "-f", BOOK, "--max-file-tokens", str(n_file), "-p", QUESTION, "-n", str(n_new),
         "--ratio", "8", "--quiet", "--stats-json", out],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t


def run_py(out: str, n_file: int, n_new: int) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", PY_RUN, BOOK, QUESTION, str(n_file), str(n_new), out], check=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--beacon", default="target/release/beacon", help="the CLI binary")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--file-tokens", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    rows = []
    for i in range(a.pairs):
        pair = {}
        for kind in ("cli", "py"):
            out = os.path.join(tmp, f"{kind}{i}.json")
            wall = run_cli(a.beacon, out, a.file_tokens, a.new_tokens) if kind == "cli" else run_py(out, a.file_tokens, a.new_tokens)
            st = json.load(open(out))
            engine = st["prefill_seconds"] + st["decode_seconds"]
            pair[kind] = (engine, wall, st)
            print(
                f"pair {i} {kind:3}: read {st['input_tokens']} tok in {st['prefill_seconds']:.2f}s, "
                f"{st['decode_tokens']} tok in {st['decode_seconds']:.2f}s -> engine {engine:.2f}s, wall {wall:.2f}s",
                flush=True,
            )
        rows.append(pair)
    measures = {
        "read (prefill_seconds)": lambda x: x[2]["prefill_seconds"],
        "decode (decode_seconds)": lambda x: x[2]["decode_seconds"],
        "engine (read + decode)": lambda x: x[0],
        "process wall": lambda x: x[1],
    }
    for key, f in measures.items():
        ratios = [f(r["py"]) / f(r["cli"]) for r in rows]
        cli = statistics.median(f(r["cli"]) for r in rows)
        py = statistics.median(f(r["py"]) for r in rows)
        print(
            f"{key}: median CLI {cli:.2f}s, Python {py:.2f}s; Python/CLI per pair: min {min(ratios):.3f}, "
            f"median {statistics.median(ratios):.3f}, max {max(ratios):.3f}"
        )
    same = all(r["py"][2]["input_tokens"] == r["cli"][2]["input_tokens"] and
               r["py"][2]["decode_tokens"] == r["cli"][2]["decode_tokens"] for r in rows)
    print(f"same tokens read and generated in every pair: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
