"""Expert parallelism: dispatch and combine against the unsharded layer (uneven loads, an expert and a
whole rank with no token, forward and backward, bytes counted); each ep layout against the
single-process loss curve; exact resume, and resume across ep degrees; the config's one-line errors."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from angelptm.config import MoEConfig, config_from_dict
from angelptm.distributed.collectives import Group, comm_bytes, reset_comm_bytes
from angelptm.distributed.expert_parallel import apply_expert_parallel, expert_major_order
from angelptm.distributed.parity import TINY_JOB, compare, run_layout, run_layouts
from angelptm.distributed.spawn import run_distributed
from angelptm.errors import ConfigError
from angelptm.models.llama import FeedForward
from angelptm.models.moe import MoE

from conftest import one_line, tiny_sections

DIM, FFN, EXPERTS = 16, 32, 4


# ---------------------------------------------------------------------------------------------
# Dispatch and combine


def test_expert_major_order_regroups_rows_that_arrive_by_source():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # from rank 0: 2 rows for expert 0, 1 for expert 2
    # arrival order: r0e0 r0e0 r0e2 | r1e0 r1e1 r1e1 r1e1  ->  expert 0: 0 1 3, expert 1: 4 5 6, expert 2: 2
    assert expert_major_order(counts).tolist() == [0, 1, 3, 4, 5, 6, 2]


class Holder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.moe = layer


def moe_layer(empty_experts: list[int]) -> MoE:
    torch.manual_seed(0)
    layer = MoE(DIM, MoEConfig(n_experts=EXPERTS, top_k=2, expert_ffn_dim=FFN), FeedForward(DIM, FFN))
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.3)
        layer.router.weight[0] += 1.0  # inputs are positive: expert 0 gets most tokens
        for e in empty_experts:
            layer.router.weight[e] = -10.0  # and these none
    return layer


def _dispatch_against_unsharded(empty_experts: list[int]) -> dict:
    rank, ranks = dist.get_rank(), dist.get_world_size()
    reference, layer = moe_layer(empty_experts), moe_layer(empty_experts)
    full = {name: p.detach().clone() for name, p in layer.experts.named_parameters()}
    group = Group("ep", dist.group.WORLD, rank, ranks)
    apply_expert_parallel(Holder(layer), group, group)
    local = EXPERTS // ranks
    with torch.no_grad():
        for name, param in layer.experts.named_parameters():
            param.copy_(full[name][rank * local:(rank + 1) * local])
    torch.manual_seed(1 + rank)
    x = torch.randn(2 + 3 * rank, 5, DIM).abs()  # a different number of tokens on each rank
    grad = torch.linspace(-1, 1, x.numel()).view_as(x)
    results = {}
    for name, module in (("ours", layer), ("reference", reference)):
        xi = x.clone().requires_grad_()
        reset_comm_bytes()
        out = module(xi)
        out.backward(grad)
        results[name] = {"out": out.detach(), "x": xi.grad, "bytes": comm_bytes().get("ep", 0),
                         **{n: p.grad.clone() for n, p in module.named_parameters()}}
    for name in full:  # each rank's experts see every rank's tokens: the reference's sum over ranks
        dist.all_reduce(results["reference"][f"experts.{name}"])
        results["reference"][f"experts.{name}"] = results["reference"][f"experts.{name}"][rank * local:(rank + 1) * local]
    # The bytes this rank sends: rows to other ranks' experts (dispatch, and the same rows' gradients
    # come back in backward as their combine), the rows it returns to others, and the counts.
    routed = layer.last_routing.tokens_per_expert.view(ranks, local).sum(1)
    received = torch.zeros(ranks, dtype=torch.long)
    dist.all_to_all_single(received, routed)
    row = DIM * 4
    results["expected_bytes"] = 2 * row * (int(routed.sum() - routed[rank]) + int(received.sum() - received[rank])) \
        + 8 * local * (ranks - 1)
    results["received"] = int(received.sum())
    results["routed"] = layer.last_routing.tokens_per_expert.tolist()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("empty_experts", [[3], [2, 3]], ids=["one-empty-expert", "rank1-receives-nothing"])
def test_dispatch_and_combine_match_the_unsharded_layer(empty_experts):
    for rank, r in enumerate(run_distributed(_dispatch_against_unsharded, 2, empty_experts)):
        assert all(r["routed"][e] == 0 for e in empty_experts) and len(set(r["routed"])) > 1, r["routed"]
        for name, value in r["reference"].items():
            if name != "bytes":
                torch.testing.assert_close(r["ours"][name], value, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: {name}")
        assert r["ours"]["bytes"] == r["expected_bytes"] and r["reference"]["bytes"] == 0
        if empty_experts == [2, 3] and rank == 1:
            assert r["received"] == 0
            assert torch.all(r["ours"]["experts.w1"] == 0)


# ---------------------------------------------------------------------------------------------
# Layouts against the single process


# Every microbatch one sequence in every layout, so that the balancing loss (a product of per-
# microbatch means) is the same function of the same tokens everywhere.
MOE_JOB = {**TINY_JOB,
           "model": {**TINY_JOB["model"], "moe": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32,
                                                  "n_shared_experts": 1, "first_dense_layers": 1,
                                                  "z_loss_coef": 0.001}},
           "train": {**TINY_JOB["train"], "steps": 20, "micro_batch": 1}}


def grad_norm_difference(result, reference) -> float:
    return max(abs(a - b) / b for a, b in zip(result.grad_norms, reference.grad_norms))


@pytest.fixture(scope="module")
def single_process():
    return run_layout(world_size=1, job=MOE_JOB)


@pytest.mark.slow
def test_ep2_layouts_match_single_process(single_process):
    for overrides in (["zero.stage=0"], ["zero.stage=3"], ["train.activation_checkpointing=full"]):
        run = run_layout({"dp": 2, "ep": 2}, 2, MOE_JOB, overrides)
        loss_diff, weight_diff = compare(run, single_process)
        assert loss_diff < 1e-4 and weight_diff < 1e-4, (overrides, loss_diff, weight_diff)
        assert grad_norm_difference(run, single_process) < 1e-4  # experts counted once, dense too
        assert run.comm_bytes["ep"] > 0


@pytest.mark.slow
def test_four_data_ranks_match_single_process(single_process):
    # ep4: one expert per rank; ep2 on dp4: expert pages sharded over an edp group of two.
    layouts = [{"dp": 4, "ep": 4}, {"dp": 4, "ep": 2}]
    for layout, run in zip(layouts, run_layouts(layouts, 4, MOE_JOB, ["zero.stage=2"])):
        loss_diff, weight_diff = compare(run, single_process)
        assert loss_diff < 1e-4 and weight_diff < 1e-4, (layout, loss_diff, weight_diff)
        assert grad_norm_difference(run, single_process) < 1e-4, layout


def routing_metrics_difference(result, reference) -> float:
    """The largest relative difference of the logged moe_aux_loss and moe_max_load over the steps:
    each microbatch's routing counted once, on whichever rank and stage it ran."""
    return max(abs(ours[key] - theirs[key]) / abs(theirs[key]) for ours, theirs in zip(result.records, reference.records)
               for key in ("moe_aux_loss", "moe_max_load"))


