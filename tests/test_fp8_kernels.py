"""FP8 Triton kernels match their torch references bit for bit (Triton CPU interpreter), and dispatch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from angelptm.errors import UserError
from angelptm.fp8 import kernels

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    script = Path(__file__).with_name("fp8_kernel_checks.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_kernel_matches_its_reference_bit_for_bit(interpreter_results):
    assert len(interpreter_results) > 100
    failures = {name: why for name, why in interpreter_results.items() if why != "ok"}
    assert not failures, failures


def test_cpu_tensors_use_the_references_unless_asked():
    assert not kernels.use_triton(torch.zeros(1))
    assert not kernels.use_triton(torch.zeros(1), backend="torch")
    assert kernels.use_triton(torch.zeros(1), backend="triton")
    with pytest.raises(UserError, match="ANGELPTM_FP8_BACKEND"):
        kernels.use_triton(torch.zeros(1), backend="cuda")
