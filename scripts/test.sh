#!/bin/sh
# The whole test suite, as `.ci/run` and the README's "Tests" run it:
#   1. cargo test --release --workspace (incl. the parity test against the official implementation);
#   2. the `beacon` binary, for the Python example that talks to `beacon serve`;
#   3. the Python package, built and installed from the repository with pip (PEP 517 through maturin)
#      into a fresh virtual environment with pytest and openai from PyPI, then its pytest suite
#      (crates/beacon-py/tests: parity of the Python-side logits, saved contexts, streaming, errors,
#      Ctrl-C, the default model, examples/python).
# BEACON_VENV sets where the virtual environment goes (default: target/py-venv, recreated each run).
set -eu
cd "$(dirname "$0")/.."
cargo test --release --workspace
cargo build --release -p beacon-cli
target="${CARGO_TARGET_DIR:-target}"
venv="${BEACON_VENV:-$target/py-venv}"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check ./crates/beacon-py pytest openai
BEACON_BIN="$target/release/beacon" "$venv/bin/python" -m pytest -q crates/beacon-py/tests
