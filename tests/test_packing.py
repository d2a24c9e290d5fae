"""Packed rows (several documents per row, positions restarting at 0 and doc ids counting up at each
document): attention never crosses a document, so the loss of a packed batch is the token-weighted loss
of its documents run one at a time; the varlen ring and Ulysses attend as the masked full sequence,
also where a whole block is another document's; and a packed run trained by the real Trainer matches
the single process under dp, tp + sequence parallel, every pipeline schedule, cp ring and Ulysses,
tp × cp and pp × cp on four ranks, activation checkpointing, compile and FP8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from angelptm.data import TokenSampler
from angelptm.data.rows import IGNORE, Rows
from angelptm.data.sampler import sample_indices
from angelptm.distributed.collectives import group_of
from angelptm.distributed.context_parallel import RingAttention, UlyssesAttention, attend_block, shard_sequence
from angelptm.distributed.mesh import ParallelDims, init
from angelptm.distributed.parity import TINY_JOB, compare
from angelptm.distributed.spawn import run_distributed
from angelptm.models.llama import visible_keys

from test_loss_normalisation import run_with_sampler, sampler_and_model

JOB = {**TINY_JOB, "optim": {"warmup_steps": 2}, "train": {**TINY_JOB["train"], "steps": 6}}
TOLERANCE = 1e-4  # the project's layout parity rule


class PackedWindows(TokenSampler):
    """The token windows cut into documents, as a packing sampler hands them over: 1 to 4 documents per
    row at boundaries drawn from (seed, sample number); positions restart at 0 and doc ids count up
    at each document; a document's last token predicts nothing (its next token is another
    document's) and its first 0-2 targets are a prompt of IGNORE."""

    def microbatch(self, step: int, start: int, count: int) -> Rows:
        windows = self.rows(step, start, count)
        packed = [self._pack(int(g)) for g in sample_indices(step, start, count, self.global_batch)]
        positions, doc_ids, loss_taken = (torch.stack(parts) for parts in zip(*packed))
        return Rows(windows[:, :-1], windows[:, 1:].masked_fill(~loss_taken, IGNORE), positions, doc_ids)

    def _pack(self, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 7, sample])
        starts = np.sort(rng.choice(np.arange(1, self.seq_len), rng.integers(0, 4), replace=False))
        index = np.arange(self.seq_len)
        doc_ids = np.searchsorted(starts, index, side="right")
        first = np.concatenate([[0], starts])[doc_ids]  # where each token's document starts
        last = np.concatenate([starts, [self.seq_len]])[doc_ids] - 1
        prompt = rng.integers(0, 3, len(starts) + 1)[doc_ids]
        loss_taken = (index < last) & (index - first >= prompt)
        return torch.from_numpy(index - first), torch.from_numpy(doc_ids), torch.from_numpy(loss_taken)


class AcrossDocuments(PackedWindows):
    """The same tokens and targets with the positions and doc ids dropped: attention crosses documents."""

    def microbatch(self, step: int, start: int, count: int) -> Rows:
        rows = super().microbatch(step, start, count)
        return Rows(rows.inputs, rows.targets)


def test_packed_rows_restart_positions_and_mask_targets_at_each_document():
    sampler, _ = sampler_and_model(PackedWindows, JOB)
    rows = sampler.microbatch(0, 0, 4)
    assert (rows.doc_ids.diff(dim=1) >= 0).all() and rows.doc_ids.max() > 0
    starts = torch.cat([torch.ones(4, 1, dtype=torch.bool), rows.doc_ids.diff(dim=1) > 0], dim=1)
    assert torch.equal(starts, rows.positions == 0)
    ends = torch.cat([rows.doc_ids.diff(dim=1) > 0, torch.ones(4, 1, dtype=torch.bool)], dim=1)
    assert (rows.targets[ends] == IGNORE).all()  # no target across a boundary


def _per_document(model, rows: Rows) -> tuple[float, int]:
    """(summed loss, loss tokens) of every document of `rows` run alone, unpacked, from position 0."""
    total, tokens = torch.zeros(()), 0
    for row in range(rows.inputs.shape[0]):
        for doc in rows.doc_ids[row].unique():
            here = rows.doc_ids[row] == doc
            logits = model(rows.inputs[row, here][None])
            targets = rows.targets[row, here]
            total = total + F.cross_entropy(logits[0], targets, ignore_index=IGNORE, reduction="sum")
            tokens += int((targets != IGNORE).sum())
    return total, tokens


def test_packed_loss_and_gradients_equal_the_documents_run_one_at_a_time():
    sampler, model = sampler_and_model(PackedWindows, JOB)
    rows = sampler.microbatch(0, 0, 4)
    packed = F.cross_entropy(model(rows.inputs, rows.positions, rows.doc_ids).flatten(0, 1), rows.targets.flatten(),
                             ignore_index=IGNORE)
    packed.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total, tokens = _per_document(model, rows)
    alone = total / tokens
    alone.backward()
    assert abs(packed.item() - alone.item()) / alone.item() < 1e-6
    for ours, theirs in zip(packed_grads, (p.grad for p in model.parameters())):
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    with torch.no_grad():  # without the document masks and restarted positions the loss differs
        across = F.cross_entropy(model(rows.inputs).flatten(0, 1), rows.targets.flatten(), ignore_index=IGNORE)
    assert abs(across.item() - alone.item()) / alone.item() > 1e-4


# ---------------------------------------------------------------------------------------------
# The varlen ring and Ulysses


