#!/bin/bash
# Device call 2 (carry .dev/p2), right after call 1: join and check the model and the tokens, then
# train one run (ARGS, added to scripts/train_gpu.py's) until DL seconds, scoring it every minute;
# the best-scoring weights come back as $OUT/run/beacon.part*.safetensors (join: train_gpu.py --merge).
#   DL=480 ARGS="--lr 5e-4 --recall-mix 0.25" bash scripts/device/call2.sh
set -u
T0=$(date +%s)
export PYTHONPATH=/tmp/site
[ -f /tmp/w/model.gguf.xz.part00 ] || { echo "error: call 1's half of the model is gone (machine not warm)"; exit 3; }
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/p2/gguf-*.whl
cat /tmp/w/model.gguf.xz.part00 .dev/p2/model.gguf.xz.part01 | xz -d -T0 > /tmp/w/model.gguf &
xz -d -T0 -c .dev/p2/train.u16.xz > /tmp/w/train.u16 &
wait
(cd /tmp/w && sha256sum -c "$OLDPWD/.dev/p2/SHA256SUMS") || { echo "error: checksum"; exit 3; }
python3 scripts/train_gpu.py --gguf /tmp/w/model.gguf --tokens /tmp/w/train.u16 --recall-bank .dev/p2/facts \
  --seq-lens 8192 --tokens-per-step 65536 --memory-fraction 0.92 --save-every-s 60 --print-every 20 \
  --score-tokens .dev/p2/score.u16 --deadline-s "${DL:-480}" --out "$OUT/run" ${ARGS:-} 2>&1 | grep -v -i warn | tail -12
echo "call 2 done in $(( $(date +%s) - T0 )) s"
