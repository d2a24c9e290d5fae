"""`angelptm prepare`: tokenize text, jsonl(.gz/.zst) and parquet inputs into one token file, in parallel, streaming.

Documents are read in order and cut into batches of about BATCH_BYTES; worker processes tokenize
the batches with the tokenizer's batch encoder while the main process writes finished batches in
their order, so memory holds a few batches per worker whatever the size of the input:
  .txt            one document per file, read in pieces of PIECE_BYTES cut after a line break (only
                  the first piece gets the BOS, only the last the EOS);
  .jsonl[.gz|.zst] one document per line, the string in `--field`; blank lines are skipped;
  .parquet        one document per row of the `--field` column, read a record batch at a time.
The result is the `.bin` + `.json` token file of `angelptm.data.builder`, written atomically.

With `sft`, each jsonl line or parquet row is one chat sample (`messages`, or `prompt`/`completion`;
see angelptm.data.sft), rendered with the tokenizer's chat template into one document, and the file
gets its loss mask (`.mask`) beside the ids.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

import numpy as np

from angelptm.data.builder import list_documents, source_fingerprint, token_dtype, token_file_writer
from angelptm.data.sft import SFTRenderer
from angelptm.data.tokenizers import Tokenizer, load_tokenizer
from angelptm.errors import UserError

PIECE_BYTES = 1 << 20
BATCH_BYTES = 1 << 20
BATCH_DOCS = 1024
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
SFT_COLUMNS = (("messages",), ("prompt", "completion"))  # what an SFT parquet file holds, first found wins
_DATA_EXTRA = "pip install angelptm[data]"


@dataclass
class Batch:
    """Documents (or .txt pieces) in input order, raw: jsonl lines are parsed by the worker."""

    path: str
    kind: str  # "text": texts are documents or pieces; "jsonl": texts are raw lines; "rows": parquet SFT rows
    texts: list = field(default_factory=list)
    starts: list = field(default_factory=list)  # text begins a document (pieces after the first do not)
    ends: list = field(default_factory=list)
    first_line: int = 1  # jsonl: the line number of texts[0]; rows: its row number
    nbytes: int = 0
    input_bytes: int = 0  # how far into the input files the reading is, for the progress line


@dataclass
class Encoded:
    ids: np.ndarray
    doc_starts: np.ndarray
    skipped: int
    input_bytes: int
    loss_mask: Optional[np.ndarray] = None  # SFT: one 0/1 per id
    longest: int = 0  # SFT: the most ids in one sample


def _open_lines(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(the file on disk, its decompressed bytes) for a .jsonl, .jsonl.gz or .jsonl.zst file."""
    raw = open(path, "rb")
    if path.name.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise UserError(f"reading {path} needs zstandard; {_DATA_EXTRA}") from None
        return raw, io.BufferedReader(_ZstdFrames(raw, zstandard))
    return raw, raw


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file's frames, one after another. zstandard's stream
    reader ends quietly where a cut-off file ends; this one raises EOFError if the last frame is
    incomplete, so a truncated file is an error, not a silently shorter corpus."""

    def __init__(self, raw: IO[bytes], zstandard):
        self._raw, self._zstd = raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending, self._read, self._in_frame = b"", 0, False  # decompressed bytes; how many are handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._read == len(self._pending):
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._pending, self._read = b"", 0
            while chunk:  # a frame may end inside the chunk; the rest begins the next frame
                self._in_frame = True
                self._pending += self._frame.decompress(chunk)
                if not self._frame.eof:
                    break
                chunk, self._in_frame = self._frame.unused_data, False
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
        n = min(len(buffer), len(self._pending) - self._read)
        buffer[:n] = memoryview(self._pending)[self._read:self._read + n]  # no copy of what is left
        self._read += n
        return n


def _text_batches(path: Path) -> Iterator[Batch]:
    with open(path, "rb") as handle:
        data, first = handle.read(PIECE_BYTES), True
        while data:
            more = handle.read(PIECE_BYTES)
            if more:  # cut after the last line break, so the rest of that line goes with the next piece
                cut = data.rfind(b"\n") + 1 or _utf8_boundary(data)
                piece, data = data[:cut], data[cut:] + more
            else:
                piece, data = data, b""
            yield Batch(str(path), "text", [piece], [first], [not data], nbytes=len(piece),
                        input_bytes=handle.tell() - len(data))
            first = False


def _utf8_boundary(data: bytes) -> int:
    """Where the last character of `data` begins (a line longer than a piece is cut there)."""
    cut = len(data) - 1
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # 10xxxxxx: inside a multi-byte character
        cut -= 1
    return max(cut, 1)


def _lines(path: Path, handle: IO[bytes]) -> Iterator[bytes]:
    """The lines of a decompressed stream; a truncated or corrupt .gz / .zst file is one line of error."""
    try:
        yield from handle
    except (OSError, EOFError) as e:  # gzip's BadGzipFile is an OSError; zstandard's ZstdError is re-raised below
        raise UserError(f"{path} is truncated or corrupt ({e}); restore it or leave it out") from None
    except Exception as e:
        if type(e).__name__ != "ZstdError":
            raise
        raise UserError(f"{path} is truncated or corrupt ({e}); restore it or leave it out") from None


def _jsonl_batches(path: Path) -> Iterator[Batch]:
    raw, handle = _open_lines(path)
    with raw, handle:
        batch = Batch(str(path), "jsonl")
        for number, line in enumerate(_lines(path, handle), start=1):
            if not batch.texts:
                batch.first_line = number
            batch.texts.append(line)
            batch.nbytes += len(line)
            if batch.nbytes >= BATCH_BYTES or len(batch.texts) >= BATCH_DOCS:
                batch.input_bytes = raw.tell()
                yield batch
                batch = Batch(str(path), "jsonl")
        if batch.texts:
            batch.input_bytes = raw.tell()
            yield batch


def _parquet_batches(path: Path, text_field: str, skip_bad: bool, sft: bool = False) -> Iterator[Batch]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow; {_DATA_EXTRA}") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise UserError(f"{path} is not a readable parquet file ({e}); restore it or leave it out") from None
    names = parquet.schema_arrow.names
    if sft:
        yield from _parquet_rows(path, parquet)
        return
    if text_field not in names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); pass --field NAME")
    size, rows_total, row = path.stat().st_size, max(parquet.metadata.num_rows, 1), 0
    for record_batch in parquet.iter_batches(batch_size=BATCH_DOCS, columns=[text_field]):
        values = record_batch.column(0).to_pylist()
        batch = Batch(str(path), "text")
        for value in values:
            row += 1
            if not isinstance(value, str):
                if skip_bad:
                    batch.texts.append(None)  # counted and dropped by the worker
                    continue
                raise UserError(f"{path}: row {row} has {text_field}={value!r:.40}, not a string; "
                                "fix it or pass --skip-bad to skip such rows")
            batch.texts.append(value)
            batch.nbytes += len(value)
        batch.starts, batch.ends = [True] * len(batch.texts), [True] * len(batch.texts)
        batch.input_bytes = size * row // rows_total
        yield batch


def _parquet_rows(path: Path, parquet) -> Iterator[Batch]:
    """An SFT parquet file's rows as dicts of its SFT columns, a record batch at a time."""
    names = parquet.schema_arrow.names
    columns = next((list(c) for c in SFT_COLUMNS if all(name in names for name in c)), None)
    if columns is None:
        raise UserError(f"{path} has neither a messages column nor prompt and completion columns (columns: "
                        f"{', '.join(names)}); write SFT rows in one of those forms")
    size, rows_total, row = path.stat().st_size, max(parquet.metadata.num_rows, 1), 0
    for record_batch in parquet.iter_batches(batch_size=BATCH_DOCS, columns=columns):
        rows = record_batch.to_pylist()
        yield Batch(str(path), "rows", rows, first_line=row + 1, nbytes=record_batch.nbytes,
                    input_bytes=size * (row + len(rows)) // rows_total)
        row += len(rows)


def _jsonl_record(line: bytes) -> Optional[dict]:
    """The JSON object on one jsonl line; None for a blank line; ValueError saying what is wrong."""
    if not line.strip():
        return None
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"is a JSON {type(record).__name__}, not an object")
    return record


