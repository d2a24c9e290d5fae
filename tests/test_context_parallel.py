"""Context parallelism: the balanced ring sharding, the block attention with its log-sum-exp and exact
backward, and ring / Ulysses attention over 2 and 4 ranks against plain causal attention on the whole
sequence, forward and backward, with grouped-query heads."""

import pytest
import torch
import torch.nn.functional as F

from angelptm.distributed.collectives import group_of
from angelptm.distributed.context_parallel import (
    RingAttention,
    UlyssesAttention,
    attend_block,
    attend_block_backward,
    local_positions,
    shard_sequence,
)
from angelptm.distributed.mesh import ParallelDims, init
from angelptm.distributed.spawn import run_distributed


def test_ring_positions_balance_causal_work():
    assert local_positions(8, 0, 2, "ring").tolist() == [0, 1, 6, 7]
    assert local_positions(8, 1, 2, "ring").tolist() == [2, 3, 4, 5]
    held = torch.cat([local_positions(32, r, 4, "ring") for r in range(4)])
    assert sorted(held.tolist()) == list(range(32))
    # Causal work of a rank ~ the sum of its positions + 1: equal on every rank.
    work = {sum(p + 1 for p in local_positions(32, r, 4, "ring").tolist()) for r in range(4)}
    assert len(work) == 1


def test_ulysses_positions_are_contiguous():
    assert local_positions(8, 1, 4, "ulysses").tolist() == [2, 3]


def _qkv(batch=2, heads=4, kv_heads=2, q_len=6, k_len=6, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, dim, generator=gen), torch.randn(batch, kv_heads, k_len, dim, generator=gen),
            torch.randn(batch, kv_heads, k_len, dim, generator=gen))


@pytest.mark.parametrize("causal, q_len, k_len", [(True, 6, 6), (False, 3, 6)])
def test_block_attention_and_its_backward_match_autograd(causal, q_len, k_len):
    q, k, v = (t.requires_grad_() for t in _qkv(q_len=q_len, k_len=k_len))
    out, lse = attend_block(q, k, v, causal)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) / 8 ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(q_len, k_len, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-6)

    grad_out = torch.randn_like(reference)
    reference.backward(grad_out)
    delta = (grad_out * out.detach()).sum(-1)
    grads = attend_block_backward(q.detach(), k.detach(), v.detach(), grad_out, lse.detach(), delta, causal)
    for ours, theirs in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _check_attention(world: int):
    """Every (cp, mode, kv_heads) case this world can host: errors of output and q/k/v gradients."""
    errors = {}
    for cp in (2, 4):
        mesh = init(ParallelDims(dp=world // cp, cp=cp))
        g = group_of(mesh, "cp")
        for mode, kv_heads in (("ring", 2), ("ring", 4), ("ulysses", 2), ("ulysses", 1)):
            seq = 16
            q, k, v = _qkv(heads=4, kv_heads=kv_heads, q_len=seq, k_len=seq, seed=cp)
            grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            reference = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=kv_heads != 4)
            reference.backward(grad_out)
            local = [shard_sequence(t, g, mode, dim=2).requires_grad_() for t in (q, k, v)]
            core = RingAttention(g) if mode == "ring" else UlyssesAttention(g)
            out = core(*local)
            out.backward(shard_sequence(grad_out, g, mode, dim=2))
            errors[(cp, mode, kv_heads)] = max(
                [(out - shard_sequence(reference, g, mode, dim=2)).abs().max().item()]
                + [(t.grad - shard_sequence(f.grad, g, mode, dim=2)).abs().max().item() for t, f in zip(local, full)]
            )
    return errors


@pytest.mark.slow
def test_ring_and_ulysses_attention_match_full_causal_attention():
    for rank, errors in enumerate(run_distributed(_check_attention, 4, 4)):
        assert len(errors) == 8
        for case, error in errors.items():
            assert error < 1e-5, f"rank {rank} {case}: {error}"
