"""The MoE layer: routing and its losses against hand-computed values, aux-free balancing, capacity
dropping, uneven and empty experts, the grouped GEMM against per-expert references and against
transformers' Mixtral block; an MoE model through the real Trainer; the config's one-line errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from angelptm.config import MoEConfig, config_from_dict
from angelptm.distributed.collectives import Group
from angelptm.errors import ConfigError
from angelptm.models.llama import FeedForward, build_llama, num_params
from angelptm.models.moe import (
    MoE, Router, RoutingTotals, expert_capacity, grouped_linear, grouped_mm_works, load_balancing_loss,
    looped_linear, sort_by_expert, z_loss,
)
from angelptm.train.routing_stats import MoEStepStats

from conftest import one_line, tiny_sections

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, FFN = 16, 32
SOLO = Group("solo", None, 0, 1)  # one process: no data ranks or stages to sum over


def moe_layer(seed=0, shared=False, **options) -> MoE:
    # No routing losses unless asked: their gradient joins the output's, which the references lack.
    cfg = MoEConfig(**{"n_experts": 4, "top_k": 2, "expert_ffn_dim": FFN, "aux_loss_coef": 0.0, **options})
    torch.manual_seed(seed)
    layer = MoE(DIM, cfg, FeedForward(DIM, 2 * FFN) if shared else None)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.3)
    return layer


def reference_forward(layer: MoE, x: torch.Tensor, kept=None) -> torch.Tensor:
    """The layer's output from its router's choice, one expert at a time through masks;
    `kept[t][j]` False leaves out token t's j-th choice."""
    tokens = x.reshape(-1, x.shape[-1])
    routing = layer.router(tokens)
    ex = layer.experts
    out = torch.zeros_like(tokens)
    for e in range(layer.cfg.n_experts):
        chosen = routing.experts == e
        if kept is not None:
            chosen &= torch.tensor(kept)
        token, choice = chosen.nonzero(as_tuple=True)
        rows = tokens[token]
        y = (F.silu(rows @ ex.w1[e].T) * (rows @ ex.w3[e].T)) @ ex.w2[e].T
        out = out.index_add(0, token, y * routing.gates[token, choice, None])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(tokens)
    return out.view_as(x)


