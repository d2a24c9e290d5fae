"""LoRA in the planner (`finetune.lora.rank > 0`): the adapters' sizes on one tensor-parallel rank and
their GEMMs, as `angelptm.finetune.lora` builds and runs them.

Every base weight is frozen: ZeROCache keeps it in pages without gradients or optimizer state
(`angelptm.planning.zero`), backward multiplies by it for the input gradient but computes no weight
gradient. Each targeted projection of each block gains A (rank × in) and B (out × rank), split over
tp like the projection: column-parallel (wq wk wv w1 w3) keep A whole and their rows of B,
row-parallel (wo w2) their columns of A and B whole. Only llama-architecture blocks take adapters.
"""

from __future__ import annotations

from angelptm.config import Config
from angelptm.errors import UserError
from angelptm.planning.model import ModelShape

BLOCK_ORDER = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # as the block registers its projections
ROW_PARALLEL = ("wo", "w2")


def lora_rank(cfg: Config) -> int:
    """The adapters' rank; 0 for full fine-tuning."""
    return cfg.finetune.lora.rank


def adapter_params(m: ModelShape, cfg: Config, tp: int) -> tuple[int, ...]:
    """Sizes of one block's adapters on one tp rank, A then B of each target in registration order;
    empty for full fine-tuning."""
    rank = lora_rank(cfg)
    if not rank:
        return ()
    if m.arch != "llama":
        raise UserError(f"finetune.lora.rank={rank}: adapters are built for model.arch=llama only (got {m.arch}); "
                        "set finetune.lora.rank=0 for full fine-tuning")
    h, heads, ffn = m.dim, m.q_dim, m.ffn_dim
    kv = m.kv_heads_per_rank(tp) * m.head_dim
    # (input width, output width on this rank for a column-parallel weight / input width on this
    # rank for a row-parallel one, output width)
    local = {"wq": (h, heads // tp), "wk": (h, kv), "wv": (h, kv), "w1": (h, ffn // tp), "w3": (h, ffn // tp),
             "wo": (heads // tp, h), "w2": (ffn // tp, h)}
    sizes: list[int] = []
    for target in BLOCK_ORDER:
        if target in cfg.finetune.lora.targets:
            width_in, width_out = local[target]
            sizes += [rank * width_in, width_out * rank]
    return tuple(sizes)


def adapter_full_numel(m: ModelShape, cfg: Config) -> int:
    """All adapter elements of one block, unsplit."""
    return sum(adapter_params(m, cfg, 1))


def flops_per_token(m: ModelShape, cfg: Config, seq_len: int) -> float:
    """Model FLOPs per trained token (PaLM's convention, as `ModelShape.flops_per_token`): a frozen
    weight costs 4 per element (forward and input gradient, no weight gradient), an adapter 6."""
    full = m.flops_per_token(seq_len)
    if not lora_rank(cfg):
        return full
    frozen_gemm = m.gemm_weights_per_token + m.vocab_size * m.dim
    return full - 2.0 * frozen_gemm + 6.0 * m.n_layers * adapter_full_numel(m, cfg)
