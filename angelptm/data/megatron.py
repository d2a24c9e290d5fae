"""Megatron-LM indexed datasets: read a `.bin` + `.idx` pair (MMapIndexedDataset) in place as a token stream.

The index, as Megatron-LM's `_IndexWriter` lays it out (little-endian):
  magic `MMIDIDX\\x00\\x00` (9 bytes), version uint64 (= 1), dtype code uint8, sequence count uint64,
  document count uint64, then sequence lengths int32[sequences], sequence byte pointers int64[sequences],
  document indices int64[documents] (the first sequence of each document, then the sequence count),
  and, for multimodal data only, sequence modes int8[sequences].
The `.bin` holds every sequence's ids back to back. It is memory-mapped with the dtype the index
names, never copied or converted, so a document is a slice of one flat stream as in a `TokenFile`.

The identity a checkpoint records is a digest of the index and the `.bin`'s size: hashing a
terabyte `.bin` at every start would take longer than many runs. A Megatron file does not record
its vocabulary, so the id range is scanned (a sequential read of the `.bin`) on the first open
only and kept in the cache folder under that identity and the `.bin`'s modification time; the
user's data folder is never written to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from angelptm.data.builder import TokenDataset
from angelptm.data.sources import cache_dir
from angelptm.errors import UserError

log = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron-LM's DType table. Its preprocessing writes uint16 (vocabularies under 65500 ids) or
# int32; any integer code holds token ids, the float codes do not.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
HEADER = np.dtype([("magic", "S9"), ("version", "<u8"), ("code", "u1"), ("sequences", "<u8"), ("documents", "<u8")])
SCAN_CHUNK = 2**26  # ids per step of the id-range scan: bounded memory whatever the file size


class MegatronDataset(TokenDataset):
    """The token stream of a Megatron-LM `.bin`/`.idx` pair, memory-mapped; `doc_offsets` in tokens."""

    def __init__(self, prefix: str):
        self.prefix = Path(prefix).expanduser()
        bin_path, idx_path = (self.prefix.with_name(self.prefix.name + s) for s in (".bin", ".idx"))
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise UserError(f"Megatron dataset {prefix}: {path} is missing; pass the prefix of a "
                                "PREFIX.bin + PREFIX.idx pair written by Megatron-LM's preprocess_data.py")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r") if idx_path.stat().st_size else np.zeros(0, np.uint8)
        dtype, lengths, pointers, documents = _parse_index(index, idx_path)
        tokens_total = int(lengths.sum(dtype=np.int64))
        expected = tokens_total * dtype.itemsize
        if bin_path.stat().st_size != expected:
            raise UserError(f"Megatron data file {bin_path} is truncated or corrupt ({bin_path.stat().st_size} bytes, "
                            f"its index {idx_path.name} says {expected}); rebuild the pair with preprocess_data.py")
        starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * dtype.itemsize
        if not np.array_equal(pointers, starts):
            raise UserError(f"Megatron index {idx_path} does not lay its sequences back to back in {bin_path.name}; "
                            "rebuild the pair with preprocess_data.py")
        if tokens_total == 0:
            raise UserError(f"Megatron dataset {prefix} holds no tokens; point data.path at a non-empty one")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens_total,))
        digest = hashlib.sha256(np.ascontiguousarray(index).data)
        digest.update(str(bin_path.stat().st_size).encode())
        identity = "megatron-idx-sha256:" + digest.hexdigest()
        lowest, highest = _cached_id_range(tokens, bin_path, identity)
        if lowest < 0:
            raise UserError(f"Megatron data file {bin_path} holds a negative id ({lowest}); it is not token data")
        super().__init__(tokens, int(highest) + 1, "megatron", identity,
                         name=str(prefix), doc_offsets=starts[documents[:-1]] // dtype.itemsize)


def _parse_index(index: np.ndarray, idx_path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, sequence pointers, document indices) from the raw `.idx` bytes."""
    fix = "rebuild the pair with Megatron-LM's preprocess_data.py"
    if index.size < HEADER.itemsize or bytes(index[:len(MAGIC)]) != MAGIC:
        raise UserError(f"{idx_path} is not a Megatron-LM index (no MMIDIDX header); {fix}")
    header = index[:HEADER.itemsize].view(HEADER)[0]
    if int(header["version"]) != VERSION:
        raise UserError(f"{idx_path} is index version {int(header['version'])}; only version {VERSION} is read; {fix}")
    code = int(header["code"])
    if code not in DTYPES or np.dtype(DTYPES[code]).kind == "f":
        raise UserError(f"{idx_path} stores dtype code {code}, not integer token ids "
                        f"(codes {sorted(c for c, t in DTYPES.items() if np.dtype(t).kind != 'f')}); {fix}")
    sequences, documents = int(header["sequences"]), int(header["documents"])
    body = HEADER.itemsize
    needed = body + sequences * (4 + 8) + documents * 8
    if documents < 2 or index.size < needed:
        raise UserError(f"{idx_path} is truncated or corrupt ({index.size} bytes for {sequences} sequences and "
                        f"{documents} document indices); {fix}")
    lengths = index[body:body + 4 * sequences].view("<i4")
    pointers = index[body + 4 * sequences:body + 12 * sequences].view("<i8")
    doc_index = index[body + 12 * sequences:needed].view("<i8")
    if (lengths < 0).any() or doc_index[0] != 0 or doc_index[-1] != sequences or (np.diff(doc_index) < 0).any():
        raise UserError(f"{idx_path} is corrupt (negative lengths or document indices out of order); {fix}")
    # A document index equal to the sequence count closes the last document; none starts there.
    doc_index = doc_index[np.concatenate([doc_index[:-1] < sequences, [True]])]
    return np.dtype(DTYPES[code]).newbyteorder("<"), lengths, pointers, doc_index


def _id_range(tokens: np.ndarray) -> tuple[int, int]:
    lowest, highest = 0, 0
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = tokens[start:start + SCAN_CHUNK]
        lowest, highest = min(lowest, int(chunk.min())), max(highest, int(chunk.max()))
    return lowest, highest


def _cached_id_range(tokens: np.ndarray, bin_path: Path, identity: str) -> tuple[int, int]:
    """`_id_range(tokens)`, scanned once per (identity, modification time) and then read from the cache."""
    key = hashlib.sha256(f"{identity} {bin_path.stat().st_mtime_ns}".encode()).hexdigest()[:24]
    path = cache_dir() / "megatron-id-range" / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        return int(cached["lowest"]), int(cached["highest"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not scanned yet, or an unreadable entry: scan again
    lowest, highest = _id_range(tokens)
    try:  # a cache that cannot be written costs the next open a scan, nothing more
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"lowest": lowest, "highest": highest, "bin": str(bin_path)}, f)
        os.replace(f.name, path)
    except OSError as e:
        log.warning("could not cache the id range of %s in %s (%s); the next open scans it again", bin_path, path, e)
    return lowest, highest


def megatron_dataset(path: str) -> MegatronDataset:
    """A Megatron-LM pair named by its prefix or by its .bin or .idx file."""
    prefix = Path(path).expanduser()
    if prefix.suffix in (".bin", ".idx"):
        prefix = prefix.with_suffix("")
    return MegatronDataset(str(prefix))
