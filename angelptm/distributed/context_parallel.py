"""Context parallelism: causal attention over a sequence split across the cp group (ring or Ulysses).

Every layer outside attention is position-wise, so it runs unchanged on a rank's share of the
sequence; only the attention core (`block.attention.core`) is replaced.

Ring attention (cp_mode=ring). The sequence is cut into 2·cp chunks and rank i holds chunks i and
2·cp−1−i: under the causal mask the early chunk has little to attend to and the late one a lot, so
every rank does the same work. The ranks pass their K/V blocks round the ring; at step t rank i
attends to the block of rank j = i − t (mod cp), and the causal mask reduces to one of three
shapes: j = i, causal within the local chunks; j < i, both local chunks see j's early chunk
in full; j > i, only the late local chunk sees j's whole block. The partial results are merged by
their log-sum-exp (online softmax). The next block's transfer is started before the current
block's compute and awaited after it, so communication hides behind computation. The backward
pass recomputes each block's probabilities from the saved log-sum-exp (nothing quadratic is
kept) and sends the K/V gradients round the ring with their blocks; the last hop brings each
home. It is exact: it computes the gradient of the same function, not an approximation.

Packed rows (several documents per row, `doc_ids`) make it the varlen ring: each block's mask is
also "same document", from the doc ids of its queries and of its keys. Doc ids are a few bytes
per token, so each rank gathers every rank's once per call instead of sending them round with
each K/V block. A query whose document has no key in a block gets nothing from it (output 0,
log-sum-exp -inf), which the merge weighs as zero; every query sees itself in the first
(diagonal) block, so the merged log-sum-exp is always finite.

Ulysses (cp_mode=ulysses). Rank i holds the i-th contiguous slice of the sequence. An all-to-all
trades it for all of the sequence on a cp-th of the heads, plain causal attention runs locally,
and a second all-to-all trades back. It needs the heads per rank to divide by cp; kv heads that
do not divide are repeated up to the query heads first. Packed rows gather their doc ids over cp,
so the local attention masks by document over the whole sequence.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from angelptm.distributed.collectives import Group, all_gather, all_to_all_region, ring_shift
from angelptm.models.llama import visible_keys

_KV_TAG, _GRAD_TAG = 0, 1  # the two ring shifts that are in flight together in the backward pass


def local_positions(seq_len: int, rank: int, cp: int, mode: str, device=None) -> torch.Tensor:
    """Absolute positions of the tokens rank `rank` of `cp` holds in a sequence of `seq_len`, in order."""
    if mode == "ring":
        chunk = seq_len // (2 * cp)
        late = 2 * cp - 1 - rank
        return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk, device=device),
                          torch.arange(late * chunk, (late + 1) * chunk, device=device)])
    chunk = seq_len // cp
    return torch.arange(rank * chunk, (rank + 1) * chunk, device=device)


def shard_sequence(x: torch.Tensor, group: Group, mode: str, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of `x` along `dim` (tokens, targets, or anything laid out like them)."""
    if group.size == 1:
        return x
    return x.index_select(dim, local_positions(x.shape[dim], group.rank, group.size, mode, x.device))