def _jsonl_text(line: bytes, text_field: str) -> Optional[str]:
    """The document in one jsonl line; None for a blank line; ValueError saying what is wrong."""
    record = _jsonl_record(line)
    if record is None:
        return None
    text = record.get(text_field)
    if not isinstance(text, str):
        raise ValueError(f"has no string field {text_field!r}" if text is None else
                         f"has {text_field} of type {type(text).__name__}, not a string")
    return text


# Each worker process holds one tokenizer, loaded once by `_start_worker`.
_worker_state: dict = {}


def _start_worker(tokenizer_spec: str, text_field: str, skip_bad: bool, sft: bool = False) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    tokenizer = load_tokenizer(tokenizer_spec, "--tokenizer")
    _worker_state.update(tokenizer=tokenizer, field=text_field, skip_bad=skip_bad,
                         sft=SFTRenderer(tokenizer) if sft else None)


def _row_name(batch: Batch) -> str:
    return "row" if batch.kind == "rows" else "line"


def _bad_row(batch: Batch, number: int, error: ValueError) -> UserError:
    reason = f"is not valid JSON ({error.msg})" if isinstance(error, json.JSONDecodeError) else str(error)
    return UserError(f"{batch.path}: {_row_name(batch)} {number} {reason}; fix it or pass --skip-bad to skip bad "
                     f"{_row_name(batch)}s")


