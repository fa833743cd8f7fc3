"""The example scripts of examples/python, run as a user would: reading a long file through beacons
(default model), and the official `openai` client against a `beacon serve` this test starts and stops
by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, beacon_binary

EXAMPLES = REPO / "examples" / "python"


def test_read_long_file(tmp_path):
    stats = tmp_path / "stats.json"
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "read_long_file.py"), "-f", str(REPO / "data" / "books" / "pg1342.txt"),
         "--max-file-tokens", "3000", "--ratio", "8", "-n", "24",
         "-q", "Who is the author of this book? Answer briefly.", "--stats-json", str(stats)],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    st = json.loads(stats.read_text())
    assert st["mode"] == "beacon" and st["ratio"] == "8" and st["input_tokens"] > 3000
    assert st["memory_entries"]["beacon"] > 0 and st["kv_bytes"] < st["kv_bytes_full"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server():
    exe = beacon_binary()
    if not exe.exists():
        pytest.fail(f"{exe} is missing: build it with `cargo build --release -p beacon-cli`")
    port = _free_port()
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pid = proc.pid
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"beacon serve exited: {proc.stderr.read().decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("beacon serve did not become healthy in 300 s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            proc.wait()


def test_openai_client_against_beacon_serve(server):
    pytest.importorskip("openai")
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "openai_client.py"), "--base-url", server, "--max-tokens", "24"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "answer: " in r.stdout and "streamed: " in r.stdout
    assert "Paris" in r.stdout
