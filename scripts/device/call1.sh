#!/bin/bash
# Device call 1 (carry .dev/p1): stage the first half of the model in /tmp/w (kept while the machine
# stays warm, 30 s between calls), install gguf, and check that torch sees the GPU.
set -u
mkdir -p /tmp/w /tmp/site
cp .dev/p1/model.gguf.xz.part00 .dev/p1/facts.json .dev/p1/facts.u16 /tmp/w/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/p1/gguf-*.whl
PYTHONPATH=/tmp/site python3 -c "import torch, gguf, safetensors; print(torch.__version__, torch.cuda.get_device_name())"
ls /tmp/w
