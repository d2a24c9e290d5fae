"""Data for training: a byte tokenizer, memory-mapped token files, the sources, blends, a stateless sampler.

The trainer calls `build_datasets(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)` for the training
and validation data and wraps each in `build_sampler(data, seq_len, global_batch, seed=cfg.data.seed,
data_cfg=cfg.data)`, which picks the sampler data.format and data.pack name (angelptm.data.packing).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Union

from angelptm.config import DataConfig
from angelptm.data.blend import Blend, BlendSampler
from angelptm.data.builder import TokenDataset, TokenFile, build_token_file, cached_token_file, list_documents
from angelptm.data.holdout import hold_out
from angelptm.data.megatron import MegatronDataset, megatron_dataset
from angelptm.data.packing import PackedSFTSampler, PackedTextSampler, SFTSampler
from angelptm.data.sampler import TokenSampler, count_windows
from angelptm.data.sources import cache_dir, stdlib_dataset, synthetic_dataset, text_dataset, tokens_dataset
from angelptm.data.tokenizer import ByteTokenizer
from angelptm.data.tokenizers import Tokenizer, load_tokenizer
from angelptm.errors import UserError


def open_source(source: str, path: Optional[str], seed: int, vocab_size: int,
                tokenizer: Optional[Tokenizer] = None) -> TokenDataset:
    """The token stream of one data source (`data.source` + `data.path`, or one entry of a blend);
    `tokenizer` (default: bytes) tokenizes the stdlib and text sources."""
    if source == "stdlib":
        return stdlib_dataset(tokenizer=tokenizer)
    if source == "text":
        return text_dataset(path, tokenizer)
    if source == "tokens":
        return tokens_dataset(path)
    if source == "megatron":
        return megatron_dataset(path)
    return synthetic_dataset(seed, vocab_size=vocab_size)


def _checked(dataset: Union[TokenDataset, Blend], seq_len: int, vocab_size: int, tokenizer: Tokenizer,
             spec: str, sft: bool = False) -> Union[TokenDataset, Blend]:
    for part in dataset.datasets if isinstance(dataset, Blend) else [dataset]:
        # Token files name the tokenizer that made them ("byte" or "hf-<hash of its files>"); Megatron
        # and synthetic ids name none. Ids from another tokenizer would train, but every decode (the
        # run's samples, `generate`) would read them as the wrong words.
        made_by_a_tokenizer = part.tokenizer == "byte" or part.tokenizer.startswith("hf-")
        if made_by_a_tokenizer and part.tokenizer != tokenizer.name:
            raise UserError(f"{part.name} was tokenized with another tokenizer ({part.tokenizer}) than "
                            f"data.tokenizer={spec} ({tokenizer.name}); set data.tokenizer to the one it was "
                            "prepared with, or prepare it again with this one")
        if part.vocab_size > vocab_size:
            raise UserError(
                f"model.vocab_size={vocab_size} is smaller than the {part.tokenizer} tokenizer's "
                f"{part.vocab_size} ids in {part.name}; set model.vocab_size={part.vocab_size} or more"
            )
        if not sft:
            count_windows(part, seq_len)
        elif part.loss_mask is None:  # an SFT sample may be shorter than a row, but it needs its mask
            raise UserError(f"data.format=sft needs a token file written by `angelptm prepare --sft`; {part.name} "
                            "has no loss mask: prepare it with --sft, or set data.format=text")
    return dataset


def _exists(path: str) -> bool:
    """Whether `path` names a file or folder, or is the prefix of one (PREFIX.bin, .json, .idx)."""
    where = Path(path).expanduser()
    return where.exists() or any(where.with_name(where.name + s).exists() for s in (".bin", ".json", ".idx"))


def _open(entries: Union[str, list], key: str, seed: int, vocab_size: int,
          tokenizer: Optional[Tokenizer] = None) -> Union[TokenDataset, Blend]:
    """A `data.valid` prefix (a Megatron pair if PREFIX.idx is there, else a token file) or a blend list."""
    if isinstance(entries, str):
        if not _exists(entries):
            raise UserError(f"{key}={entries} does not exist; pass the prefix of a token file (PREFIX.bin + "
                            "PREFIX.json) or of a Megatron-LM pair (PREFIX.bin + PREFIX.idx)")
        prefix = Path(entries).expanduser()
        is_megatron = prefix.with_name(prefix.name + ".idx").exists() or prefix.suffix == ".idx"
        return open_source("megatron" if is_megatron else "tokens", entries, seed, vocab_size)
    for i, entry in enumerate(entries):
        if entry.path is not None and not _exists(entry.path):
            raise UserError(f"{key}[{i}].path={entry.path} does not exist; point it at the {entry.source} data "
                            "(a file, folder or PREFIX of PREFIX.bin)")
    return Blend([open_source(e.source, e.path, seed, vocab_size, tokenizer) for e in entries],
                 [e.weight for e in entries])


def build_datasets(data_cfg: DataConfig, seq_len: int,
                   vocab_size: int) -> tuple[Union[TokenDataset, Blend], Optional[Union[TokenDataset, Blend]]]:
    """(training data, validation data or None) as `data_cfg` names them, checked against the model's
    vocabulary and the sequence length; `data.valid_fraction` splits the training documents."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    if data_cfg.tokenizer != "byte" and tokenizer.vocab_size > vocab_size:
        raise UserError(f"model.vocab_size={vocab_size} is smaller than data.tokenizer={data_cfg.tokenizer}'s "
                        f"{tokenizer.vocab_size} ids; set model.vocab_size={tokenizer.vocab_size} or more")
    if data_cfg.format == "sft" and (data_cfg.sources or isinstance(data_cfg.valid, list)):
        raise UserError("data.format=sft reads one token file, not a blend (data.sources, or a list in data.valid); "
                        "prepare the SFT inputs together with `angelptm prepare --sft` and set data.path")
    if data_cfg.sources:
        train = _open(data_cfg.sources, "data.sources", data_cfg.seed, vocab_size, tokenizer)
    else:
        train = open_source(data_cfg.source, data_cfg.path, data_cfg.seed, vocab_size, tokenizer)
    valid = None if data_cfg.valid is None else _open(data_cfg.valid, "data.valid", data_cfg.seed, vocab_size,
                                                      tokenizer)
    if data_cfg.valid_fraction > 0:
        parts = train.datasets if isinstance(train, Blend) else [train]
        kept, held = zip(*(hold_out(part, data_cfg.valid_fraction) for part in parts))
        train, valid = (Blend(kept, train.weights), Blend(held, train.weights)) if isinstance(train, Blend) \
            else (kept[0], held[0])
    check = functools.partial(_checked, seq_len=seq_len, vocab_size=vocab_size, tokenizer=tokenizer,
                              spec=data_cfg.tokenizer, sft=data_cfg.format == "sft")
    return check(train), None if valid is None else check(valid)