def grads_of(layer: MoE, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = forward(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return {"out": out.detach(), "x": x.grad, **grads}


def assert_close(ours: dict, reference: dict, tol=1e-5):
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=tol, atol=tol, msg=name)


# ---------------------------------------------------------------------------------------------
# Routing and its losses


def hand_router(score: str, aux_free: bool = False) -> Router:
    router = Router(2, 3, top_k=2, score=score, aux_free=aux_free)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    return router


TOKENS = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # logits [2, 0, 1] and [0, 1, 0.5]


def test_softmax_router_and_losses_match_hand_computed_values():
    routing = hand_router("softmax")(TOKENS)
    e = math.e
    assert routing.experts.tolist() == [[0, 2], [1, 2]]
    expected_gates = [[e**2 / (e**2 + e), e / (e**2 + e)], [e / (e + e**0.5), e**0.5 / (e + e**0.5)]]
    torch.testing.assert_close(routing.gates, torch.tensor(expected_gates))
    sums = [e**2 + 1 + e, 1 + e + e**0.5]
    probs = [[e**2 / sums[0], 1 / sums[0], e / sums[0]], [1 / sums[1], e / sums[1], e**0.5 / sums[1]]]
    mean_prob = [(probs[0][i] + probs[1][i]) / 2 for i in range(3)]
    fraction = [1 / 4, 1 / 4, 2 / 4]  # of the 4 token copies: expert 0 one, expert 1 one, expert 2 two
    totals = totals_of(routing)
    balance = load_balancing_loss(totals, top_k=2)
    assert balance.item() == pytest.approx(3 * sum(f * p for f, p in zip(fraction, mean_prob)), rel=1e-6)
    assert z_loss(totals).item() == pytest.approx((math.log(sums[0]) ** 2 + math.log(sums[1]) ** 2) / 2, rel=1e-6)


def totals_of(routing) -> RoutingTotals:
    return RoutingTotals(torch.bincount(routing.experts.flatten(), minlength=routing.probs.shape[1]),
                         routing.probs.sum(0), routing.logits.logsumexp(-1).square().sum(),
                         torch.tensor(routing.probs.shape[0]))


def test_balanced_routing_has_balancing_loss_one():
    totals = RoutingTotals(torch.ones(4), torch.full((4,), 0.5), torch.zeros(()), torch.tensor(2))
    assert load_balancing_loss(totals, top_k=2).item() == pytest.approx(1.0)


def test_layer_keeps_its_weighted_aux_and_z_losses_and_trains_the_router_on_them():
    layer = moe_layer(aux_loss_coef=0.5, z_loss_coef=0.1)
    layer.aux_loss_scale = 0.25
    x = torch.randn(3, 5, DIM)
    out = layer(x)
    routing = layer.router(x.reshape(-1, DIM))
    totals = totals_of(routing)
    expected = 0.5 * load_balancing_loss(totals, 2) + 0.1 * z_loss(totals)
    stats = layer.last_routing
    torch.testing.assert_close(stats.aux_loss, expected.detach())
    assert stats.tokens_per_expert.tolist() == totals.routed.tolist() and stats.dropped.item() == 0
    # Backward of the output alone gives the router the gradient of output + scale · aux loss.
    out.sum().backward()
    ours = layer.router.weight.grad.clone()
    layer.zero_grad()
    layer.aux_loss_scale = 0.0
    (layer(x).sum() + 0.25 * expected).backward()
    torch.testing.assert_close(ours, layer.router.weight.grad)


def test_single_expert_gate_is_its_raw_probability():
    router = hand_router("softmax")
    router.top_k = 1
    routing = router(TOKENS)
    assert routing.experts.flatten().tolist() == [0, 1]
    torch.testing.assert_close(routing.gates.flatten(), torch.stack([routing.probs[0, 0], routing.probs[1, 1]]))


def test_sigmoid_bias_changes_the_choice_but_not_the_gates():
    router = hand_router("sigmoid", aux_free=True)
    plain = router(TOKENS)
    assert plain.experts.tolist() == [[0, 2], [1, 2]]
    router.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # expert 1 now wins every choice
    biased = router(TOKENS)
    assert biased.experts.tolist() == [[1, 0], [1, 2]]
    s = torch.sigmoid
    first = torch.tensor([s(torch.tensor(0.0)), s(torch.tensor(2.0))])  # the unbiased scores of experts 1 and 0
    torch.testing.assert_close(biased.gates[0], first / first.sum())
    torch.testing.assert_close(biased.gates[1], plain.gates[1])
    torch.testing.assert_close(biased.probs, plain.probs)  # the balancing statistics ignore the bias too


def test_aux_free_bias_moves_toward_balance():
    layer = moe_layer(router="sigmoid", balance="aux_free", bias_update_rate=0.05)
    with torch.no_grad():
        layer.router.weight[0] += 2.0  # expert 0 wins almost every token
    x = torch.randn(64, DIM).abs()
    stats = MoEStepStats(layer, torch.device("cpu"))
    loads = []
    for _ in range(40):
        layer(x)
        stats.record(layer)
        loads.append(stats.finish_step(SOLO, SOLO, update_bias=True)["moe_max_load"])
    assert loads[0] > 1.8 and loads[-1] < 1.3, loads
    assert layer.router.expert_bias[0] < 0 and layer.router.expert_bias[1:].max() > 0
    before = layer.router.expert_bias.clone()
    layer(x)
    stats.record(layer)
    stats.finish_step(SOLO, SOLO, update_bias=False)  # a skipped step leaves the biases alone
    assert torch.equal(layer.router.expert_bias, before)


# ---------------------------------------------------------------------------------------------
# Dispatch: capacity, uneven and empty experts


def test_capacity_keeps_each_experts_first_copies_by_token_position():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])  # slot t·2 + j is token t's j-th choice
    assert expert_capacity(0.75, tokens=4, top_k=2, n_experts=3) == 2
    slots, kept, routed = sort_by_expert(experts, 3, capacity=2)
    # expert 0: slots 0, 2 kept, 4, 7 dropped; expert 1: slots 1, 5 kept, 6 dropped; expert 2: slot 3
    assert slots.tolist() == [0, 2, 1, 5, 3]
    assert kept.tolist() == [2, 2, 1] and routed.tolist() == [4, 3, 1]
    slots, kept, _ = sort_by_expert(experts, 3, capacity=None)
    assert slots.tolist() == [0, 2, 4, 7, 1, 5, 6, 3] and kept.tolist() == [4, 3, 1]


