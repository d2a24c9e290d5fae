"""Sample text from a trained model: greedy at temperature 0, else temperature and top-k sampling.

Small and dependency-free on purpose: it recomputes the window at each step (no KV cache), which
is plenty for looking at what a model learned.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from angelptm.data import ByteTokenizer


@torch.no_grad()
def generate_ids(model: nn.Module, prompt: list[int], max_new_tokens: int, context: int,
                 temperature: float = 0.8, top_k: Optional[int] = 50, seed: int = 0,
                 stop_id: Optional[int] = None) -> list[int]:
    """Extend `prompt` by up to `max_new_tokens` ids, stopping early at `stop_id`."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(ids[:, -context:])[0, -1].float()
            if temperature == 0:
                next_id = logits.argmax()
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(-1), 1, generator=gen)[0]
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if stop_id is not None and next_id.item() == stop_id:
                break
    finally:
        model.train(was_training)
    return ids[0].tolist()


def generate_text(model: nn.Module, prompt: str, max_new_tokens: int, context: int,
                  temperature: float = 0.8, top_k: Optional[int] = 50, seed: int = 0, tokenizer=None) -> str:
    """The prompt followed by the model's continuation, decoded with `tokenizer` (default: bytes)."""
    tok = tokenizer or ByteTokenizer()
    # A tokenizer that starts texts with no BOS (GPT-2 style) starts from the document separator.
    prompt_ids = tok.encode(prompt, bos=True, eos=False) or [tok.eos_id]
    ids = generate_ids(model, prompt_ids, max_new_tokens, context, temperature, top_k, seed, stop_id=tok.eos_id)
    return tok.decode(ids)
