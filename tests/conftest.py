"""Shared test helpers: the tiny config, one-line error checks, a one-thread torch, the CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a training step takes milliseconds on one core.
TINY_MODEL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=259, max_seq_len=32)


def tiny_sections(output_dir, **sections) -> dict:
    """The tiny config as a plain dict: synthetic data, no sample, a log line every step, a checkpoint
    at the end; `sections` update it, e.g. `train={"steps": 4}`."""
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"source": "synthetic"},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
        "train": dict(steps=8, global_batch=8, micro_batch=8, seq_len=32, log_every=1, ckpt_every=0,
                      sample_tokens=0, output_dir=str(output_dir)),
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def tiny_config(output_dir, **sections):
    """The tiny config as a validated `Config`."""
    from angelptm.config import config_from_dict

    return config_from_dict(tiny_sections(output_dir, **sections))


def one_line(message: str) -> str:
    """`message`, after checking it is a single non-empty line."""
    assert message.strip(), "empty error message"
    assert "\n" not in message.strip(), f"error is not one line: {message!r}"
    return message.strip()


@pytest.fixture
def one_thread():
    """Run torch on one thread: two threads on two busy cores make tiny models ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def own_process_group():
    """For a test that trains in this process: the process group of one its Trainer made is torn
    down afterwards, so later tests start, as users do, with none."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cli_command(*args) -> tuple[list[str], dict]:
    """argv and environment for `python -m angelptm ARGS` on one thread, outside any torchrun job."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return [sys.executable, "-m", "angelptm", *map(str, args)], env


def start_cli(*args) -> subprocess.Popen:
    """Launch `python -m angelptm ARGS` without waiting; `.communicate()` collects (stdout, stderr)."""
    argv, env = cli_command(*args)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m angelptm ARGS` and return its exit status, stdout and stderr."""
    argv, env = cli_command(*args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
