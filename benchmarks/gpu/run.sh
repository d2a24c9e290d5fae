#!/usr/bin/env bash
# The GPU suite: FP8 kernel parity, host/device overhead of one FP8 linear layer, FP8 linear layers vs
# bf16 (eager and CUDA-graph replay), cast-kernel bandwidth vs copy, a ~1B-parameter Llama trained
# a few steps in bf16 and FP8 from the same weights, the same layers and training pair under torch.compile
# (train.compile), and ZeROCache's device paths (NCCL, pinned-host and NVMe offload, FP8 all-gather): a
# small Llama trained by ZeROCacheOptimizer per stage and tier against torch AdamW, step by step (NVMe
# files under OUTDIR); first, MoE expert GEMMs grouped in bf16 and FP8 against dense (moe_grouped_gemm.py,
# OUTDIR/moe_grouped_gemm.json). Builds nothing, needs no network, finishes within 8 minutes on one H100 (the
# MoE case within 45 s, then every section a time budget under one global deadline, 355 s by default).
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
DRY=()
for arg in "$@"; do
    [[ "$arg" == "--dry-run" ]] && export TRITON_INTERPRET=1 && DRY=(--dry-run)
done
# MoE expert GEMMs, grouped bf16 and FP8 against dense (OUTDIR/moe_grouped_gemm.json), in 45 s of its
# own, which on a GPU the suite's default deadline gives up (400 s -> 355 s; a --budget-s given wins);
# a failure here is reported and costs the suite nothing.
"$PYTHON" "$ROOT/benchmarks/gpu/moe_grouped_gemm.py" "$OUTDIR" ${DRY[@]+"${DRY[@]}"} --budget-s 45 \
    || echo "run.sh: benchmarks/gpu/moe_grouped_gemm.py failed (see above); the suite goes on" >&2
SUITE_BUDGET=(--budget-s 355)
[[ ${#DRY[@]} -gt 0 ]] && SUITE_BUDGET=()
exec "$PYTHON" "$ROOT/benchmarks/gpu/fp8_suite.py" "$OUTDIR" ${SUITE_BUDGET[@]+"${SUITE_BUDGET[@]}"} "$@"
