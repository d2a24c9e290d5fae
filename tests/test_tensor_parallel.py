"""Tensor parallelism: vocab-parallel cross-entropy equals torch's without gathering logits, sharded
initialisation reassembles the single-process weights exactly, clipping sees the global norm, the
RNG tracker gives replicated and sharded regions the right streams, and a checkpoint written under one
tp degree loads into another. (Per-layer gradients of whole layouts: test_parity_gradients.py.)"""

import pytest
import torch
import torch.nn.functional as F

from angelptm.config import config_from_dict
from angelptm.distributed.collectives import Group, group_of
from angelptm.distributed.mesh import ParallelDims, init
from angelptm.distributed.parallelize import clip_grad_norm_, materialize, parallelize
from angelptm.distributed.spawn import run_distributed
from angelptm.distributed.tensor_parallel import (
    RNGTracker,
    from_checkpoint_state,
    full_parameters,
    reduce_partial_gradients,
    spec_of,
    to_checkpoint_state,
    vocab_parallel_cross_entropy,
    vocab_slice,
)
from angelptm.models.llama import build_llama

JOB = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128, "vocab_size": 259,
                 "max_seq_len": 64}, "train": {"seq_len": 32}}
SEED = 7
WORLD = 4


def test_vocab_parallel_cross_entropy_in_one_process_is_torch_cross_entropy():
    single = Group("tp", None, 0, 1)
    logits = torch.randn(3, 5, 259, requires_grad=True)
    targets = torch.randint(0, 259, (3, 5))
    ours = vocab_parallel_cross_entropy(logits, targets, single, 0, 259)
    ours.mean().backward()
    ours_grad, logits.grad = logits.grad, None
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    reference.mean().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=1e-6, atol=1e-7)


def _model(cfg, mesh):
    return materialize(parallelize(build_llama(cfg.model, "meta"), mesh, cfg), torch.device("cpu"), SEED)


