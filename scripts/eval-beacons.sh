#!/bin/sh
# Score beacon weights against the equal-memory baselines on held-out books (docs/TRAINING.md,
# "Recipe search"). The first weights file also runs the baselines (full, window-only, truncate and
# streaming at each ratio's K/V); the others run beacon only (the baselines do not depend on weights).
#
#   scripts/eval-beacons.sh OUT_DIR LENGTHS WEIGHTS.safetensors [WEIGHTS.safetensors ...]
#   e.g. scripts/eval-beacons.sh results/recipe 4096,16384 models/smollm2-135m-instruct/beacon.safetensors runs/A/beacon.safetensors
#
# Texts: BEACON_EVAL_TEXTS (default: pg28054, a held-out book the trainer never reads); places read
# per text: BEACON_EVAL_SPANS (default 1 = the text's start; `eval ppl --spans`).
set -eu
out=$1
lengths=$2
shift 2
texts=${BEACON_EVAL_TEXTS:-../shared/data/books/pg28054.txt}
beacon=${BEACON_BIN:-target/release/beacon}
first=1
for w in "$@"; do
    name=$(basename "$(dirname "$w")")
    if [ "$first" = 1 ]; then
        modes=full,window-only,truncate,streaming,beacon
        first=0
    else
        modes=beacon
    fi
    # shellcheck disable=SC2086
    $beacon eval ppl --seed 42 --text $texts --spans "${BEACON_EVAL_SPANS:-1}" --lengths "$lengths" --modes "$modes" \
        --ratios 4,8,32 --beacon "$w" --out "$out/$name"
done