def _encode_sft(batch: Batch, renderer: SFTRenderer, skip_bad: bool, dtype: np.dtype) -> Encoded:
    """Each jsonl line or parquet row of `batch` as one sample: its ids and its loss mask."""
    ids, masks, skipped = [], [], 0
    for number, item in enumerate(batch.texts, start=batch.first_line):
        try:
            record = _jsonl_record(item) if batch.kind == "jsonl" else item
            if record is None:
                continue
            sample, mask = renderer.render(record)
        except (ValueError, UnicodeDecodeError) as e:
            if skip_bad:
                skipped += 1
                continue
            raise _bad_row(batch, number, e) from None
        except UserError as e:  # the template, not the row, is at fault: say where it showed
            raise UserError(f"{batch.path}: {_row_name(batch)} {number}: {e}") from None
        ids.append(sample)
        masks.append(mask)
    lengths = np.fromiter((sample.size for sample in ids), dtype=np.int64, count=len(ids))
    if not ids:
        return Encoded(np.empty(0, dtype=dtype), lengths, skipped, batch.input_bytes, np.empty(0, dtype=np.uint8))
    return Encoded(np.concatenate(ids).astype(dtype), np.cumsum(lengths) - lengths, skipped, batch.input_bytes,
                   np.concatenate(masks), int(lengths.max()))


