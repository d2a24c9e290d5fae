"""Token files: tokenize text files into a memory-mapped token stream with a JSON index, and open one safely.

A token file is two files sharing a prefix:
  <prefix>.bin   every document's token ids back to back, little-endian uint16 when the vocabulary
                 fits (<= 65536 ids), else uint32; a document is one source file, BOS + bytes + EOS;
  <prefix>.json  the index: dtype, number of tokens, document offsets, vocabulary size, tokenizer,
                 the SHA-256 of the .bin bytes, and the fingerprint of the sources it was built from;
and, for SFT data (`prepare --sft`), a third:
  <prefix>.mask  one uint8 per token, 1 where the token is a target that takes the loss (an assistant
                 token), recorded in the index with its SHA-256, its count of ones and the pad id.
Each is written under a temporary name and renamed into place, so a crash never leaves a half-written
file, and a reader that catches the pair mid-replacement sees a checksum mismatch, never wrong tokens.
`TokenFile` checks size and checksum on open; `cached_token_file` rebuilds a cache that is missing,
corrupt, truncated or built from other sources.
`token_file_writer` is the one writer of the format; `angelptm prepare` (prepare.py) writes through it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from angelptm.errors import UserError

log = logging.getLogger(__name__)

INDEX_FORMAT = "angelptm-tokens-1"
PathLike = Union[str, os.PathLike]


class TokenDataset:
    """A flat stream of token ids, with what identifies it: a checksum of the ids and the vocabulary size.

    `doc_offsets` are the positions where its documents start (one document unless told otherwise).
    SFT data also has `loss_mask` (1 where a token takes the loss as a target, indexed like `tokens`)
    and the `pad_id` that fills the rest of a row.
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int, tokenizer: str, checksum: str, name: str,
                 doc_offsets: Optional[Sequence[int]] = None, loss_mask: Optional[np.ndarray] = None,
                 pad_id: Optional[int] = None):
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.checksum = checksum
        self.name = name
        self.doc_offsets = [0] if doc_offsets is None else doc_offsets
        self.loss_mask = loss_mask
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.tokens)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned dtype that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def checksum(tokens: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(tokens).data).hexdigest()


def _paths(prefix: PathLike) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".json")


def mask_path(prefix: PathLike) -> Path:
    """Where an SFT token file keeps its loss mask."""
    return Path(prefix).with_name(Path(prefix).name + ".mask")


class TokenFile(TokenDataset):
    """A token file opened read-only as a numpy memmap, after checking it against its index."""

    def __init__(self, prefix: PathLike):
        bin_path, index_path = _paths(prefix)
        fix = "rebuild it with angelptm.data.build_token_file"
        for path in (index_path, bin_path):
            if not path.is_file():
                raise UserError(f"token file {prefix} is incomplete: {path} is missing; {fix}")
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != INDEX_FORMAT:
                raise ValueError(index.get("format"))
            dtype = np.dtype(index["dtype"]).newbyteorder("<")
            num_tokens, vocab_size = int(index["num_tokens"]), int(index["vocab_size"])
            if num_tokens <= 0 or dtype != token_dtype(vocab_size):
                raise ValueError(index)
            expected_checksum, tokenizer = str(index["checksum"]), str(index["tokenizer"])
            doc_offsets, fingerprint = list(index["doc_offsets"]), str(index["source_fingerprint"])
            mask_checksum = None if index.get("loss_mask") is None else str(index["loss_mask"]["checksum"])
            pad_id = None if index.get("pad_id") is None else int(index["pad_id"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise UserError(f"token index {index_path} is corrupt or from another format; {fix}") from None
        size, expected = bin_path.stat().st_size, num_tokens * dtype.itemsize
        if size != expected:
            raise UserError(
                f"token file {bin_path} is truncated or corrupt ({size} bytes, its index says {expected}); {fix}"
            )
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))
        digest = checksum(tokens)
        if digest != expected_checksum:
            raise UserError(f"token file {bin_path} does not match the checksum in its index; {fix}")
        loss_mask = None if mask_checksum is None else _open_mask(mask_path(prefix), num_tokens, mask_checksum, fix)
        super().__init__(tokens, vocab_size, tokenizer, digest, name=str(prefix), doc_offsets=doc_offsets,
                         loss_mask=loss_mask, pad_id=pad_id)
        self.prefix = Path(prefix)
        self.source_fingerprint = fingerprint


def _open_mask(path: Path, num_tokens: int, expected_checksum: str, fix: str) -> np.ndarray:
    """The loss mask an index names, checked as the tokens are: present, one byte per token, same checksum."""
    if not path.is_file():
        raise UserError(f"token file {path.with_suffix('')} is incomplete: {path} is missing; {fix}")
    if path.stat().st_size != num_tokens:
        raise UserError(f"loss mask {path} is truncated or corrupt ({path.stat().st_size} bytes, its index says "
                        f"{num_tokens}); {fix}")
    mask = np.memmap(path, dtype=np.uint8, mode="r", shape=(num_tokens,))
    if checksum(mask) != expected_checksum:
        raise UserError(f"loss mask {path} does not match the checksum in its index; {fix}")
    return mask