def test_capacity_dropping_in_the_layer_drops_exactly_those_copies():
    layer = moe_layer(capacity_factor=0.5)
    x = torch.randn(2, 6, DIM)
    tokens, top_k, n_experts = 12, 2, 4
    capacity = expert_capacity(0.5, tokens, top_k, n_experts)  # 3 of the 24 copies per expert
    experts = layer.router(x.reshape(-1, DIM)).experts.tolist()
    seen = [0] * n_experts
    kept = []  # walk the batch in token order; an expert takes copies until it is full
    for choices in experts:
        kept.append([])
        for e in choices:
            kept[-1].append(seen[e] < capacity)
            seen[e] += 1
    dropped = sum(not k for row in kept for k in row)
    assert dropped > 0
    torch.testing.assert_close(layer(x), reference_forward(layer, x, kept), rtol=1e-5, atol=1e-5)
    assert layer.last_routing.dropped.item() == dropped
    assert layer.last_routing.tokens_per_expert.tolist() == seen  # routed, before dropping


def test_uneven_and_empty_experts_forward_and_backward():
    layer = moe_layer()
    with torch.no_grad():
        layer.router.weight[3] = -10.0  # inputs are positive: expert 3 never gets a token
        layer.router.weight[0] += 1.0  # and expert 0 most of them
    x = torch.randn(4, 8, DIM).abs()
    ours = grads_of(layer, x, layer)
    routed = layer.last_routing.tokens_per_expert.tolist()
    assert routed[3] == 0 and len(set(routed)) == 4, routed  # every count different, one of them zero
    assert_close(ours, grads_of(layer, x, lambda x: reference_forward(layer, x)))
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        assert torch.all(ours[name][3] == 0) and torch.all(ours[name][:3].flatten(1).abs().sum(1) > 0)


# ---------------------------------------------------------------------------------------------
# Expert compute: grouped GEMM, fallback, references


@pytest.mark.parametrize("options", [
    {}, {"top_k": 1}, {"router": "sigmoid", "balance": "aux_free"}, {"shared": True, "n_experts": 8, "top_k": 3},
], ids=["softmax-top2", "top1", "sigmoid", "shared-8experts-top3"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "looped"])
def test_layer_matches_the_per_expert_reference(options, grouped):
    layer = moe_layer(**options)
    layer.experts.allow_grouped_mm = grouped
    x = torch.randn(3, 7, DIM)
    assert_close(grads_of(layer, x, layer), grads_of(layer, x, lambda x: reference_forward(layer, x)))


@pytest.mark.skipif(not grouped_mm_works(torch.device("cpu"), torch.float32), reason="no working torch._grouped_mm")
def test_fallback_matches_grouped_mm_forward_and_backward():
    sizes = [5, 0, 11, 1]
    x = torch.randn(sum(sizes), DIM, requires_grad=True)
    weight = torch.randn(4, FFN, DIM, requires_grad=True)
    grad = torch.randn(sum(sizes), FFN)
    results = []
    for linear in (lambda: grouped_linear(x, weight, torch.tensor(sizes).cumsum(0).int()),
                   lambda: looped_linear(x, weight, sizes)):
        x.grad = weight.grad = None
        out = linear()
        out.backward(grad)
        results.append((out.detach(), x.grad.clone(), weight.grad.clone()))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert torch.all(results[0][2][1] == 0)  # the empty group's weight has no gradient


