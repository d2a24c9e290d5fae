"""A tiny Llama converted to FP8 learns like the same model in full precision (200 steps, every recipe)."""

import pytest
import torch
import torch.nn.functional as F

from angelptm.config import ModelConfig
from angelptm.fp8 import Float8Linear, convert_to_float8, update_float8_scales
from angelptm.models.llama import build_llama

pytestmark = pytest.mark.slow

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=64, max_seq_len=32)
STEPS, BATCH, SEQ = 200, 8, 32


def synthetic_batches(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """(STEPS, BATCH, SEQ + 1) tokens from a fixed random chain where each token has two equally
    likely successors: learnable down to ln 2 nats per token."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab_size, (vocab_size, 2), generator=gen)
    tokens = torch.empty(STEPS * BATCH, SEQ + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (STEPS * BATCH,), generator=gen)
    for t in range(1, SEQ + 1):
        coin = torch.randint(2, (STEPS * BATCH,), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], coin]
    return tokens.view(STEPS, BATCH, SEQ + 1)


def train_steps(model) -> list[float]:
    """Train `model` (FP8 or not) with AdamW on `synthetic_batches`, one thread; the loss of every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend on a shared machine
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        losses = []
        for batch in synthetic_batches(model.cfg.vocab_size):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_float8_scales(model)
            losses.append(loss.item())
        return losses
    finally:
        torch.set_num_threads(threads)


def train(recipe) -> list[float]:
    torch.manual_seed(0)
    model = build_llama(CFG, "cpu")
    model.init_weights(seed=0)
    if recipe is not None:
        convert_to_float8(model, recipe)
        assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 7 * CFG.n_layers
    return train_steps(model)


@pytest.fixture(scope="module")
def full_precision() -> list[float]:
    return train(None)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise", "blockwise"])
def test_fp8_training_ends_within_2_percent_of_full_precision(recipe, full_precision):
    losses = train(recipe)
    final, reference = sum(losses[-20:]) / 20, sum(full_precision[-20:]) / 20
    assert reference < 0.5 * full_precision[0], "the full-precision run must learn for the comparison to mean anything"
    assert abs(final - reference) / reference < 0.02, f"fp8 {final:.4f} vs full precision {reference:.4f}"
