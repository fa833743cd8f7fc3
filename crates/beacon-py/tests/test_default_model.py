"""The default model (SmolLM2-135M-Instruct with the shipped beacons, fetched on first use as the CLI
does): answering, streaming, Ctrl-C, and the CLI's messages for bad flags."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

import beacon
from conftest import REPO, beacon_binary

BOOK = REPO / "data" / "books" / "pg1342.txt"


def test_answers_a_short_prompt(default_model):
    answer = default_model.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}], max_tokens=16
    )
    assert "Paris" in answer


def test_streaming_gives_the_same_text(default_model):
    s1 = default_model.session()
    whole = s1.generate("The capital of France is", max_tokens=12)
    s2 = default_model.session()
    it = s2.generate("The capital of France is", max_tokens=12, stream=True)
    # Busy while streaming.
    with pytest.raises(ValueError, match="busy"):
        s2.feed("more")
    pieces = list(it)
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert s1.stats()["finish"] == s2.stats()["finish"] == "length"
    assert s1.tokens == s2.tokens
    assert s2.stats()["decode_tokens"] == 12
    # The session holds the answer and goes on from it.
    assert default_model.detokenize(s2.tokens).endswith(whole)
    assert s2.logits().shape == (default_model.vocab_size,)


def test_stop_strings_and_closing_a_stream(default_model):
    s = default_model.session()
    text = s.generate("One, two, three, four, five,", max_tokens=32, stop=[" eight"])
    assert "eight" not in text and s.stats()["finish"] == "stop"
    s = default_model.session()
    it = s.generate("Once upon a time", max_tokens=200, stream=True)
    next(it)
    it.close()
    assert s.stats()["decode_tokens"] < 200
    s.generate(" and", max_tokens=2)  # usable again


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C as an interactive Python has it. A runner started in the background by a shell without
    job control (`cmd &`, nohup) inherits SIGINT ignored, and Python then leaves it ignored: the
    tests below would wait for a KeyboardInterrupt that never comes."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _interrupt_after(seconds: float) -> threading.Timer:
    t = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    t.start()
    return t


def test_ctrl_c_interrupts_a_long_feed(default_model, ctrl_c_raises):
    text = BOOK.read_text(encoding="utf-8")[:60000]
    ids = default_model.tokenize(text)
    s = default_model.session(ratio=8)
    t0 = time.perf_counter()
    _interrupt_after(0.5)
    with pytest.raises(KeyboardInterrupt):
        s.feed(ids)
    assert time.perf_counter() - t0 < 30
    read = len(s)
    assert 0 < read < len(ids) and read % 512 == 0  # whole windows
    # The session is consistent: reading on gives the next-token logits.
    s.feed(ids[read : read + 10])
    assert s.logits().shape == (default_model.vocab_size,)


def test_ctrl_c_interrupts_generation(default_model, ctrl_c_raises):
    s = default_model.session()
    s.feed("Once upon a time")
    _interrupt_after(0.5)
    with pytest.raises(KeyboardInterrupt):
        s.generate(max_tokens=100000)
    n = s.stats()["decode_tokens"]
    assert 0 < n < 100000 and s.stats()["finish"] == "cancelled"
    _interrupt_after(0.5)
    with pytest.raises(KeyboardInterrupt):
        for _ in s.generate(" Then", max_tokens=100000, stream=True):
            pass
    s.generate(" The end.", max_tokens=2)


def test_cli_and_python_agree_on_bad_flags(default_model):
    exe = beacon_binary()
    with pytest.raises(ValueError) as e:
        default_model.session(ratio="sometimes")
    if not exe.exists():
        pytest.skip(f"{exe} not built")
    r = subprocess.run([str(exe), "run", "-p", "hi", "--ratio", "sometimes", "-n", "1"], capture_output=True, text=True)
    assert r.returncode != 0 and str(e.value) in r.stderr, r.stderr


def test_train_wrapper_and_its_weights(tmp_path, ctrl_c_raises):
    data = tmp_path / "data"
    data.mkdir()
    text = BOOK.read_text(encoding="utf-8")
    (data / "a.txt").write_text(text[:6000], encoding="utf-8")
    (data / "b.txt").write_text(text[6000:9000], encoding="utf-8")
    r = beacon.train(data=[data], heldout=["b"], out=tmp_path / "run", steps=1, seq_len=128, window=64,
                     eval_every=1, eval_samples=1, threads=1)
    assert os.path.exists(r["beacon"]) and os.path.exists(r["beacon_config"])
    assert any("loss" in m for m in r["metrics"]) and any("heldout_loss" in m for m in r["metrics"])
    m = beacon.Model.load(beacon=r["beacon"], beacon_config=r["beacon_config"])
    assert m.beacon_source == r["beacon"] and m.beacon_config["window"] == 64
    with pytest.raises(ValueError, match="--no-such-flag"):
        beacon.train(no_such_flag=True)
    # Python's own Ctrl-C handling is back after the trainer's handler.
    _interrupt_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        time.sleep(5)