def build_dataset(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> Union[TokenDataset, Blend]:
    """The training data `data_cfg` names (see `build_datasets`)."""
    return build_datasets(data_cfg, seq_len, vocab_size)[0]


def build_sampler(dataset: Union[TokenDataset, Blend], seq_len: int, global_batch: int, seed: int,
                  data_cfg: Optional[DataConfig] = None):
    """The sampler that reads `dataset`'s rows for each step: windows of the token stream (a blend's by
    weight), packed with document boundaries under data.pack, or SFT samples under data.format=sft.
    Every one hands the trainer `microbatch(step, start, count) -> Rows`."""
    data_cfg = data_cfg or DataConfig()
    if isinstance(dataset, Blend):
        if data_cfg.pack or data_cfg.format == "sft":
            raise UserError("data.pack=true and data.format=sft read one dataset, not a blend (data.sources); "
                            "set data.pack=false, or train on one token file")
        return BlendSampler(dataset, seq_len, global_batch, seed)
    if data_cfg.format == "sft":
        sampler = PackedSFTSampler if data_cfg.pack else SFTSampler
        return sampler(dataset, seq_len, global_batch, seed, overlong=data_cfg.overlong)
    if data_cfg.pack:
        return PackedTextSampler(dataset, seq_len, global_batch, seed)
    return TokenSampler(dataset, seq_len, global_batch, seed)


__all__ = [
    "Blend", "BlendSampler", "ByteTokenizer", "MegatronDataset", "PackedSFTSampler", "PackedTextSampler",
    "SFTSampler", "TokenDataset", "TokenFile", "TokenSampler",
    "build_dataset", "build_datasets", "build_sampler", "build_token_file", "cache_dir", "cached_token_file",
    "hold_out", "list_documents", "load_tokenizer", "megatron_dataset", "open_source", "stdlib_dataset", "synthetic_dataset",
    "text_dataset", "tokens_dataset",
]
