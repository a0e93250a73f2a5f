#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (run from the repository root on a machine with one):
#   1. tests/cuda: a probed training loop under torch.cuda.set_sync_debug_mode("error") (no host
#      synchronisation caused by sonde), and CUDA values against the CPU computation;
#   2. the overhead benchmark on the GPU: GPT-2 small (built from transformers' GPT2Config(), batch 32 x 128
#      tokens, bf16 autocast) and the 4x1024 MLP; the mean step-time ratio of the default (budgeted) probe and of
#      every=1 against the unmonitored loop, and the host synchronisations per step that sonde adds (a few minutes
#      on an H200). Arguments to this script are passed on to benchmarks/overhead.py and override these.
# Put the figures, with the GPU's name, in benchmarks/RESULTS.md ("On a CUDA GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" - <<'PY' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch.cuda.is_available() is False: no CUDA GPU here")
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
status=0
"$PYTHON" -m pytest -q -rs tests/cuda -p no:cacheprovider || status=1
if "$PYTHON" benchmarks/overhead.py --help 2>/dev/null | grep -q -- "--device"; then
    "$PYTHON" benchmarks/overhead.py --device cuda --no-peers --models gpt2 mlp --variants sonde "sonde every=1" \
        --steps 100 --rounds 3 --sync-steps 30 "$@" || status=1
else
    echo "gpu_check: benchmarks/overhead.py has no --device option: GPU overhead not measured"
fi
exit $status