# ---------------------------------------------------------------------------------------------
# One block of attention, with its log-sum-exp, and its exact backward


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, S, D) queries -> (B, kv_heads, H / kv_heads, S, D), so each group meets its kv head."""
    b, h, s, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, s, d)


Docs = Optional[tuple[torch.Tensor, torch.Tensor]]  # doc ids of a block's queries (B, Sq) and keys (B, Sk)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, docs: Docs) -> torch.Tensor:
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q, k) / math.sqrt(q.shape[-1])
    if causal:  # only for the diagonal block, where query and key positions line up
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if docs is not None:
        query_docs, key_docs = docs
        other_document = query_docs[:, :, None] != key_docs[:, None, :]
        scores = scores.masked_fill(other_document[:, None, None], float("-inf"))
    return scores


def _exponent_base(lse: torch.Tensor) -> torch.Tensor:
    """`lse` with -inf (a query that sees no key) as 0, so exp(-inf - base) is 0 rather than NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def attend_block(q, k, v, causal: bool, docs: Docs = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (B, H, Sq, D) over k, v (B, Hkv, Sk, D): output and log-sum-exp, fp32.

    `docs` (the doc ids of the queries and of the keys) also hide keys of other documents; a query
    that sees no key at all gets output 0 and log-sum-exp -inf.
    """
    qg = _grouped(q.float(), k.shape[1])
    scores = _scores(qg, k.float(), causal, docs)
    lse = scores.logsumexp(dim=-1)
    out = torch.einsum("bhgqk,bhkd->bhgqd", (scores - _exponent_base(lse)[..., None]).exp(), v.float())
    return out.flatten(1, 2), lse.flatten(1, 2)


def attend_block_backward(q, k, v, grad_out, lse, delta, causal: bool, docs: Docs = None):
    """Gradients of one block given the final log-sum-exp `lse` and delta = rowsum(grad_out · out)."""
    kv_heads = k.shape[1]
    qg, grad_g = _grouped(q.float(), kv_heads), _grouped(grad_out, kv_heads)
    k, v = k.float(), v.float()
    probs = (_scores(qg, k, causal, docs) - _grouped(lse[..., None], kv_heads)).exp()
    grad_v = torch.einsum("bhgqk,bhgqd->bhkd", probs, grad_g)
    grad_probs = torch.einsum("bhgqd,bhkd->bhgqk", grad_g, v)
    grad_scores = probs * (grad_probs - _grouped(delta[..., None], kv_heads)) / math.sqrt(q.shape[-1])
    grad_q = torch.einsum("bhgqk,bhkd->bhgqd", grad_scores, k).flatten(1, 2)
    grad_k = torch.einsum("bhgqk,bhgqd->bhkd", grad_scores, qg)
    return grad_q, grad_k, grad_v


def _merge(out, lse, block_out, block_lse) -> None:
    """Fold a block's normalised output into the running one, in place, by their log-sum-exps."""
    new_lse = torch.logaddexp(lse, block_lse)
    base = _exponent_base(new_lse)
    out.mul_((lse - base).exp()[..., None]).add_(block_out * (block_lse - base).exp()[..., None])
    lse.copy_(new_lse)


# ---------------------------------------------------------------------------------------------
# Ring attention


def _ring_block(rank: int, step: int, cp: int, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key/value columns, causal) of the block to compute at ring step `step`.

    At that step this rank holds the K/V of rank `source`; half is the length of one chunk.
    """
    source = (rank - step) % cp
    everything = slice(None)
    if source == rank:
        return everything, everything, True
    if source < rank:  # both local chunks come after the source's early chunk and before its late one
        return everything, slice(0, half), False
    return slice(half, None), everything, False  # only our late chunk follows the source's block


def _block_docs(doc_ids: Optional[torch.Tensor], every_rank_docs: Optional[torch.Tensor], source: int,
                rows: slice, cols: slice) -> Docs:
    """The doc ids of a block's queries (ours) and keys (those of rank `source`), if rows are packed."""
    if doc_ids is None:
        return None
    return doc_ids[:, rows], every_rank_docs[source][:, cols]


def _gather_docs(doc_ids: Optional[torch.Tensor], group: Group) -> Optional[torch.Tensor]:
    """Every rank's doc ids, (cp, B, S/cp) in rank order; None for unpacked rows."""
    return None if doc_ids is None else all_gather(doc_ids[None], 0, group)


def _full_precision(fn):
    """Run a ring pass with autocast off: the blocks and their merge accumulate in float32 by design."""
    def wrapped(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(ctx, *args)
    return wrapped


class _RingAttention(torch.autograd.Function):
    @staticmethod
    @_full_precision
    def forward(ctx, q, k, v, doc_ids, group):
        cp, rank, half = group.size, group.rank, q.shape[2] // 2
        every_rank_docs = _gather_docs(doc_ids, group)
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(cp):
            pending = ring_shift(kv, group, _KV_TAG) if step + 1 < cp else None
            rows, cols, causal = _ring_block(rank, step, cp, half)
            docs = _block_docs(doc_ids, every_rank_docs, (rank - step) % cp, rows, cols)
            block_out, block_lse = attend_block(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal, docs)
            if out is None:
                out, lse = block_out, block_lse
            else:
                _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            if pending is not None:
                kv = pending.wait()
        ctx.group, ctx.doc_ids, ctx.every_rank_docs = group, doc_ids, every_rank_docs
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    @_full_precision
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, doc_ids, every_rank_docs = ctx.group, ctx.doc_ids, ctx.every_rank_docs
        cp, rank, half = group.size, group.rank, q.shape[2] // 2
        grad_out = grad_out.float()
        delta = (grad_out * out).sum(dim=-1)
        grad_q = torch.zeros_like(out)
        kv = torch.stack([k, v])
        travelling_grad = None  # the K/V gradient of the block we hold, summed over the ranks before us
        for step in range(cp):
            pending_kv = ring_shift(kv, group, _KV_TAG) if step + 1 < cp else None
            rows, cols, causal = _ring_block(rank, step, cp, half)
            docs = _block_docs(doc_ids, every_rank_docs, (rank - step) % cp, rows, cols)
            gq, gk, gv = attend_block_backward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                               grad_out[:, :, rows], lse[:, :, rows], delta[:, :, rows], causal,
                                               docs)
            grad_q[:, :, rows] += gq
            grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            grad_kv[0][:, :, cols] += gk
            grad_kv[1][:, :, cols] += gv
            if travelling_grad is not None:
                grad_kv += travelling_grad.wait()
            travelling_grad = ring_shift(grad_kv, group, _GRAD_TAG)  # after cp hops it is back home
            if pending_kv is not None:
                kv = pending_kv.wait()
        grad_k, grad_v = travelling_grad.wait()
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group,
                   doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention for this rank's two chunks of q (B, H, S/cp, D) over every rank's K/V;
    with `doc_ids` (B, S/cp) of the same tokens, only within each query's document."""
    return _RingAttention.apply(q, k, v, doc_ids, group)


class RingAttention(nn.Module):
    """Drop-in for `CoreAttention` under cp_mode=ring."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ring_attention(q, k, v, self.group, doc_ids)


# ---------------------------------------------------------------------------------------------
# Ulysses


class UlyssesAttention(nn.Module):
    """Drop-in for `CoreAttention` under cp_mode=ulysses: all-to-all to head shards, attend, and back."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        cp = self.group.size
        if k.shape[1] % cp:  # too few kv heads to split: give every query head its own copy
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        q, k, v = (all_to_all_region(t, 1, 2, self.group) for t in (q, k, v))
        grouped = q.shape[1] != k.shape[1]
        if doc_ids is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        else:  # the whole sequence's doc ids, in order: the ranks hold contiguous slices
            visible = visible_keys(q.shape[2], None, all_gather(doc_ids, 1, self.group), q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=grouped)
        return all_to_all_region(out, 2, 1, self.group)


def apply_context_parallel(model: nn.Module, group: Group, mode: str) -> None:
    """Replace every block's attention core by ring or Ulysses attention over `group`."""
    attention = RingAttention if mode == "ring" else UlyssesAttention
    for block in model.layers.values():
        block.attention.core = attention(group)
