#!/usr/bin/env bash
# vLLM parity of an `mmembed export --to hf` folder on an accelerator machine (docs/export.md, "vLLM").
#
#   bash tools/gpu/vllm_check.sh                      # a tiny text-only Qwen2 built here, exported, checked
#   bash tools/gpu/vllm_check.sh MODEL_DIR            # an mmembed model directory: exported, then checked
#   DTYPE=float32 bash tools/gpu/vllm_check.sh        # vLLM's dtype (default bfloat16; float32 needs a backend
#                                                     # that takes fp32 attention)
#
# Needs a Python with vLLM (CUDA build) and torch; mmembed itself is imported from this checkout (its other needs:
# omegaconf, safetensors, transformers; see tools/gpu/bench.sh for carrying wheels). The export runs in fp32; the
# reference is mmembed's encode (fp32, on the GPU through transformers when mmembed cannot load there); vLLM runs in
# $DTYPE, so the default tolerance is tools/vllm_check.py's bf16 one (max abs diff 5e-2, cosine >= 0.99: a loose
# guard for bf16 kernels, not a measured figure).
# Exit codes: 0 parity, 1 a row above the tolerance, 2 a bad model / export, 3 `import vllm` failed (the
# accelerator machine of this project's sessions has no vLLM, and its wheel is larger than what can be carried).
# Figures: $OUT/vllm_check.json (or ./vllm_check.json) and stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import vllm" 2>/dev/null; then
  echo "vllm_check.sh: vLLM is not installed for $PY (\`import vllm\` failed): pip install vllm, or set PYTHON" >&2
  exit 3
fi
out="${OUT:-.}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 PYTHONPATH=.
model="${1:-}"
if [ -z "$model" ]; then
  # the tiny recipe without vision: a 2-layer Qwen2 with head_dim 64 (vLLM's attention backends need >= 32)
  "$PY" - "$work/model" <<'EOF'
import sys

import torch

import mmembed

torch.manual_seed(0)
over = [
    "model.vision=null", "model.connector=null", "model.backbone.config.hidden_size=128",
    "model.backbone.config.num_attention_heads=2", "model.backbone.config.num_key_value_heads=1",
    "model.backbone.config.intermediate_size=256",
    "model.prompts={query: 'Represent the given input.', document: 'A document.'}",
]
mmembed.build_model("recipes/tiny/composed.yaml", over).eval().save(sys.argv[1])
EOF
  model="$work/model"
fi
"$PY" -m mmembed.export.cli "$model" "$work/export" --to hf || exit 2
set +e
"$PY" tools/vllm_check.py "$work/export" --model-dir "$model" --dtype "${DTYPE:-bfloat16}" \
  --json "$out/vllm_check.json" ${TOL:+--tol "$TOL"}
rc=$?
set -e
echo "vllm_check.sh: exit $rc; figures in $out/vllm_check.json"
exit $rc
