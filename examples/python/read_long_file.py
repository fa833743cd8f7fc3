#!/usr/bin/env python3
"""Read a long file through beacons and answer a question about it (the README's main job, from Python).

    python examples/python/read_long_file.py -f data/books/pg1342.txt --max-file-tokens 32000 \\
        --ratio 8 -q "How much a year does Mr. Darcy have? Answer briefly."

The file and the question go into one user message of the model's chat template, as with
`beacon run --chat -f FILE -p QUESTION`; the session reads it window by window (Ctrl-C stops the read),
the answer is streamed, and the statistics of `beacon run --stats-json` follow on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import beacon


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="model directory or .gguf (default: the default model)")
    ap.add_argument("-f", "--file", required=True, help="the long text to read")
    ap.add_argument("-q", "--question", default="What is this text about? Answer briefly.")
    ap.add_argument("--max-file-tokens", type=int, default=0, help="keep only the first N tokens (0: all)")
    ap.add_argument("--ratio", default="8", help="compression ratio: 2..32, adapt, random")
    ap.add_argument("--mode", default="beacon", help="beacon, full, truncate, streaming, window-only")
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("--stats-json", help="write the statistics here too")
    a = ap.parse_args()

    model = beacon.Model.load(a.model)
    with open(a.file, encoding="utf-8") as f:
        text = f.read()
    if a.max_file_tokens > 0:
        ids = model.tokenize(text)
        if len(ids) > a.max_file_tokens:
            text = model.detokenize(ids[: a.max_file_tokens])

    prompt = model.tokenize(
        model.apply_chat_template([{"role": "user", "content": f"{text}\n\n{a.question}"}]), special=True
    )
    ratio = int(a.ratio) if a.ratio.isdigit() else a.ratio
    session = model.session(a.mode, ratio=ratio)
    print(f"reading {len(prompt)} tokens ({a.mode}, ratio {a.ratio}) ...", file=sys.stderr)
    t = time.perf_counter()
    for piece in session.generate(prompt, max_tokens=a.max_tokens, dry=True, stream=True):
        print(piece, end="", flush=True)
    print()
    st = session.stats()
    m = st["memory_entries"]
    print(
        f"[{st['mode']} ratio {st['ratio']}] {st['input_tokens']} tokens read in {st['prefill_seconds']:.2f}s, "
        f"{st['decode_tokens']} generated at {st['decode_tokens_per_second']:.1f} tok/s (finish: {st['finish']}) | "
        f"{st['kv_dtype']} K/V peak {st['kv_bytes'] / 2**20:.1f} MiB vs {st['kv_bytes_full'] / 2**20:.1f} MiB full | "
        f"memory sink {m['sink']} + beacon {m['beacon']} + raw {m['raw']} | {time.perf_counter() - t:.1f}s",
        file=sys.stderr,
    )
    if a.stats_json:
        with open(a.stats_json, "w", encoding="utf-8") as f:
            json.dump(st, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