def _qkv_and_docs(seq: int, kv_heads: int):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, seq, 8, generator=gen)
    k, v = (torch.randn(3, kv_heads, seq, 8, generator=gen) for _ in range(2))
    index = torch.arange(seq)
    # One document; documents that start exactly on the ring's chunk boundaries (so whole blocks are
    # another document's); and documents that start mid-chunk.
    doc_ids = torch.stack([torch.zeros(seq, dtype=torch.long), index // (seq // 4),
                           (index >= 3).long() + (index >= 7).long() + (index >= 13).long()])
    return q, k, v, doc_ids


def test_a_block_holding_only_other_documents_adds_zero_not_nan():
    q, k, v, _ = _qkv_and_docs(8, 2)
    docs = (torch.ones(3, 8, dtype=torch.long), torch.zeros(3, 8, dtype=torch.long))
    out, lse = attend_block(q, k, v, False, docs)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == float("-inf")).all()


def _varlen_errors() -> dict:
    group = group_of(init(ParallelDims(cp=2)), "cp")
    errors = {}
    for mode, kv_heads in (("ring", 2), ("ring", 4), ("ulysses", 2)):
        seq = 16
        q, k, v, doc_ids = _qkv_and_docs(seq, kv_heads)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        reference = F.scaled_dot_product_attention(*full, attn_mask=visible_keys(seq, None, doc_ids, q.device),
                                                   enable_gqa=kv_heads != 4)
        reference.backward(grad_out)
        local = [shard_sequence(t, group, mode, dim=2).requires_grad_() for t in (q, k, v)]
        core = RingAttention(group) if mode == "ring" else UlyssesAttention(group)
        out = core(*local, shard_sequence(doc_ids, group, mode, dim=1))
        out.backward(shard_sequence(grad_out, group, mode, dim=2))
        pairs = [(out, reference)] + [(t.grad, f.grad) for t, f in zip(local, full)]
        errors[(mode, kv_heads)] = max((ours - shard_sequence(theirs, group, mode, dim=2)).abs().max().item()
                                       for ours, theirs in pairs)
    return errors


@pytest.mark.slow
def test_varlen_ring_and_ulysses_match_masked_full_attention():
    for rank, errors in enumerate(run_distributed(_varlen_errors, 2)):
        assert len(errors) == 3
        for case, error in errors.items():
            assert error < 1e-5, f"rank {rank} {case}: {error}"  # NaN fails too


# ---------------------------------------------------------------------------------------------
# Packed runs of the real Trainer in every layout


LAYOUTS = [["parallel.dp=2"], ["parallel.tp=2"], ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
           ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2"],
           ["parallel.pp=2", "parallel.pp_schedule=zero_bubble"], ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
           ["parallel.cp=2"], ["parallel.cp=2", "parallel.cp_mode=ulysses"]]
FEATURES = [["train.activation_checkpointing=full"], ["train.activation_checkpointing=selective"],
            ["train.compile=true"]]
FP8 = ["precision.fp8.enabled=true", "precision.fp8.recipe=tensorwise"]


@pytest.fixture(scope="module")
def single_process():
    """The packed reference, and the same rows attending across documents."""
    return run_with_sampler(PackedWindows, [[]], 1, JOB)[0], run_with_sampler(AcrossDocuments, [[]], 1, JOB)[0]


@pytest.mark.slow
def test_packed_reference_learns_and_differs_from_attention_across_documents(single_process):
    packed, across = single_process
    assert packed.losses[-1] < packed.losses[0] - 0.1
    assert max(abs(a - b) / b for a, b in zip(packed.losses, across.losses)) > 10 * TOLERANCE


def assert_packed_runs_match(reference, layouts, world_size):
    for settings, run in zip(layouts, run_with_sampler(PackedWindows, layouts, world_size, JOB)):
        loss_diff, weight_diff = compare(run, reference)
        print(settings, f"loss {loss_diff:.1e} weights {weight_diff:.1e}")
        assert loss_diff < TOLERANCE and weight_diff < TOLERANCE, (settings, loss_diff, weight_diff)
        assert len(set(run.last_losses)) == 1


@pytest.mark.slow
def test_packed_runs_match_the_single_process_in_every_layout(single_process):
    assert_packed_runs_match(single_process[0], LAYOUTS, 2)


@pytest.mark.slow
def test_packed_runs_match_the_single_process_on_four_ranks(single_process):
    """Two of the splits at once: the varlen ring over tp's heads (with sequence parallelism),
    and pipeline stages exchanging cp shards of packed rows, by ring and by Ulysses."""
    layouts = [["parallel.tp=2", "parallel.cp=2"],
               ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=1f1b"],
               ["parallel.pp=2", "parallel.cp=2", "parallel.cp_mode=ulysses", "parallel.pp_schedule=1f1b"]]
    assert_packed_runs_match(single_process[0], layouts, 4)


@pytest.mark.slow
def test_packed_runs_match_with_checkpointing_and_compile(single_process):
    assert_packed_runs_match(single_process[0], FEATURES, 1)


@pytest.mark.slow
def test_packed_fp8_under_tp_and_cp_tracks_the_single_process():
    """FP8 scales each shard like the whole tensor: up to FP8 rounding at the edges, as the unpacked FP8 parity."""
    reference = run_with_sampler(PackedWindows, [FP8], 1, JOB)[0]
    for settings, run in zip((["parallel.tp=2"], ["parallel.cp=2"]),
                             run_with_sampler(PackedWindows, [FP8 + ["parallel.tp=2"], FP8 + ["parallel.cp=2"]], 2, JOB)):
        loss_diff = max(abs(a - b) / b for a, b in zip(run.losses, reference.losses))
        print(settings, f"fp8 loss {loss_diff:.1e}")
        assert loss_diff < 1e-3, (settings, loss_diff)
