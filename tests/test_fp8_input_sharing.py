"""Layers that read the same tensor (wq, wk, wv; w1, w3) cast it to FP8 once, with results identical to
casting it per layer, and the shared copies are released with the tensor."""

import gc
import weakref

import pytest
import torch

from angelptm.config import ModelConfig
from angelptm.fp8 import Float8Linear, convert_to_float8
from angelptm.models.llama import build_llama

SHARING = ["tensorwise", "rowwise", "blockwise"]


def count_input_casts(monkeypatch) -> list:
    calls = []
    original = Float8Linear.quantize

    def counting(self, role, x, **kwargs):
        if role == "input":
            calls.append(role)
        return original(self, role, x, **kwargs)
    monkeypatch.setattr(Float8Linear, "quantize", counting)
    return calls


def siblings(recipe: str, n: int = 3) -> list[Float8Linear]:
    torch.manual_seed(0)
    # Outputs 80, 96, ...: the weights' transposed copies are (128, 80+), an input's of 64 tokens (128, 64).
    return [Float8Linear(128, 80 + 16 * i, bias=False, recipe=recipe) for i in range(n)]


def run(layers, inputs):
    """Forward each layer on its input, backward through all; outputs and every gradient."""
    outs = [layer(x) for layer, x in zip(layers, inputs)]
    sum((o.float() * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs).backward()
    return outs, [layer.weight.grad for layer in layers]


@pytest.mark.parametrize("recipe", SHARING)
def test_layers_reading_one_tensor_cast_it_once_with_the_same_results(recipe, monkeypatch):
    # 40 tokens: not a multiple of 16, so the shared cast is the padded one.
    x = torch.randn(2, 20, 128, requires_grad=True)
    separate = [x.detach().clone().requires_grad_() for _ in range(3)]
    want_outs, want_grads = run(siblings(recipe), separate)
    calls = count_input_casts(monkeypatch)
    got_outs, got_grads = run(siblings(recipe), [x] * 3)
    assert calls == ["input"]
    for got, want in zip(got_outs + got_grads, want_outs + want_grads):
        assert torch.equal(got, want)
    torch.testing.assert_close(x.grad, sum(s.grad for s in separate), rtol=1e-6, atol=1e-6)


def test_the_shared_cast_is_saved_once_for_the_weight_gradients():
    x = torch.randn(64, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        [layer(x) for layer in siblings("tensorwise")]
    fp8 = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.float8_e4m3fn and t.shape == (128, 64)}
    assert len(fp8) == 1  # one transposed input copy, not three


def test_a_changed_tensor_or_another_recipe_casts_again(monkeypatch):
    calls = count_input_casts(monkeypatch)
    x = torch.randn(64, 128)
    first, second = siblings("tensorwise", 2)
    first(x)
    x.mul_(3.0)  # in place: same tensor, new version
    got = second(x)
    assert calls == ["input", "input"]
    calls.clear()
    assert torch.equal(second(x), got) and calls == []  # unchanged since its last cast
    siblings("rowwise", 1)[0](x)
    assert calls == ["input"]
    assert torch.equal(got, Float8Linear.from_linear(second, "tensorwise")(x.clone()))


def test_delayed_scaling_layers_record_their_own_amax(monkeypatch):
    calls = count_input_casts(monkeypatch)
    x = torch.randn(64, 128) * 5
    layers = siblings("delayed", 2)
    for layer in layers:
        layer(x)
    assert calls == ["input", "input"]
    for layer in layers:
        assert layer.input_scale.amax_history[0] == x.abs().max()


def test_the_shared_copies_go_with_the_tensor():
    layer = siblings("tensorwise", 1)[0]
    x = torch.randn(64, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(weakref.ref(t)) or t, lambda t: t):
        y = layer(x)
    inputs_copies = [ref for ref in saved if ref() is not None and ref().shape == (128, 64)]
    assert inputs_copies
    del y, x
    gc.collect()
    assert all(ref() is None for ref in inputs_copies)


def test_a_llama_casts_each_block_input_once_per_reading_module(monkeypatch):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=96, max_seq_len=32)
    model = convert_to_float8(build_llama(cfg, "cpu"), "tensorwise")
    calls = count_input_casts(monkeypatch)
    model(torch.randint(96, (2, 16))).sum().backward()
    # Per block: wq/wk/wv share one cast, wo one, w1/w3 one, w2 one: 4 of 7.
    assert len(calls) == 4 * cfg.n_layers