def test_compiled_layer_gives_the_eager_gradients_routing_losses_included():
    # Compiled, then recompiled with a sum over token shards (run outside the graph, as the
    # collectives are): the routing losses' gradient must survive both (the output's is zeroed
    # to leave theirs alone).
    layer = moe_layer(aux_loss_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(2, 8, DIM)
    compiled = torch.compile(layer.forward)

    def router_grad(forward):
        layer.zero_grad()
        (forward(x) * 0).sum().backward()
        return layer.router.weight.grad.clone()

    for shards in (None, torch.compiler.disable(lambda t: t * 1.0)):
        layer.sum_over_token_shards = shards
        eager = router_grad(layer.forward)
        assert eager.abs().max() > 0
        torch.testing.assert_close(router_grad(compiled), eager, rtol=1e-5, atol=1e-6)


def test_layer_under_bfloat16_autocast_tracks_float32():
    layer = moe_layer(shared=True)
    x = torch.randn(2, 8, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    full = layer(x)
    assert ((low.float() - full).norm() / full.norm()).item() < 2e-2


def test_output_matches_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    layer = moe_layer(n_experts=8)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=DIM, intermediate_size=FFN, num_local_experts=8,
                                                num_experts_per_tok=2))
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([layer.experts.w1, layer.experts.w3], dim=1))
        block.experts.down_proj.copy_(layer.experts.w2)
    x = torch.randn(2, 9, DIM)
    torch.testing.assert_close(layer(x), block(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# In the model and the Trainer


def moe_sections(tmp_path, **moe):
    sections = tiny_sections(tmp_path / "run", train={"steps": 12, "global_batch": 8, "micro_batch": 4})
    sections["model"]["moe"] = {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32, "n_shared_experts": 1,
                                "first_dense_layers": 1, **moe}
    return sections


def test_model_counts_every_expert_and_keeps_dense_layers_first(tmp_path):
    cfg = config_from_dict(moe_sections(tmp_path)).model
    model = build_llama(cfg, "cpu")
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    assert type(model.layers["0"].feed_forward) is FeedForward and type(model.layers["1"].feed_forward) is MoE
    active = num_params(cfg, active=True)
    assert num_params(cfg) - active == 2 * 3 * 64 * 32  # the two experts a token skips in layer 1


def train(tmp_path, sections) -> list[dict]:
    from angelptm.train.trainer import Trainer

    Trainer(config_from_dict(sections)).fit()
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("moe", [
    {"z_loss_coef": 0.001, "capacity_factor": 1.0},
    {"router": "sigmoid", "balance": "aux_free", "bias_update_rate": 0.01},
], ids=["softmax-capacity", "sigmoid-aux_free"])
def test_moe_model_trains_through_the_trainer(tmp_path, own_process_group, moe):
    records = train(tmp_path, moe_sections(tmp_path, **moe))
    assert len(records) == 12 and records[-1]["loss"] < records[0]["loss"] - 0.5
    for r in records:
        assert r["moe_max_load"] >= 1.0 and r["moe_dropped"] >= 0 and math.isfinite(r["moe_aux_loss"])
    if moe.get("capacity_factor"):
        assert any(r["moe_dropped"] > 0 for r in records) and all(r["moe_aux_loss"] > 0 for r in records)
    else:
        assert all(r["moe_aux_loss"] == 0 and r["moe_dropped"] == 0 for r in records)


def test_aux_free_run_resumes_exactly_with_its_biases(tmp_path, own_process_group):
    from angelptm.train.trainer import Trainer

    sections = moe_sections(tmp_path, router="sigmoid", balance="aux_free", bias_update_rate=0.01)
    whole = {r["step"]: r["loss"] for r in train(tmp_path, sections)}
    sections["train"].update(output_dir=str(tmp_path / "cut"), ckpt_every=6)
    Trainer(config_from_dict(sections)).fit(until=6)
    torch.distributed.destroy_process_group()
    resumed = Trainer(config_from_dict(sections))
    assert resumed.step == 6 and resumed.model.layers["1"].feed_forward.router.expert_bias.abs().sum() > 0
    resumed.fit()
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in records if r["step"] > 6} == {s: v for s, v in whole.items() if s > 6}


def test_dense_records_have_no_moe_fields(tmp_path, own_process_group):
    sections = tiny_sections(tmp_path / "run", train={"steps": 1})
    assert not any(key.startswith("moe_") for key in train(tmp_path, sections)[0])


@pytest.mark.slow
def test_data_parallel_moe_matches_single_process():
    from angelptm.distributed.parity import TINY_JOB, compare, run_layout

    job = {**TINY_JOB, "model": {**TINY_JOB["model"], "moe": {
        "n_experts": 4, "top_k": 2, "expert_ffn_dim": 32, "n_shared_experts": 1, "z_loss_coef": 0.001}}}
    reference = run_layout(world_size=1, job=job)
    for zero_stage in (0, 3):
        loss_diff, weight_diff = compare(run_layout({"dp": 2}, 2, job, [f"zero.stage={zero_stage}"]), reference)
        assert loss_diff < 1e-4 and weight_diff < 1e-4, (zero_stage, loss_diff, weight_diff)


@pytest.mark.parametrize("setting, key", [
    ("model.moe.top_k=5", "model.moe.top_k=5"),
    ("model.moe.n_experts=-1", "model.moe.n_experts=-1"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor"),
    ("model.moe.first_dense_layers=2", "model.moe.first_dense_layers=2"),
    ("model.moe.aux_loss_coef=-1", "model.moe.aux_loss_coef"),
    ("model.moe.balance=aux_fre", "did you mean aux_free"),
    ("parallel.tp=2 model.moe.capacity_factor=1.5", "split them; set model.moe.capacity_factor=null"),
])
def test_bad_moe_config_is_a_one_line_error(tmp_path, setting, key):
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(moe_sections(tmp_path), setting.split())
    assert key in one_line(str(excinfo.value))
