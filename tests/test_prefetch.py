"""The background prefetch gives exactly the batches direct loading gives, whatever order steps come in."""

import threading
import time

import pytest
import torch

from angelptm.data import TokenSampler, synthetic_dataset
from angelptm.data.prefetch import Prefetcher


def test_prefetched_batches_equal_direct_loads_in_order_and_after_a_jump():
    sampler = TokenSampler(synthetic_dataset(0), seq_len=16, global_batch=4, seed=3)
    prefetcher = Prefetcher(sampler.batch)
    for step in [0, 1, 2, 7, 8, 3]:  # 7 and 3 are jumps (a resume), the others were prefetched
        assert torch.equal(prefetcher.get(step), sampler.batch(step))


def test_the_next_step_loads_while_this_one_computes():
    loaded, release = [], threading.Event()

    def load(step):
        if step == 1:
            release.wait(10)
        loaded.append((step, threading.current_thread().name))
        return step

    prefetcher = Prefetcher(load)
    assert prefetcher.get(0) == 0
    time.sleep(0.05)
    assert loaded == [(0, threading.current_thread().name)]  # step 1 is blocked in the worker
    release.set()
    assert prefetcher.get(1) == 1 and loaded[1][1].startswith("angelptm-data")


def test_a_failing_load_raises_in_the_caller():
    def load(step):
        if step == 1:
            raise OSError("disk gone")
        return step

    prefetcher = Prefetcher(load)
    prefetcher.get(0)
    with pytest.raises(OSError, match="disk gone"):
        prefetcher.get(1)
