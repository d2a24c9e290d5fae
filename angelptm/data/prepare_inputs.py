"""`angelptm prepare`'s inputs: listed, cut into tasks a worker reads by itself, and read back as documents.

The main process only plans: it finds where each task's input begins and ends with a few short reads
near the cuts, so the workers read (and tokenize) in parallel and the main process stays off the cores:
  .txt            one document per file, read in pieces of PIECE_BYTES cut after the piece's last line
                  break (only the first piece gets the BOS, only the last the EOS); a task is pieces of
                  one or more files;
  .jsonl          one document per line, the string in `--field`, blank lines skipped; a task is a
                  byte range of whole lines;
  .jsonl.gz/.zst  the same lines, but a compressed stream cannot be entered in the middle: the main
                  process decompresses it and a task carries its lines;
  .parquet        one document per row of the `--field` column (SFT: one sample per row); a task is
                  a row group, read a record batch at a time.
Line and row numbers in a task count from its start; the main process, which meets the tasks in
order, adds the lines of the file's earlier tasks when it names a bad line.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Sequence

from angelptm.data.builder import list_documents
from angelptm.errors import UserError

PIECE_BYTES = 1 << 20
BATCH_DOCS = 1024  # documents per encoder call at most, so a task of tiny lines still holds few objects at once
SCAN_BYTES = 1 << 16  # how much the main process reads at a time looking for a line break
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
SFT_COLUMNS = (("messages",), ("prompt", "completion"))  # what an SFT parquet file holds, first found wins
_DATA_EXTRA = "pip install angelptm[data]"


@dataclass
class Task:
    """A run of the input, in input order, that one worker call reads, tokenizes and writes to its shard."""

    kind: str  # "txt", "jsonl" (a byte range, or `lines` of a compressed file) or "parquet" (a row group)
    path: str  # the file its line or row numbers count in (txt: its first piece's)
    index: int = 0  # its place in the input: names its shard
    pieces: list = field(default_factory=list)  # txt: (path, start, end, begins a document, ends one)
    start: int = 0  # jsonl: the byte range of whole lines
    end: int = 0
    lines: Optional[list] = None  # compressed jsonl: the lines themselves
    row_group: int = 0  # parquet
    columns: list = field(default_factory=list)  # parquet: what to read
    input_bytes: int = 0  # how far into the input files the task reaches, for the progress line


@dataclass
class Batch:
    """Documents of one task for one encoder call: .txt pieces and parquet strings ("text"), raw jsonl
    lines ("jsonl", parsed by the worker) or parquet SFT rows ("rows")."""

    kind: str
    texts: list
    starts: list = field(default_factory=list)  # text begins a document (pieces after the first do not)
    ends: list = field(default_factory=list)
    first_line: int = 1  # the task's line (row) number of texts[0]


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


def tasks(files: Sequence[Path], text_field: str, sft: bool, task_bytes: Callable[[int], int]) -> Iterator[Task]:
    """The inputs as tasks, in order, numbered; planned lazily, as the workers need them. The task that
    begins `n` bytes into the input holds about `task_bytes(n)` bytes of it (a parquet task, a row group).
    Consecutive .txt pieces (short files) share a task: one encoder call and one shard for many files."""
    index, txt, txt_bytes, limit, reached = 0, None, 0, 0, 0
    for task in _file_tasks(files, text_field, sft, task_bytes):
        piece_bytes = sum(end - start for _, start, end, _, _ in task.pieces)  # 0 but for .txt
        if txt is not None and (task.kind != "txt" or txt_bytes + piece_bytes > limit
                                or len(txt.pieces) >= BATCH_DOCS):
            txt.index, index = index, index + 1
            yield txt
            txt = None
        if task.kind != "txt":
            task.index, index = index, index + 1
            yield task
        elif txt is None:
            txt, txt_bytes, limit = task, piece_bytes, task_bytes(reached)
        else:
            txt.pieces += task.pieces
            txt.input_bytes = task.input_bytes
            txt_bytes += piece_bytes
        reached = task.input_bytes
    if txt is not None:
        txt.index = index
        yield txt


def _file_tasks(files: Sequence[Path], text_field: str, sft: bool,
                task_bytes: Callable[[int], int]) -> Iterator[Task]:
    done = 0
    for path in files:
        if path.name.endswith(".txt"):
            yield from _txt_pieces(path, done)
        elif path.name.endswith(".parquet"):
            yield from _parquet_tasks(path, text_field, sft, done)
        elif path.name.endswith(".jsonl"):
            yield from _jsonl_tasks(path, task_bytes, done)
        else:
            yield from _compressed_jsonl_tasks(path, task_bytes, done)
        done += path.stat().st_size


def _txt_pieces(path: Path, done: int) -> Iterator[Task]:
    """A .txt file's pieces, one task each: the piece read at offset k·PIECE_BYTES ends after the last line
    break before (k+1)·PIECE_BYTES, so the rest of that line goes with the next piece."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start, window_end = 0, PIECE_BYTES
        while start < size:
            end = _piece_end(handle, start, window_end) if window_end < size else size
            yield Task("txt", str(path), pieces=[(str(path), start, end, start == 0, end == size)],
                       input_bytes=done + end)
            start, window_end = end, window_end + PIECE_BYTES


