#!/usr/bin/env bash
# The GPU run (tools/gpu/bench.py), on the accelerator machine: it has torch, transformers, timm, peft, accelerate and
# safetensors but no network; mmembed's other needs come as wheels carried in tools/gpu/wheels/ (fetch them here with
#   pip download -d tools/gpu/wheels omegaconf antlr4-python3-runtime open-clip-torch ftfy wcwidth pyarrow
# and pass `carry: ["tools/gpu/wheels"]`). Under 8 minutes on an H100/H200. Figures: bench_gpu.json and stdout.
#   bash tools/gpu/bench.sh             # the full run (needs CUDA)
#   bash tools/gpu/bench.sh --dry-run   # tiny model on CPU (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import omegaconf, open_clip, pyarrow" 2>/dev/null; then
  if compgen -G "tools/gpu/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps tools/gpu/wheels/*.whl
  else
    echo "missing omegaconf/open_clip/pyarrow and no wheels in tools/gpu/wheels (see this script's header)" >&2
    exit 2
  fi
fi
out="${OUT:-.}"
HF_HUB_OFFLINE=1 PYTHONPATH=. "$PY" tools/gpu/bench.py --out "$out/bench_gpu.json" "$@"
