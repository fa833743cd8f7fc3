#!/bin/bash
# Device call 1 (carry .dev/p1): stage the first half of the model in /tmp/w (kept while the machine
# stays warm, 30 s between calls), install gguf, and smoke-test the trainer on the GPU with a tiny
# random model (CUDA-only failures show here, before the real run).
set -u
mkdir -p /tmp/w /tmp/site
cp .dev/p1/model.gguf.xz.part00 .dev/p1/facts.json .dev/p1/facts.u16 /tmp/w/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/p1/gguf-*.whl
PYTHONPATH=/tmp/site python3 -c "import torch, gguf, safetensors; print(torch.__version__, torch.cuda.get_device_name())"
ls /tmp/w
PYTHONPATH=/tmp/site timeout 120 python3 scripts/train_gpu.py --gguf .dev/p1/tiny.gguf --tokens .dev/p1/tiny.u16 \
  --out /tmp/smoke --seq-lens 2048,4096 --tokens-per-step 16384 --max-steps 4 --recall-mix 0.25 \
  --recall-bank /tmp/w/facts --parts 2 --deadline-s 100 --print-every 1 2>&1 | grep -v -i warn | tail -6
