"""Llama model: shapes, parameter count, GQA and tied variants, exact causality, seeded layout-free init,
rotary positions, and activation checkpointing that changes nothing but memory."""

import pytest
import torch
import torch.nn.functional as F

from angelptm.config import ModelConfig, config_from_dict
from angelptm.distributed.parallelize import apply_activation_checkpointing, materialize
from angelptm.models.llama import build_llama, num_params

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def model_config(**changes) -> ModelConfig:
    return config_from_dict({"model": dict(TINY_MODEL, **changes), "train": {"seq_len": 32}}).model


def seeded_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    model = build_llama(cfg, "cpu")
    model.init_weights(seed)
    return model


def tokens(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_MODEL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def unique_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


VARIANTS = {
    "gqa": {},
    "mha": {"n_kv_heads": None},
    "mqa": {"n_kv_heads": 1},
    "tied": {"tie_embeddings": True},
    "no-ffn-dim": {"ffn_dim": None, "n_layers": 3},
}


# ---------------------------------------------------------------------------------------------
# Shapes and sizes


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_logits_shape_and_parameter_count(variant):
    cfg = model_config(**VARIANTS[variant])
    model = seeded_model(cfg)
    logits = model(tokens(batch=3, seq=11))
    assert logits.shape == (3, 11, cfg.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert unique_parameter_count(model) == num_params(cfg)


def test_gqa_projections_have_kv_head_width():
    cfg = model_config(n_kv_heads=2)
    attention = build_llama(cfg, "meta").layers["0"].attention
    head_dim = cfg.dim // cfg.n_heads
    assert attention.wq.weight.shape == (cfg.n_heads * head_dim, cfg.dim)
    assert attention.wk.weight.shape == attention.wv.weight.shape == (2 * head_dim, cfg.dim)


@torch.no_grad()
def test_gqa_equals_multi_head_attention_with_each_kv_head_repeated():
    """Query head h reads kv head h // (n_heads / n_kv_heads), as in Hugging Face Llama."""
    gqa_cfg, mha_cfg = model_config(n_kv_heads=2), model_config(n_kv_heads=None)
    gqa, mha = seeded_model(gqa_cfg), build_llama(mha_cfg, "cpu")
    head_dim, groups = gqa_cfg.dim // gqa_cfg.n_heads, gqa_cfg.n_heads // gqa_cfg.n_kv_heads
    state = {}
    for name, value in gqa.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            value = value.view(-1, head_dim, gqa_cfg.dim).repeat_interleave(groups, dim=0).reshape(-1, gqa_cfg.dim)
        state[name] = value
    mha.load_state_dict(state)
    x = tokens()
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_tied_model_shares_one_tensor_and_both_uses_reach_its_gradient():
    model = seeded_model(model_config(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    model(tokens()).sum().backward()
    grad = model.tok_embeddings.weight.grad
    # Rows of tokens that never appear in the input still get gradient from the output head.
    unused = torch.ones(grad.shape[0], dtype=torch.bool)
    unused[tokens().unique()] = False
    assert grad[unused].abs().sum() > 0
    assert grad[~unused].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Causality


@torch.no_grad()
@pytest.mark.parametrize("variant", ["gqa", "mha"])
def test_changing_a_later_token_changes_no_earlier_logit(variant):
    model = seeded_model(model_config(**VARIANTS[variant])).eval()
    x = tokens(batch=2, seq=12)
    base = model(x)
    for t in range(x.shape[1] - 1):
        changed = x.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % TINY_MODEL["vocab_size"]
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"logits at positions <= {t} changed"
        assert not torch.equal(out[:, t + 1], base[:, t + 1])  # the changed position itself does change


# ---------------------------------------------------------------------------------------------
# Initialisation


def test_init_is_the_same_built_on_meta_then_materialised_or_built_on_cpu():
    cfg = model_config()
    direct = seeded_model(cfg, seed=7)
    torch.manual_seed(12345)  # the global RNG must not matter
    torch.randn(1000)
    meta = materialize(build_llama(cfg, "meta"), torch.device("cpu"), seed=7)
    direct_state, meta_state = direct.state_dict(), meta.state_dict()
    assert direct_state.keys() == meta_state.keys()
    for name in direct_state:
        assert torch.equal(direct_state[name], meta_state[name]), name


def test_init_does_not_depend_on_construction_order_or_other_models():
    cfg, bigger = model_config(), model_config(n_layers=3)
    first = seeded_model(cfg, seed=3)
    big = seeded_model(bigger, seed=3)  # built in between, with more layers
    second = seeded_model(cfg, seed=3)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    # A parameter's value depends on its name, not on how many others were drawn before it.
    assert torch.equal(first.layers["1"].feed_forward.w1.weight, big.layers["1"].feed_forward.w1.weight)
    assert torch.equal(first.output.weight, big.output.weight)


def test_different_seed_gives_different_weights():
    a, b = seeded_model(model_config(), seed=0), seeded_model(model_config(), seed=1)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        if name.endswith("norm.weight"):
            assert torch.equal(x, torch.ones_like(x)) and torch.equal(y, x)
        else:
            assert not torch.equal(x, y), name
            assert 0.001 < x.std().item() < 0.05, name  # small random values, not zeros or unit normals


def test_tie_weights_after_to_empty_restores_the_tie():
    cfg = model_config(tie_embeddings=True)
    model = build_llama(cfg, "meta")
    assert model.output.weight is model.tok_embeddings.weight
    model.to_empty(device="cpu")
    model.tie_weights()
    assert model.output.weight is model.tok_embeddings.weight
    materialised = materialize(build_llama(cfg, "meta"), torch.device("cpu"), seed=0)
    assert materialised.output.weight is materialised.tok_embeddings.weight
    assert unique_parameter_count(materialised) == num_params(cfg)


# ---------------------------------------------------------------------------------------------
# Rotary positions


@torch.no_grad()
def test_positions_arange_equals_the_default():
    model, x = seeded_model(model_config()), tokens(seq=20)
    assert torch.equal(model(x, torch.arange(20)), model(x))


@torch.no_grad()
def test_rope_depends_only_on_relative_positions_and_theta():
    model, x = seeded_model(model_config()), tokens(seq=20)
    base = model(x)
    # Shifting every position by the same offset leaves every attention score unchanged.
    torch.testing.assert_close(model(x, torch.arange(20) + 37), base, rtol=1e-4, atol=1e-4)
    # Other relative positions, or another theta, do change the output.
    assert not torch.allclose(model(x, torch.arange(20) * 2), base, atol=1e-3)
    other_theta = seeded_model(model_config(rope_theta=500.0))
    assert not torch.allclose(other_theta(x), base, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


def loss_and_grads(mode: str, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the number of attention calls (forward + recompute) of one step."""
    model = seeded_model(model_config())
    apply_activation_checkpointing(model, mode)
    calls = []
    attention = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    x = tokens(seq=32)
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_and_gives_the_same_loss_and_gradients(mode, monkeypatch):
    loss, grads, calls = loss_and_grads("none", monkeypatch)
    ckpt_loss, ckpt_grads, ckpt_calls = loss_and_grads(mode, monkeypatch)
    n_layers = TINY_MODEL["n_layers"]
    assert calls == n_layers and ckpt_calls == 2 * n_layers  # attention ran again in backward
    assert torch.equal(loss, ckpt_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)
