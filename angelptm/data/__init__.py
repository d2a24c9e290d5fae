"""Data for training: a byte tokenizer, memory-mapped token files, the four sources, a stateless sampler.

The trainer calls `build_dataset(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)` and wraps
the result in `TokenSampler(dataset, seq_len, global_batch, seed=cfg.data.seed)`.
"""

from __future__ import annotations

from angelptm.config import DataConfig
from angelptm.data.builder import TokenDataset, TokenFile, build_token_file, cached_token_file, list_documents
from angelptm.data.sampler import TokenSampler, count_windows
from angelptm.data.sources import cache_dir, stdlib_dataset, synthetic_dataset, text_dataset, tokens_dataset
from angelptm.data.tokenizer import ByteTokenizer
from angelptm.errors import UserError


def build_dataset(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> TokenDataset:
    """The token stream `data_cfg` names, checked against the model's vocabulary and the sequence length."""
    if data_cfg.source == "stdlib":
        dataset = stdlib_dataset()
    elif data_cfg.source == "text":
        dataset = text_dataset(data_cfg.path)
    elif data_cfg.source == "tokens":
        dataset = tokens_dataset(data_cfg.path)
    else:
        dataset = synthetic_dataset(data_cfg.seed, vocab_size=vocab_size)
    if dataset.vocab_size > vocab_size:
        raise UserError(
            f"model.vocab_size={vocab_size} is smaller than the {dataset.tokenizer} tokenizer's "
            f"{dataset.vocab_size} ids in {dataset.name}; set model.vocab_size={dataset.vocab_size} or more"
        )
    count_windows(dataset, seq_len)
    return dataset


__all__ = [
    "ByteTokenizer", "TokenDataset", "TokenFile", "TokenSampler", "build_dataset", "build_token_file",
    "cache_dir", "cached_token_file", "list_documents", "stdlib_dataset", "synthetic_dataset",
    "text_dataset", "tokens_dataset",
]