def _encode(batch: Batch) -> Encoded:
    tokenizer, text_field, skip_bad = _worker_state["tokenizer"], _worker_state["field"], _worker_state["skip_bad"]
    if _worker_state["sft"] is not None:
        return _encode_sft(batch, _worker_state["sft"], skip_bad, token_dtype(tokenizer.vocab_size))
    texts, starts, ends, skipped = batch.texts, batch.starts, batch.ends, 0
    if batch.kind == "jsonl":
        texts = []
        for number, line in enumerate(batch.texts, start=batch.first_line):
            try:
                text = _jsonl_text(line, text_field)
            except (ValueError, UnicodeDecodeError) as e:
                if skip_bad:
                    skipped += 1
                    continue
                raise _bad_row(batch, number, e) from None
            if text is not None:
                texts.append(text)
        starts = ends = [True] * len(texts)
    elif None in texts:  # parquet rows that are not strings, under --skip-bad
        keep = [i for i, t in enumerate(texts) if t is not None]
        skipped = len(texts) - len(keep)
        texts, starts, ends = [texts[i] for i in keep], [starts[i] for i in keep], [ends[i] for i in keep]
    encoded = tokenizer.encode_documents(texts, starts, ends) if texts else []
    lengths = np.fromiter((ids.size for ids in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.cumsum(lengths) - lengths
    dtype = token_dtype(tokenizer.vocab_size)  # the file's dtype: a half or a quarter of int64's bytes to send back
    ids = np.concatenate(encoded).astype(dtype, copy=False) if encoded else np.empty(0, dtype=dtype)
    return Encoded(ids, offsets[np.asarray(starts, dtype=bool)] if encoded else offsets, skipped, batch.input_bytes)


def input_files(inputs: Sequence[str], suffixes: tuple[str, ...] = SUFFIXES) -> tuple[list[Path], int]:
    """The files to read, in order, and how many files in the folders were left out for their type."""
    files, other = [], 0
    for source in inputs:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"input {source} does not exist; pass {', '.join(suffixes)} files or folders of them")
        for found in list_documents(path):
            if found.name.endswith(suffixes):
                files.append(found)
            elif path.is_file():
                raise UserError(f"input {found} is not a {', '.join(suffixes)} file; convert it or leave it out")
            else:
                other += 1
    return files, other


def _file_batches(files: Sequence[Path], text_field: str, skip_bad: bool, sft: bool) -> Iterator[Batch]:
    done = 0
    for path in files:
        if path.name.endswith(".parquet"):
            reader = _parquet_batches(path, text_field, skip_bad, sft)
        elif path.name.endswith(".txt"):
            reader = _text_batches(path)
        else:
            reader = _jsonl_batches(path)
        for batch in reader:
            batch.input_bytes += done
            yield batch
        done += path.stat().st_size


def _batches(files: Sequence[Path], text_field: str, skip_bad: bool, sft: bool = False) -> Iterator[Batch]:
    """Each file's batches, small consecutive text ones (short .txt files) joined up to BATCH_BYTES:
    one batch per worker call keeps the encoder batching and the messages between processes few."""
    joined: Optional[Batch] = None
    for batch in _file_batches(files, text_field, skip_bad, sft):
        if joined is not None and (batch.kind != "text" or joined.nbytes + batch.nbytes > BATCH_BYTES
                                   or len(joined.texts) + len(batch.texts) > BATCH_DOCS):
            yield joined
            joined = None
        if batch.kind != "text":
            yield batch
        elif joined is None:
            joined = batch
        else:
            joined.texts += batch.texts
            joined.starts += batch.starts
            joined.ends += batch.ends
            joined.nbytes += batch.nbytes
            joined.input_bytes = batch.input_bytes
    if joined is not None:
        yield joined


class Progress:
    """A progress line on stderr (rewritten in place on a terminal, else every few seconds)."""

    def __init__(self, total_bytes: int, stream=None, sft_template: Optional[str] = None):
        self.total, self.stream, self.start = total_bytes, stream or sys.stderr, time.perf_counter()
        self.sft_template = sft_template  # SFT: how the samples are rendered
        self.unit = "documents" if sft_template is None else "samples"
        self.tty = self.stream.isatty()
        self._next = self.start
        self.docs = self.tokens = self.skipped = self.done = self.loss_tokens = self.longest = 0

    def update(self, encoded: Encoded) -> None:
        self.docs += len(encoded.doc_starts)
        self.tokens += encoded.ids.size
        self.skipped += encoded.skipped
        if encoded.loss_mask is not None:
            self.loss_tokens += int(np.count_nonzero(encoded.loss_mask))
            self.longest = max(self.longest, encoded.longest)
        self.done = encoded.input_bytes
        now = time.perf_counter()
        if now >= self._next:
            self._next = now + (0.5 if self.tty else 10.0)
            elapsed = max(now - self.start, 1e-9)
            eta = (self.total - self.done) * elapsed / self.done if self.done else 0
            line = (f"prepare: {self.docs:,} {self.unit}, {self.tokens:,} tokens, "
                    f"{self.tokens / elapsed:,.0f} tokens/s, "
                    f"{100 * self.done / max(self.total, 1):.0f}%, ETA {eta:.0f} s")
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True)

    def summary(self, prefix: Path) -> str:
        elapsed = time.perf_counter() - self.start
        if self.tty:
            print(file=self.stream)
        skipped = f", skipped {self.skipped:,} bad lines/rows" if self.skipped else ""
        what = f"{self.docs:,} {self.unit}, {self.tokens:,} tokens"
        if self.sft_template is not None:
            what += (f", {self.loss_tokens:,} loss tokens, longest sample {self.longest:,} tokens, rendered with "
                     f"{self.sft_template}")
        files = f"{prefix}.bin + {'' if self.sft_template is None else '.mask + '}.json"
        return (f"wrote {files}: {what} from {self.total:,} "
                f"bytes in {elapsed:.1f} s ({self.tokens / max(elapsed, 1e-9):,.0f} tokens/s){skipped}")


