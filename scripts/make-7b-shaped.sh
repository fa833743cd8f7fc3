#!/bin/sh
# Writes random-weight checkpoints with the exact shapes of the released beacon-qwen-2-7b-instruct:
#   OUT/qwen2-7b-bf16/          Hugging Face directory, bf16, 4 GiB shards, beacon q/k/v inside (~16 GiB)
#   OUT/qwen2-7b-q4_k_m.gguf    Q4_K_M-style GGUF (~4.6 GiB)
# for measuring memory and speed of a 7B-class model without downloading one (docs/BENCHMARKS.md,
# "7B-shaped checkpoints"). The weights are random: the text they produce is noise.
# Not run by CI (it writes ~21 GiB). Usage: scripts/make-7b-shaped.sh OUT [hf|gguf|both] [--layers N]
set -eu
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/make-7b-shaped.sh OUT [hf|gguf|both] [--layers N]}
what=${2:-both}
[ $# -ge 2 ] && shift 2 || shift 1
cargo build --release -p beacon --example synth_checkpoint
bin=target/release/examples/synth_checkpoint
case "$what" in
  both) "$bin" "$out" gguf "$@"; "$bin" "$out" hf "$@" ;;
  hf|gguf) "$bin" "$out" "$what" "$@" ;;
  *) echo "expected hf, gguf or both, found $what" >&2; exit 2 ;;
esac