def list_documents(sources: Union[PathLike, Sequence[PathLike]], suffix: str = "",
                   skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """The files named by `sources`, folders walked recursively in sorted order.

    Hidden files and folders (a leading '.') are skipped, as are folders named in `skip_dirs`;
    inside a folder only names ending in `suffix` are kept. A file named directly is always kept.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_file():
            files.append(source)
            continue
        if not source.is_dir():
            raise UserError(f"{source} does not exist; pass text files or folders of them")
        found = []
        for folder, dirnames, filenames in os.walk(source):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
            found += [Path(folder, f) for f in filenames if not f.startswith(".") and f.endswith(suffix)]
        files += sorted((f for f in found if f.is_file()), key=lambda f: f.relative_to(source).parts)
    return files


def source_fingerprint(files: Sequence[Path], tokenizer, extra: Optional[dict] = None) -> str:
    """A digest of what a build depends on: each file's path, size and mtime, the tokenizer, `extra`."""
    digest = hashlib.sha256(json.dumps(
        {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "extra": extra or {}}, sort_keys=True
    ).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return "sha256:" + digest.hexdigest()


@contextlib.contextmanager
def _atomic_write(path: Path) -> Iterator:
    """A binary file that appears at `path` complete (flushed, fsynced, renamed) or not at all."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache should be readable by all
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class TokenFileWriter:
    """Appends token ids to a new token file; `token_file_writer` makes the pair appear on success only."""

    def __init__(self, out, vocab_size: int, mask_out=None):
        self._out, self._mask_out = out, mask_out
        self.dtype = token_dtype(vocab_size)
        self.digest = hashlib.sha256()
        self.mask_digest = hashlib.sha256()
        self.doc_offsets: list[int] = []
        self.num_tokens = 0
        self.loss_tokens = 0

    def write(self, ids: np.ndarray, doc_starts: Sequence[int] = (0,), loss_mask: Optional[np.ndarray] = None) -> None:
        """Append `ids`; `doc_starts` are the positions in `ids` where a document begins; `loss_mask`
        (one 0/1 per id) is required by a writer of SFT data and refused by any other."""
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        if (loss_mask is None) != (self._mask_out is None):
            raise ValueError("a loss mask goes with every write to an SFT token file, and to no other")
        if loss_mask is not None:
            mask = np.ascontiguousarray(loss_mask, dtype=np.uint8)
            if mask.shape != ids.shape:
                raise ValueError(f"a loss mask of shape {mask.shape} for ids of shape {ids.shape}")
            self.loss_tokens += int(np.count_nonzero(mask))
            self.mask_digest.update(mask.data)
            self._mask_out.write(mask.data)
        self.doc_offsets.extend(self.num_tokens + int(start) for start in doc_starts)
        self.num_tokens += ids.size
        self.digest.update(ids.data)
        self._out.write(ids.data)


@contextlib.contextmanager
def token_file_writer(prefix: Path, tokenizer, fingerprint: str, loss_mask: bool = False) -> Iterator[TokenFileWriter]:
    """A writer whose `<prefix>.bin` and `<prefix>.json` (and with `loss_mask`, `<prefix>.mask`) appear,
    complete, when the block ends without an error; on an error none is written (older ones stay as they were).
    The index is written last: a reader never finds an index naming ids or a mask that are not there."""
    bin_path, index_path = _paths(prefix)
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        masking = _atomic_write(mask_path(prefix)) if loss_mask else contextlib.nullcontext()
        with _atomic_write(bin_path) as out, masking as mask_out:
            writer = TokenFileWriter(out, tokenizer.vocab_size, mask_out)
            yield writer
        index = {
            "format": INDEX_FORMAT,
            "dtype": writer.dtype.name,
            "num_tokens": writer.num_tokens,
            "num_docs": len(writer.doc_offsets),
            "doc_offsets": writer.doc_offsets,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.name,
            "checksum": "sha256:" + writer.digest.hexdigest(),
            "source_fingerprint": fingerprint,
        }
        if loss_mask:
            index["loss_mask"] = {"dtype": "uint8", "checksum": "sha256:" + writer.mask_digest.hexdigest(),
                                  "loss_tokens": writer.loss_tokens}
            index["pad_id"] = tokenizer.pad_id
        with _atomic_write(index_path) as out:
            out.write(json.dumps(index).encode())
    except UserError:
        raise
    except OSError as e:
        raise UserError(
            f"cannot write token file {prefix} ({e.strerror}); choose a writable folder "
            "(the cache folder is set by ANGELPTM_CACHE)"
        ) from None


def read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); fix its permissions or leave it out") from None


def _write_token_file(files: Sequence[Path], prefix: Path, tokenizer, fingerprint: str) -> TokenFile:
    if not files:
        raise UserError(f"no files to tokenize into {prefix}; pass text files or folders that hold some")
    with token_file_writer(prefix, tokenizer, fingerprint) as writer:
        for path in files:
            writer.write(tokenizer.encode_bytes(read_file_bytes(path)))
    return TokenFile(prefix)


def build_token_file(sources: Union[PathLike, Sequence[PathLike]], out_prefix: PathLike, tokenizer,
                     extra_fingerprint: Optional[dict] = None) -> TokenFile:
    """Tokenize text files and folders into `<out_prefix>.bin` + `<out_prefix>.json` and open the result."""
    files = list_documents(sources)
    fingerprint = source_fingerprint(files, tokenizer, extra_fingerprint)
    return _write_token_file(files, Path(out_prefix), tokenizer, fingerprint)


def cached_token_file(files: Sequence[Path], prefix: PathLike, tokenizer,
                      extra_fingerprint: Optional[dict] = None) -> TokenFile:
    """The token file at `prefix` if it is intact and was built from exactly `files`; else build it there.

    Building is deterministic, so processes that race to fill the same cache write identical bytes.
    """
    fingerprint = source_fingerprint(files, tokenizer, extra_fingerprint)
    try:
        cached = TokenFile(prefix)
        if cached.source_fingerprint == fingerprint:
            return cached
        reason = "its sources changed"
    except UserError as e:
        reason = str(e).split(";")[0] if any(path.exists() for path in _paths(prefix)) else "first use"
    log.info("building token cache %s (%s)", prefix, reason)
    return _write_token_file(files, Path(prefix), tokenizer, fingerprint)
