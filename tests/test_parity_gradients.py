"""Per-layer gradient checks: under each layout, every rank's gradient of every parameter shard equals
the matching slice of the single-process gradient, after the layout's gradient sync; and the logits
match. Each rank also runs the single-process model, so the comparison needs no gathering."""

import pytest
import torch
import torch.nn.functional as F

from angelptm.config import config_from_dict
from angelptm.distributed.collectives import all_reduce_coalesced, group_of
from angelptm.distributed.context_parallel import shard_sequence
from angelptm.distributed.mesh import ParallelDims, init
from angelptm.distributed.parallelize import materialize, parallelize
from angelptm.distributed.parity import TINY_JOB
from angelptm.distributed.spawn import run_distributed
from angelptm.distributed.tensor_parallel import (
    reduce_partial_gradients,
    replicated_spec,
    vocab_parallel_cross_entropy,
    vocab_slice,
)
from angelptm.models.llama import build_llama

SEED, BATCH, SEQ = 3, 4, 32


def _gradient_errors(layouts: list[list[str]]) -> dict:
    world = torch.distributed.get_world_size()
    rows = torch.randint(0, 259, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(SEED))
    errors = {}
    for layout in layouts:
        cfg = config_from_dict(TINY_JOB, layout)
        dims = ParallelDims.from_config(cfg.parallel, world)
        mesh = init(dims)
        tp, cp, data = (group_of(mesh, d) for d in ("tp", "cp", "dp_cp"))

        reference = materialize(build_llama(cfg.model, "meta"), torch.device("cpu"), SEED)
        ref_logits = reference(rows[:, :-1])
        F.cross_entropy(ref_logits.flatten(0, 1), rows[:, 1:].flatten()).backward()

        model = materialize(parallelize(build_llama(cfg.model, "meta"), mesh, cfg), torch.device("cpu"), SEED)
        per_dp = BATCH // dims.dp
        mine = rows[mesh["dp"].get_local_rank() * per_dp:][:per_dp]
        tokens, targets = (shard_sequence(x, cp, cfg.parallel.cp_mode) for x in (mine[:, :-1], mine[:, 1:]))
        logits = model(tokens)  # positions come from the layout's own hook
        vocab_parallel_cross_entropy(logits, targets, tp, *vocab_slice(model)).mean().backward()
        reduce_partial_gradients(model, tp)
        grads = [p.grad for p in model.parameters()]
        all_reduce_coalesced(grads, data)
        torch._foreach_div_(grads, data.size)

        start, length = vocab_slice(model)
        expected_logits = shard_sequence(ref_logits[mesh["dp"].get_local_rank() * per_dp:][:per_dp], cp,
                                         cfg.parallel.cp_mode)[..., start:start + length]
        layer_errors = {"logits": ((logits[..., :length] - expected_logits).abs().max()
                                   / expected_logits.abs().max()).item()}
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            spec = getattr(model, "shard_specs", {}).get(name) or replicated_spec(p, tp.size)
            expected = spec.local_value(ref_params[name].grad, p.shape)
            layer_errors[name] = ((p.grad - expected).abs().max() / expected.abs().max()).item()
        # Every parameter of the plain model has its counterpart (tied weights count once in both).
        errors[str(layout)] = (layer_errors, len(ref_params) + 1)
    return errors


def _check(layouts, world):
    for rank, per_layout in enumerate(run_distributed(_gradient_errors, world, layouts)):
        for layout, layer_errors in per_layout.items():
            layer_errors, expected_count = layer_errors
            assert len(layer_errors) == expected_count
            for name, error in layer_errors.items():
                assert error < 1e-5, f"rank {rank} {layout} {name}: {error}"


@pytest.mark.slow
def test_gradients_two_ranks():
    _check([["parallel.tp=2"], ["parallel.tp=2", "parallel.sequence_parallel=false"], ["parallel.cp=2"],
            ["parallel.cp=2", "parallel.cp_mode=ulysses"], ["parallel.dp=2"]], 2)


@pytest.mark.slow
def test_gradients_four_ranks():
    _check([["parallel.tp=4"], ["parallel.cp=4"], ["parallel.tp=2", "parallel.cp=2"],
            ["parallel.tp=2", "parallel.cp=2", "parallel.cp_mode=ulysses"], ["parallel.dp=2", "parallel.tp=2"],
            ["parallel.tp=2", "parallel.cp=2", "train.activation_checkpointing=full"],
            ["parallel.tp=4", "model.tie_embeddings=true"]], 4)
