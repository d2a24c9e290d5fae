#!/usr/bin/env bash
# The GPU suite: FP8 kernel parity, host/device overhead of one FP8 linear layer, FP8 linear layers vs
# bf16 (eager and CUDA-graph replay), cast-kernel bandwidth vs copy, a ~1B-parameter Llama trained
# a few steps in bf16 and FP8 from the same weights, the same layers and training pair under torch.compile
# (train.compile), and ZeROCache's device paths (NCCL, pinned-host and NVMe offload, FP8 all-gather): a
# small Llama trained by ZeROCacheOptimizer per stage and tier against torch AdamW, step by step (NVMe
# files under OUTDIR). Builds nothing, needs no network, finishes within 8 minutes on one H100 (every
# section has a time budget under one global deadline, 400 s by default).
# Prints a short table last and writes the full results to OUTDIR/fp8_suite.json.
#
#   benchmarks/gpu/run.sh OUTDIR            # on a machine with a CUDA GPU
#   benchmarks/gpu/run.sh OUTDIR --dry-run  # the whole path on CPU with tiny shapes
#   PYTHON=/path/to/python benchmarks/gpu/run.sh OUTDIR   # another interpreter than the default
#
# The interpreter is $PYTHON, else the project's .venv one (what scripts/install.py makes), else the
# python3 of the PATH.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: benchmarks/gpu/run.sh OUTDIR [--dry-run] [--budget-s SECONDS]" >&2
    exit 2
fi
OUTDIR=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUTDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
fi
# Nothing is installed here: fail in one line, before any work, if the interpreter lacks a module.
"$PYTHON" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "yaml") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"run.sh: {sys.executable} lacks {', '.join(missing)}; the suite installs nothing "
             "(set PYTHON to an interpreter that has them, or run scripts/install.py)")
PY
# The dry run holds the Triton kernels to their references under the interpreter (set before import).
for arg in "$@"; do
    [[ "$arg" == "--dry-run" ]] && export TRITON_INTERPRET=1
done
exec "$PYTHON" "$ROOT/benchmarks/gpu/fp8_suite.py" "$OUTDIR" "$@"
