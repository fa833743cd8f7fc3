#!/bin/bash
# Stage a device run of scripts/train_gpu.py (docs/TRAINING.md "GPU"): writes the two payloads that
# the device tool carries, .dev/p1 (≈ 60 MB) and .dev/p2 (≈ 55 MB), from this machine's default
# model and a Rust run's token cache. A call carries at most 64 MiB *including the working tree*, so
# before the calls move models/ docs/ tests/ assets/ out of the checkout (they are tracked: `git
# checkout -- .` or moving them back restores them) and the tree that travels is ≈ 2 MB.
#   scripts/device/stage.sh [TOKEN_CACHE_DIR]      (default: the first runs/*/token-cache found)
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF=${GGUF:-$HOME/.cache/beacon/SmolLM2-135M-Instruct.Q4_1.gguf}
CACHE=${1:-$(ls -d runs/*/token-cache | head -1)}
[ -f "$GGUF" ] || { echo "error: $GGUF missing (any beacon command fetches it)"; exit 2; }
[ -d "$CACHE" ] || { echo "error: no token cache (run any beacon train once)"; exit 2; }
mkdir -p .git/info .dev/p1 .dev/p2 .dev/tmp
grep -qx "/.dev/" .git/info/exclude 2>/dev/null || echo "/.dev/" >> .git/info/exclude
python3 scripts/train_gpu.py --pack-tokens "$CACHE" --out .dev/tmp/train.u16
python3 scripts/train_gpu.py --pack-score "$CACHE" --out .dev/p2/score.u16
python3 scripts/train_gpu.py --write-tiny-gguf .dev/p1/tiny.gguf
python3 -c "import numpy as np; np.fromfile('.dev/tmp/train.u16', dtype=np.uint16)[:200000].tofile('.dev/p1/tiny.u16')"
cargo run -q --release -p beacon-train --example recall_bank -- .dev/tmp/facts 20000
python3 -m pip download -q --no-deps --only-binary=:all: -d .dev/tmp gguf==0.19.0
xz -T0 -6 -c "$GGUF" > .dev/tmp/model.gguf.xz
xz -T0 -6 -c .dev/tmp/train.u16 > .dev/p2/train.u16.xz
split -b 56000000 -d .dev/tmp/model.gguf.xz .dev/tmp/model.gguf.xz.part
mv .dev/tmp/model.gguf.xz.part00 .dev/p1/ && mv .dev/tmp/model.gguf.xz.part01 .dev/p2/
for p in p1 p2; do cp .dev/tmp/facts.json .dev/tmp/facts.u16 .dev/tmp/gguf-*.whl .dev/$p/; done
(cd .dev/tmp && ln -sf "$GGUF" model.gguf && sha256sum model.gguf train.u16) > .dev/p2/SHA256SUMS
du -sh .dev/p1 .dev/p2
