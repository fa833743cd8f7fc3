#!/bin/sh
# Side-by-side benchmark: beacon (all modes) and llama.cpp built from source on the same GGUF and
# thread count. llama.cpp comes from the llama-cpp-python sdist on PyPI (it vendors the full tree),
# built in a temporary directory outside the repository (never committed).
#   scripts/bench.sh [LENGTHS] [MODES]
set -eu
LENGTHS=${1:-2048,4096,8192,16384,32768}
MODES=${2:-full,beacon:2,beacon:4,beacon:8,beacon:16}
LLAMA_DIR=${LLAMA_DIR:-/tmp/beacon-llamacpp}
if [ ! -x "$LLAMA_DIR/bin/llama-bench" ]; then
  mkdir -p "$LLAMA_DIR/src" && cd "$LLAMA_DIR/src"
  python3 -m pip install --quiet cmake ninja
  python3 -m pip download --no-deps --no-binary llama-cpp-python llama-cpp-python -d .
  tar xzf llama_cpp_python-*.tar.gz
  cd llama_cpp_python-*/vendor/llama.cpp
  cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
  cmake --build build -j2 --target llama-bench llama-perplexity
  mkdir -p "$LLAMA_DIR/bin" && cp -a build/bin/* "$LLAMA_DIR/bin/"
  cd - >/dev/null
fi
cd "$(dirname "$0")/.."
cargo build --release -p beacon-cli
mkdir -p results
# llama.cpp's AMX repack path dies with SIGILL in this VM: bench passes --repack 0.
./target/release/beacon bench --lengths "$LENGTHS" --modes "$MODES" --threads 2 --repeats "${REPEATS:-1}" \
  --llama-bench "$LLAMA_DIR/bin/llama-bench" --json results/bench.json --markdown results/bench.md
