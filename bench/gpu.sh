#!/usr/bin/env bash
# Run the MoE/AoE benchmark on one CUDA GPU and write docs/performance-gpu.md (or the path in $1).
# Needs a CUDA build of torch in the environment, because the pinned CPU build of `make install`
# finds no GPU.
# The GPU plan (paper-sized token batches, bf16 grouped GEMMs) is sized by estimate, never run:
# no GPU was available when it was written. The timeout stops it at 5 minutes either way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUTPUT=${1:-docs/performance-gpu.md}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
timeout 300 "$PYTHON" -m aoe.cli bench --device cuda --output "$OUTPUT"