def _encoded_in_order(batches: Iterator[Batch], workers: int, init_args: tuple) -> Iterator[Encoded]:
    """The batches encoded in their order; at most 2 per worker in flight, so memory stays bounded."""
    if workers <= 1:
        _start_worker(*init_args)
        yield from map(_encode, batches)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _start_worker, init_args) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare(inputs: Sequence[str], tokenizer_spec: str, out_prefix: str, text_field: str = "text",
            workers: Optional[int] = None, skip_bad: bool = False, progress_stream=None, sft: bool = False) -> str:
    """Tokenize `inputs` into the token file `out_prefix` (.bin + .json; with `sft`, chat samples and
    their loss mask .mask); return the summary line."""
    tokenizer: Tokenizer = load_tokenizer(tokenizer_spec, "--tokenizer")
    suffixes = tuple(s for s in SUFFIXES if s != ".txt") if sft else SUFFIXES  # a sample is a row, not a file
    files, other = input_files(inputs, suffixes)
    if not files:
        kinds = ", ".join(suffixes)
        raise UserError(f"no {kinds} files in {' '.join(inputs)}" + (f" ({other} files of other types)" if other else "")
                        + "; pass files of those types or folders holding some")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers={workers} must be at least 1")
    prefix = Path(out_prefix).expanduser()
    extra = {"field": text_field, "skip_bad": skip_bad, "piece_bytes": PIECE_BYTES}
    template = None
    if sft:  # the template decides the ids and the mask
        renderer = SFTRenderer(tokenizer)
        extra.update(renderer.identity)
        template = ("the tokenizer's chat template" if renderer.template_source is not None else
                    "the plain template (the tokenizer has no chat template)")
    fingerprint = source_fingerprint(files, tokenizer, extra)
    progress = Progress(sum(f.stat().st_size for f in files), progress_stream, template)
    init_args = (tokenizer_spec, text_field, skip_bad, sft)
    with token_file_writer(prefix, tokenizer, fingerprint, loss_mask=sft) as writer:
        for encoded in _encoded_in_order(_batches(files, text_field, skip_bad, sft), workers, init_args):
            writer.write(encoded.ids, encoded.doc_starts, encoded.loss_mask)
            progress.update(encoded)
        if writer.num_tokens == 0:
            raise UserError(f"{' '.join(inputs)} holds no {'samples' if sft else 'documents'} (empty files or only "
                            "blank lines); pass inputs with text in them")
    return progress.summary(prefix)