def _check_tensor_parallel(tp: int):
    mesh = init(ParallelDims(dp=WORLD // tp, tp=tp))
    g = group_of(mesh, "tp")
    cfg = config_from_dict(JOB)
    results = {}

    # Vocab-parallel loss: this rank's slice of the logits, its padding filled with values that would
    # dominate the softmax if they were not masked.
    model = _model(cfg, mesh)
    reference = build_llama(cfg.model, "meta")
    materialize(reference, torch.device("cpu"), SEED)
    start, length = vocab_slice(model)
    rows = model.output.weight.shape[0]
    full_logits = torch.randn(6, 259, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.arange(0, 259, 45)  # ids on every rank's slice
    local = torch.full((6, rows), 50.0)
    local[:, :length] = full_logits[:, start:start + length]
    local.requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, g, start, length)
    loss.sum().backward()
    full_logits.requires_grad_()
    ref_loss = F.cross_entropy(full_logits, targets, reduction="none")
    ref_loss.sum().backward()
    results["loss"] = (loss - ref_loss).abs().max().item()
    results["grad"] = (local.grad[:, :length] - full_logits.grad[:, start:start + length]).abs().max().item()
    results["padding_grad"] = local.grad[:, length:].abs().max().item() if length < rows else 0.0

    # Sharded initialisation reassembles the single-process weights bit for bit.
    full = full_parameters(model, g)
    results["init_equal"] = all(torch.equal(full[n], p) for n, p in reference.named_parameters())
    results["padding_zero"] = length == rows or model.output.weight[length:].abs().max().item() == 0.0

    # Clipping: the same gradients, sharded, give the global norm of the whole model.
    for p in reference.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    for name, p in model.named_parameters():
        p.grad = model.shard_specs[name].local_value(dict(reference.named_parameters())[name].grad, p.shape).clone()
    norm = clip_grad_norm_(model, 1.0, mesh)
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item()
    results["norm"] = abs(norm - ref_norm) / ref_norm
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    results["clipped"] = max(
        (p.grad - model.shard_specs[n].local_value(ref_grads[n], p.shape)).abs().max().item()
        for n, p in model.named_parameters()
    )

    # Partial gradients: each copy's part is summed over exactly the ranks holding that slice.
    for name, p in model.named_parameters():
        p.grad = torch.full(p.shape, float(g.rank + 1))
    reduce_partial_gradients(model, g)
    kv_copies = model.shard_specs["layers.0.attention.wk.weight"].copies
    first_copy = g.rank // kv_copies * kv_copies
    results["kv_sum"] = model.layers["0"].attention.wk.weight.grad.unique().tolist() == [
        float(sum(range(first_copy + 1, first_copy + kv_copies + 1)))]
    results["norm_sum"] = model.norm.weight.grad.unique().tolist() == [float(sum(range(1, tp + 1)))]
    results["wq_untouched"] = model.layers["0"].attention.wq.weight.grad.unique().tolist() == [float(g.rank + 1)]

    # RNG tracker: sharded regions draw differently per tp rank, replicated regions alike, and the
    # default stream outside is untouched.
    torch.manual_seed(123)
    tracker = RNGTracker(seed=5, tp_rank=g.rank, device=torch.device("cpu"))
    with tracker.fork("sharded"):
        sharded = torch.rand(4)
    with tracker.fork("replicated"):
        replicated = torch.rand(4)
    with tracker.fork("replicated"):
        replicated_next = torch.rand(4)
    outside = torch.rand(4)
    torch.manual_seed(123)
    results["outside_untouched"] = torch.equal(outside, torch.rand(4))
    results["stream_continues"] = not torch.equal(replicated, replicated_next)
    results["draws"] = (sharded, replicated)
    return results


def _stepped(cfg, mesh, full_grads):
    """The layout's model and AdamW after one step on the slices of `full_grads`."""
    model = _model(cfg, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tp = mesh["tp"].size()
    for name, p in model.named_parameters():
        p.grad = spec_of(model, name, p, tp).local_value(full_grads[name], p.shape).clone()
    optimizer.step()
    return model, optimizer


def _checkpoint_across_layouts(folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    cfg = config_from_dict(JOB)
    reference = materialize(build_llama(cfg.model, "meta"), torch.device("cpu"), SEED)
    full_grads = {name: torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                  for name, p in reference.named_parameters()}
    mesh = init(ParallelDims(tp=1, dp=WORLD))
    reference, reference_optimizer = _stepped(cfg, mesh, full_grads)
    reference_params = dict(reference.named_parameters())

    mesh = init(ParallelDims(dp=2, tp=2))
    model, optimizer = _stepped(cfg, mesh, full_grads)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save(to_checkpoint_state({"model": model_state, "optim": optim_state}, model, mesh), checkpoint_id=folder)

    errors = {}
    for tp in (4, 1):
        mesh = init(ParallelDims(dp=WORLD // tp, tp=tp))
        model = _model(cfg, mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = to_checkpoint_state({"model": model_state, "optim": optim_state}, model, mesh)
        dcp.load(state, checkpoint_id=folder)
        state = from_checkpoint_state(state, model)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        worst = 0.0
        for name, p in model.named_parameters():
            spec = spec_of(model, name, p, tp)
            ref = reference_params[name]
            pairs = [(p, ref)] + [(optimizer.state[p][k], reference_optimizer.state[ref][k])
                                  for k in ("exp_avg", "exp_avg_sq")]
            for ours, theirs in pairs:
                worst = max(worst, (ours - spec.local_value(theirs, ours.shape)).abs().max().item())
        errors[tp] = worst
    return errors


def _check_all(folder):
    """One set of processes serves every check: both tp meshes, then the checkpoint across layouts."""
    return {tp: _check_tensor_parallel(tp) for tp in (2, 4)}, _checkpoint_across_layouts(folder)


@pytest.mark.slow
def test_tensor_parallel_pieces_and_checkpoints_across_layouts(tmp_path):
    per_rank = run_distributed(_check_all, WORLD, str(tmp_path / "ckpt"))
    for tp in (2, 4):
        ranks = [results[tp] for results, _ in per_rank]
        for r in ranks:
            assert r["loss"] < 1e-5 and r["grad"] < 1e-6 and r["padding_grad"] == 0.0
            assert r["init_equal"] and r["padding_zero"]
            assert r["norm"] < 1e-6 and r["clipped"] < 1e-7
            assert r["kv_sum"] and r["norm_sum"] and r["wq_untouched"]
            assert r["outside_untouched"] and r["stream_continues"]
        sharded = [r["draws"][0] for r in ranks[:tp]]
        replicated = [r["draws"][1] for r in ranks[:tp]]
        assert all(torch.equal(replicated[0], other) for other in replicated[1:])
        assert len({tuple(x.tolist()) for x in sharded}) == tp
    # Written at tp 2 (dp 2), read back at tp 4 and at tp 1: parameters and AdamW moments exact.
    for _, checkpoint_errors in per_rank:
        assert checkpoint_errors == {4: 0.0, 1: 0.0}