def _piece_end(handle: IO[bytes], start: int, end: int) -> int:
    """Where the piece read from [start, end) is cut: after its last line break, found reading backwards
    from `end`; in a line longer than a piece, where the window's last character begins."""
    pos = end
    while pos > start:
        begin = max(start, pos - SCAN_BYTES)
        handle.seek(begin)
        found = handle.read(pos - begin).rfind(b"\n")
        if found >= 0:
            return begin + found + 1
        pos = begin
    handle.seek(start)
    return start + _utf8_boundary(handle.read(end - start))  # no line break: the window is one piece and a few bytes


def _utf8_boundary(data: bytes) -> int:
    """Where the last character of `data` begins (a line longer than a piece is cut there)."""
    cut = len(data) - 1
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # 10xxxxxx: inside a multi-byte character
        cut -= 1
    return max(cut, 1)


def _jsonl_tasks(path: Path, task_bytes: Callable[[int], int], done: int) -> Iterator[Task]:
    """An uncompressed .jsonl file as byte ranges of about `task_bytes(where)`, each ending after a line break."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = 0
        while start < size:
            end = min(start + task_bytes(done + start), size)
            handle.seek(end)
            while end < size:  # on to the end of the line the cut fell in
                chunk = handle.read(SCAN_BYTES)
                found = chunk.find(b"\n")
                end = min(end + (found + 1 if found >= 0 else len(chunk)), size)
                if found >= 0:
                    break
            yield Task("jsonl", str(path), start=start, end=end, input_bytes=done + end)
            start = end


def _compressed_jsonl_tasks(path: Path, task_bytes: Callable[[int], int], done: int) -> Iterator[Task]:
    raw, handle = _open_lines(path)
    with raw, handle:
        lines, nbytes, limit = [], 0, task_bytes(done)  # decompressed bytes: smaller tasks than a plain file's
        for line in _lines(path, handle):
            lines.append(line)
            nbytes += len(line)
            if nbytes >= limit or len(lines) >= BATCH_DOCS:
                yield Task("jsonl", str(path), lines=lines, input_bytes=done + raw.tell())
                lines, nbytes, limit = [], 0, task_bytes(done + raw.tell())
        if lines:
            yield Task("jsonl", str(path), lines=lines, input_bytes=done + raw.tell())


def _open_lines(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(the file on disk, its decompressed bytes) for a .jsonl.gz or .jsonl.zst file."""
    raw = open(path, "rb")
    if path.name.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    try:
        import zstandard
    except ImportError:
        raw.close()
        raise UserError(f"reading {path} needs zstandard; {_DATA_EXTRA}") from None
    return raw, io.BufferedReader(_ZstdFrames(raw, zstandard))


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


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow; {_DATA_EXTRA}") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise UserError(f"{path} is not a readable parquet file ({e}); restore it or leave it out") from None


def _parquet_tasks(path: Path, text_field: str, sft: bool, done: int) -> Iterator[Task]:
    """A parquet file's row groups, one task each, after checking that it has the columns to read."""
    parquet = _parquet_file(path)
    names = parquet.schema_arrow.names
    if sft:
        columns = next((list(c) for c in SFT_COLUMNS if all(name in names for name in c)), None)
        if columns is None:
            raise UserError(f"{path} has neither a messages column nor prompt and completion columns (columns: "
                            f"{', '.join(names)}); write SFT rows in one of those forms")
    elif text_field in names:
        columns = [text_field]
    else:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); pass --field NAME")
    size, rows_total, rows = path.stat().st_size, max(parquet.metadata.num_rows, 1), 0
    for group in range(parquet.num_row_groups):
        rows += parquet.metadata.row_group(group).num_rows
        yield Task("parquet", str(path), row_group=group, columns=columns, input_bytes=done + size * rows // rows_total)


def task_batches(task: Task, sft: bool) -> Iterator[Batch]:
    """What a worker encodes of `task`, read by itself: at most BATCH_DOCS documents per batch."""
    if task.kind == "txt":
        texts = []
        for path, start, end, _, _ in task.pieces:
            with open(path, "rb") as handle:
                handle.seek(start)
                texts.append(handle.read(end - start))
        yield Batch("text", texts, [p[3] for p in task.pieces], [p[4] for p in task.pieces])
    elif task.kind == "parquet":
        row = 1
        for record_batch in _parquet_file(Path(task.path)).iter_batches(
                batch_size=BATCH_DOCS, row_groups=[task.row_group], columns=task.columns):
            texts = record_batch.to_pylist() if sft else record_batch.column(0).to_pylist()
            yield Batch("rows" if sft else "text", texts, [True] * len(texts), [True] * len(texts), first_line=row)
            row += len(texts)
    elif task.lines is not None:
        for first in range(0, len(task.lines), BATCH_DOCS):
            yield Batch("jsonl", task.lines[first:first + BATCH_DOCS], first_line=first + 1)
    else:
        with open(task.path, "rb") as handle:
            handle.seek(task.start)
            lines, left, number = [], task.end - task.start, 1
            for line in handle:  # the range ends after a line break: its lines, whole, and no more
                lines.append(line)
                left -= len(line)
                if len(lines) == BATCH_DOCS or left <= 0:
                    yield Batch("jsonl", lines, first_line=number)
                    number, lines = number + len(lines), []
                if left <= 0:
                    break
