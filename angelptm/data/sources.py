"""The four data sources: the stdlib corpus, a text path, a prebuilt token file, and synthetic text.

`stdlib` and `text` are tokenized once into a cache folder (`$ANGELPTM_CACHE`, else
~/.cache/angelptm) and rebuilt when their sources change or the cached file is damaged.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np

from angelptm.data.builder import TokenDataset, TokenFile, cached_token_file, checksum, list_documents
from angelptm.data.tokenizer import ByteTokenizer
from angelptm.data.tokenizers import Tokenizer
from angelptm.errors import UserError

# The stdlib corpus stops before the first file that would take it past this many bytes, in sorted
# order, so it stays a few tens of MB (CPython 3.11 without its tests is about 13 MB).
STDLIB_CAP_BYTES = 24 * 2**20
# Test suites hold deliberately broken and generated code; installed packages are not the stdlib.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SYNTHETIC_TOKENS = 2**20


def cache_dir() -> Path:
    return Path(os.environ.get("ANGELPTM_CACHE") or Path.home() / ".cache" / "angelptm").expanduser()


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def stdlib_files(cap_bytes: int = STDLIB_CAP_BYTES) -> list[Path]:
    """The running Python's standard-library .py files in sorted order, up to `cap_bytes` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in list_documents(root, suffix=".py", skip_dirs=STDLIB_SKIP_DIRS) if root.is_dir() else []:
        total += path.stat().st_size
        if total > cap_bytes:
            break
        files.append(path)
    return files


def stdlib_dataset(cap_bytes: int = STDLIB_CAP_BYTES, tokenizer: Optional[Tokenizer] = None) -> TokenFile:
    """The embedded default corpus: this Python's own standard library, tokenized (bytes by default) and cached."""
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(cap_bytes)
    if not files:
        raise UserError(f"this Python has no standard-library .py files under {root}; "
                        "set data.source=text and data.path=/path/to/text")
    tokenizer = tokenizer or ByteTokenizer()
    prefix = cache_dir() / f"stdlib-py{platform.python_version()}-{_short_hash(root)}-{tokenizer.name}" / "tokens"
    extra = {"python": platform.python_version(), "cap_bytes": cap_bytes}
    return cached_token_file(files, prefix, tokenizer, extra)


def text_dataset(path: str, tokenizer: Optional[Tokenizer] = None) -> TokenFile:
    """A text file, or every non-hidden file under a folder, tokenized (bytes by default) into a cache keyed
    by the path and the tokenizer."""
    source = Path(path).expanduser().resolve()  # one cache, and one fingerprint, whatever the working folder
    if not source.exists():
        raise UserError(f"data.path={path} does not exist; point it at a text file or a folder of text files")
    files = list_documents(source)
    if not files:
        raise UserError(f"data.path={path} holds no files; point it at a text file or a folder of text files")
    tokenizer = tokenizer or ByteTokenizer()
    prefix = cache_dir() / f"text-{_short_hash(str(source))}-{tokenizer.name}" / "tokens"
    return cached_token_file(files, prefix, tokenizer)


def tokens_dataset(path: str) -> TokenFile:
    """A prebuilt token file, named by its prefix or by its .bin or .json file."""
    prefix = Path(path).expanduser()
    if prefix.suffix in (".bin", ".json"):
        prefix = prefix.with_suffix("")
    if not any(prefix.with_name(prefix.name + s).exists() for s in (".bin", ".json")):
        raise UserError(f"data.path={path} does not exist; pass the prefix of a token file "
                        "(PREFIX.bin + PREFIX.json) written by angelptm.data.build_token_file")
    return TokenFile(prefix)


def synthetic_dataset(seed: int, num_tokens: int = SYNTHETIC_TOKENS,
                      vocab_size: int = ByteTokenizer.vocab_size) -> TokenDataset:
    """Text-like ids for tests: 64 random words of 2-7 letters, each followed by a space, in random order.

    Deterministic from the seed and learnable: once a word has begun its remaining letters follow,
    so the loss can fall from ln(vocab_size) towards ~0.7 nats per token (choosing the next word).
    With the byte tokenizer's vocabulary or more the ids are lowercase ASCII bytes (decodable text);
    a smaller vocabulary gets the same words over its own ids, the space as id 0 and the letters as
    ids 1 .. min(26, vocab_size - 1), so every id lies in [0, vocab_size).
    """
    rng = np.random.default_rng(seed)
    word_lens = rng.integers(3, 9, size=64)  # letters + the trailing space
    table = rng.integers(ord("a"), ord("z") + 1, size=int(word_lens.sum()), dtype=np.uint16)
    word_starts = np.cumsum(word_lens) - word_lens
    table[word_starts + word_lens - 1] = ord(" ")
    words = rng.integers(64, size=num_tokens // 3 + 1)  # every word has >= 3 bytes: enough of them
    lens = word_lens[words]
    ends = np.cumsum(lens)
    within = np.arange(ends[-1]) - np.repeat(ends - lens, lens)
    tokens = table[np.repeat(word_starts[words], lens) + within][:num_tokens]
    tokenizer = ByteTokenizer()
    if vocab_size >= tokenizer.vocab_size:
        return TokenDataset(tokens, tokenizer.vocab_size, tokenizer.name, checksum(tokens), f"synthetic(seed={seed})")
    letters = 1 + (tokens - ord("a")) % max(vocab_size - 1, 1)
    ids = (np.where(tokens == ord(" "), 0, letters) % vocab_size).astype(np.uint16)  # % for a vocabulary of 1
    return TokenDataset(ids, vocab_size, f"synthetic{vocab_size}", checksum(ids),
                        f"synthetic(seed={seed}, vocab_size={vocab_size})")