def assert_matches(runs, layouts, reference):
    for layout, run in zip(layouts, runs):
        loss_diff, weight_diff = compare(run, reference)
        assert loss_diff < 1e-4 and weight_diff < 1e-4, (layout, loss_diff, weight_diff)
        assert grad_norm_difference(run, reference) < 1e-4, layout
        assert routing_metrics_difference(run, reference) < 1e-4, layout


@pytest.mark.slow
def test_moe_under_tp_pp_and_cp_matches_single_process(single_process):
    # tp: the router and routed experts whole on each rank, computing its sequence slice (or, without
    # sequence parallelism, every token), the shared experts split; pp: the routing losses train the
    # router on the stage holding it, in every schedule; cp: the losses of the whole sequence from
    # every rank's part (the balancing loss included).
    layouts = [{"tp": 2}, {"tp": 2, "sequence_parallel": "false"}, {"pp": 2},
               {"pp": 2, "pp_schedule": "zero_bubble"}, {"pp": 2, "pp_schedule": "interleaved", "pp_virtual_stages": 2},
               {"cp": 2}, {"cp": 2, "cp_mode": "ulysses"}]
    assert_matches(run_layouts(layouts, 2, MOE_JOB), layouts, single_process)


@pytest.mark.slow
def test_moe_pipeline_with_recomputation_counts_each_microbatch_once(single_process):
    run = run_layout({"pp": 2}, 2, MOE_JOB, ["train.activation_checkpointing=full"])
    assert_matches([run], ["pp2 recomputed"], single_process)


@pytest.mark.slow
def test_ep_with_tp_or_pp_and_tp_with_cp_match_single_process(single_process):
    layouts = [{"dp": 2, "tp": 2, "ep": 2}, {"dp": 2, "pp": 2, "ep": 2}, {"tp": 2, "cp": 2}]
    runs = run_layouts(layouts, 4, MOE_JOB)
    assert_matches(runs, layouts, single_process)
    assert runs[0].comm_bytes["ep"] > 0 and runs[1].comm_bytes["ep"] > 0


@pytest.mark.slow
def test_ep2_carved_from_cp2_matches_single_process(single_process):
    run = run_layout({"dp": 1, "cp": 2, "ep": 2}, 2, MOE_JOB)
    assert_matches([run], ["ep2 over cp2"], single_process)


# ---------------------------------------------------------------------------------------------
# Resume


def _train(job: dict, runs: list[list[str]]) -> list[list[float]]:
    """On every rank: one Trainer per list of overrides, in turn; the losses each logged."""
    from angelptm.train.trainer import Trainer

    losses = []
    for overrides in runs:
        cfg = config_from_dict(job, overrides)
        Trainer(cfg).fit()
        lines = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
        losses.append({r["step"]: r["loss"] for r in map(json.loads, lines)})
    dist.destroy_process_group()
    return losses


