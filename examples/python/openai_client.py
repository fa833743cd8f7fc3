#!/usr/bin/env python3
"""Talk to `beacon serve` with the official `openai` Python client: one answer, then one streamed.

    beacon serve --port 8080 &                     # or: cargo run --release -p beacon-cli -- serve
    pip install openai
    python examples/python/openai_client.py --base-url http://127.0.0.1:8080/v1

The server keeps each conversation's beacon memory, so the second turn (which repeats the first) only
reads what is new.
"""

from __future__ import annotations

import argparse
import sys

from openai import OpenAI


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--question", default="What is the capital of France? Answer in one word.")
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()

    client = OpenAI(base_url=a.base_url, api_key="not-needed")
    model = client.models.list().data[0].id
    print(f"model: {model}")

    messages = [{"role": "user", "content": a.question}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=a.max_tokens, temperature=0)
    answer = r.choices[0].message.content
    print(f"answer: {answer}")
    print(f"usage: {r.usage.prompt_tokens} prompt + {r.usage.completion_tokens} completion tokens")

    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    print("streamed: ", end="", flush=True)
    pieces = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=a.max_tokens, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    if not answer or not "".join(pieces):
        print("error: empty answer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
