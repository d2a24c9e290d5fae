"""zerocache.adamw: both kernels reproduce torch.optim.AdamW, and one that cannot compile leaves
the update on torch's fused kernel."""

import logging
import shutil

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from angelptm.zerocache import adamw
from angelptm.zerocache.adamw import COMPILED_MIN_NUMEL, adamw_
from angelptm.zerocache.buffers import slab_numel, slab_segments
from angelptm.zerocache.tiers import host_empty

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 4
SMALL = 1000  # below the threshold: torch's fused kernel
LARGE = COMPILED_MIN_NUMEL + 37  # above it, and a tail shorter than a vector
TOLERANCE = 1e-6
HAS_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference(param: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """[param, exp_avg, exp_avg_sq] after torch.optim.AdamW's steps on `grads`."""
    p = torch.nn.Parameter(param.clone())
    opt = torch.optim.AdamW([p], **HYPER)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return [p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]


def shard_state(numel: int, layout: str) -> list[torch.Tensor]:
    """[param, exp_avg, exp_avg_sq], zeroed: views of one ZeROCache slab or three tensors."""
    if layout == "slab":
        exp_avg, exp_avg_sq, master = slab_segments(host_empty(slab_numel(numel, True), torch.float32, False), numel)
        state = [master, exp_avg, exp_avg_sq]
    else:
        state = [torch.empty(numel) for _ in range(3)]
    for t in state:
        t.zero_()
    return state


def train(numels: list[int], layout: str, scale, seed: int = 0):
    """STEPS calls of adamw_ over one shard of each size; returns the shards' start, state after,
    raw gradients and the gradients as adamw_ left them."""
    gen = torch.Generator().manual_seed(seed)
    starts = [torch.randn(n, generator=gen) for n in numels]
    raw = [[torch.randn(n, generator=gen) * (1 + s) for n in numels] for s in range(STEPS)]
    states = [shard_state(n, layout) for n in numels]
    for p, start in zip((s[0] for s in states), starts):
        p.copy_(start)
    step = torch.zeros(())
    left = []
    for grads in raw:
        grads = [g.clone() for g in grads]
        step += 1
        adamw_([s[0] for s in states], grads, [s[1] for s in states], [s[2] for s in states], step,
               grad_scale=None if scale is None else torch.tensor(scale), **HYPER)
        left.append(grads)
    return starts, states, raw, left


@pytest.mark.parametrize("layout", ["slab", "separate"])
@pytest.mark.parametrize("scale", [None, 4.0])
def test_matches_torch_adamw_over_steps(layout, scale):
    if scale is not None and not HAS_CXX:
        pytest.skip("no C++ compiler: the compiled kernel cannot be built here")
    starts, states, raw, left = train([SMALL, LARGE], layout, scale)
    for i, start in enumerate(starts):
        divided = [grads[i] if scale is None else grads[i] / scale for grads in raw]
        for name, got, want in zip(("param", "exp_avg", "exp_avg_sq"), states[i], reference(start, divided)):
            assert relative_difference(got, want) < TOLERANCE, (layout, scale, i, name)
    if scale is not None:
        assert adamw._compiled.fn is not None and not adamw._compiled.failed
        # the compiled kernel reads the large shard's gradients only: 28 bytes per element
        assert all(torch.equal(after[1], before[1]) for after, before in zip(left, raw))


def test_kernel_that_cannot_compile_falls_back_to_torch_fused_once(monkeypatch, caplog):
    monkeypatch.setattr(adamw, "_compiled", adamw._CompiledUpdate())
    torch._dynamo.reset()  # else the kernel compiled by the tests above would be reused
    try:
        with (torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/c++")}),
              caplog.at_level(logging.WARNING, logger=adamw.__name__)):
            starts, states, raw, _ = train([LARGE], "slab", 4.0)
    finally:
        torch._dynamo.reset()
    assert adamw._compiled.failed
    warnings = [r for r in caplog.records if r.name == adamw.__name__]
    assert len(warnings) == 1 and "torch._fused_adamw_" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    for got, want in zip(states[0], reference(starts[0], [grads[0] / 4.0 for grads in raw])):
        assert relative_difference(got, want) < TOLERANCE