def resume_job(tmp_path) -> dict:
    job = tiny_sections(tmp_path, train={"steps": 8, "global_batch": 4, "micro_batch": 1, "ckpt_every": 4})
    job["model"] = {**job["model"], "moe": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32,
                                            "router": "sigmoid", "balance": "aux_free", "bias_update_rate": 0.01}}
    return job


def relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


@pytest.mark.slow
def test_resume_exactly_and_across_ep_degrees(tmp_path):
    job = resume_job(tmp_path)
    ep1, ep4 = ["parallel.ep=1"], ["parallel.dp=4", "parallel.ep=4"]

    def run(layout, name, resume_from=None):
        resume = f"{tmp_path}/{resume_from}/checkpoints/step_4" if resume_from else "never"
        return layout + [f"train.output_dir={tmp_path}/{name}", f"train.resume={resume}"]

    (single,) = run_distributed(_train, 1, job, [run(ep1, "single")], init_group=False)[0]
    whole, again, from_single = run_distributed(
        _train, 4, job, [run(ep4, "whole"), run(ep4, "again", "whole"), run(ep4, "from_single", "single")],
        init_group=False)[0]
    (from_ep4,) = run_distributed(_train, 1, job, [run(ep1, "from_ep4", "whole")], init_group=False)[0]
    later = lambda losses: {s: v for s, v in losses.items() if s > 4}  # noqa: E731
    assert relative(whole, single) < 1e-4
    assert again == later(whole)  # exact resume at the same layout
    assert relative(from_ep4, later(whole)) < 1e-5  # saved at ep4, resumed at ep1
    assert relative(from_single, later(single)) < 1e-5  # saved at ep1, resumed at ep4


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("settings, key", [
    (["parallel.ep=3", "parallel.dp=3"], "parallel.ep=3 does not divide model.moe.n_experts=4"),
    (["parallel.ep=4", "parallel.dp=2"], "parallel.ep=4 does not divide dp·cp"),
    (["parallel.ep=2", "model.moe.n_experts=0"], "parallel.ep=2 splits experts, and this model has none"),
    (["parallel.ep=0"], "parallel.ep=0 must be positive"),
    (["parallel.cp=2", "model.moe.capacity_factor=1.0"], "model.moe.capacity_factor=1.0 needs every microbatch's "
                                                         "tokens on one rank"),
])
def test_bad_expert_parallel_config_is_a_one_line_error(tmp_path, settings, key):
    job = resume_job(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(job, settings)
    assert key in one_line(str(excinfo.value))


def test_ep_that_does_not_divide_the_data_ranks_is_refused_before_any_collective(tmp_path):
    from angelptm.distributed.mesh import ParallelDims, validate_layout

    cfg = config_from_dict(resume_job(tmp_path), ["parallel.ep=4"])  # dp auto: checked against the world
    with pytest.raises(ConfigError) as excinfo:
        validate_layout(ParallelDims.from_config(cfg.parallel, 2), cfg)
    assert "parallel.ep=4 does not divide dp·cp = 2·1" in one_line(str(excinfo.value))


# ---------------------------------------------------------------------------------------------
# MoE checkpoints outside training: routing biases, export


def test_routing_biases_start_at_zero_and_survive_retying(tmp_path):
    from angelptm.distributed.parallelize import materialize
    from angelptm.models.llama import build_llama

    cfg = config_from_dict(resume_job(tmp_path)).model
    model = materialize(build_llama(cfg, "meta"), torch.device("cpu"), seed=0)
    routers = [layer.feed_forward.router for layer in model.layers.values()]
    assert all(torch.equal(r.expert_bias, torch.zeros(4)) for r in routers)
    with torch.no_grad():
        routers[0].expert_bias.fill_(0.5)
    model.tie_weights()
    assert torch.equal(routers[0].expert_bias, torch.full((4,), 0.5))


def test_generate_loader_reads_the_routing_biases_and_export_refuses_their_router(tmp_path, own_process_group):
    from angelptm.errors import UserError
    from angelptm.models.hf import export_hf
    from angelptm.train.checkpoint import load_model
    from angelptm.train.trainer import Trainer

    job = resume_job(tmp_path / "run")
    job["train"].update(steps=3, ckpt_every=0)
    trainer = Trainer(config_from_dict(job))
    trainer.fit()
    trained = {name: b.clone() for name, b in trainer.model.named_buffers() if name.endswith("expert_bias")}
    assert all(b.abs().sum() > 0 for b in trained.values())
    _, loaded = load_model(tmp_path / "run")
    for name, bias in trained.items():
        assert torch.equal(loaded.get_buffer(name), bias), name
    with pytest.raises(UserError) as excinfo:
        export_hf(tmp_path / "run" / "checkpoints" / "step_3", tmp_path / "hf")
    # A sigmoid router with a selection bias: no Hugging Face family angelptm exports routes so.
    assert "model.moe.router=sigmoid" in one_line(str(excinfo.value))
    assert not (tmp_path / "hf").exists()
