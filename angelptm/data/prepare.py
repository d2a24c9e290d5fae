"""`angelptm prepare`: tokenize text, jsonl(.gz/.zst) and parquet inputs into one token file, in parallel, streaming.

The inputs are cut into tasks (see angelptm.data.prepare_inputs), big at first and smaller as the
input runs out, so the workers end together. Each worker process reads its task's input itself,
tokenizes it with the tokenizer's batch encoder and writes the ids (and SFT loss mask) to a shard
file of its own, returning only the task's counts and document lengths. The main process plans the
tasks a few ahead and stitches the finished shards in input order into the `.bin` + `.json` token
file of `angelptm.data.builder`, a sequential copy, so it hardly takes a core from the workers.
Memory holds a few tasks per worker whatever the size of the input; the shards live in a temporary
folder beside the output, each removed once copied, the folder on any failure or Ctrl-C, and the
token file appears only complete.

With `sft`, each jsonl line or parquet row is one chat sample (`messages`, or `prompt`/`completion`;
see angelptm.data.sft), rendered with the tokenizer's chat template into one document, and the file
gets its loss mask (`.mask`) beside the ids.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from angelptm.data import prepare_inputs
from angelptm.data.builder import source_fingerprint, token_dtype, token_file_writer
from angelptm.data.prepare_inputs import SUFFIXES, Batch, Task, input_files, task_batches, tasks
from angelptm.data.sft import SFTRenderer
from angelptm.data.tokenizers import Tokenizer, load_tokenizer
from angelptm.errors import UserError

TASK_BYTES = 1 << 20  # the most input per task
MIN_TASK_BYTES = 1 << 16  # the least: a task's fixed cost (a shard, two messages) stays small beside it
GUIDE = 4  # a task holds 1/GUIDE of a worker's share of what is left (guided scheduling)


@dataclass
class Encoded:
    ids: np.ndarray
    doc_starts: np.ndarray
    skipped: int
    loss_mask: Optional[np.ndarray] = None  # SFT: one 0/1 per id
    longest: int = 0  # SFT: the most ids in one sample


@dataclass
class Done:
    """What a worker returns for a task whose ids (and loss mask) it wrote to the task's shard."""

    num_tokens: int
    doc_starts: np.ndarray  # in the shard's ids
    lines: int  # lines (rows, pieces) read: where the file's next task starts counting
    skipped: int = 0
    loss_tokens: int = 0
    longest: int = 0
    bad: Optional[tuple[int, str]] = None  # the first bad line (row) in the task, its number from the task's start


class _BadRow(Exception):
    """A line or row that --skip-bad would skip: its number in the task and what follows it in the message."""

    def __init__(self, number: int, rest: str):
        super().__init__(number, rest)
        self.number, self.rest = number, rest


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


def _row_name(batch: Batch) -> str:
    return "line" if batch.kind == "jsonl" else "row"


def _bad_row(batch: Batch, number: int, error: ValueError) -> _BadRow:
    reason = f"is not valid JSON ({error.msg})" if isinstance(error, json.JSONDecodeError) else str(error)
    return _BadRow(number, f" {reason}; fix it or pass --skip-bad to skip bad {_row_name(batch)}s")


# Each worker process holds one tokenizer and the folder of the shards, set by `_start_worker`.
_worker_state: dict = {}


def _start_worker(tokenizer: Tokenizer, text_field: str, skip_bad: bool, sft: bool, shards: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _worker_state.update(tokenizer=tokenizer, field=text_field, skip_bad=skip_bad, shards=shards,
                         sft=SFTRenderer(tokenizer) if sft else None, dtype=token_dtype(tokenizer.vocab_size))


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
            raise _BadRow(number, f": {e}") from None
        ids.append(sample)
        masks.append(mask)
    lengths = np.fromiter((sample.size for sample in ids), dtype=np.int64, count=len(ids))
    if not ids:
        return Encoded(np.empty(0, dtype=dtype), lengths, skipped, np.empty(0, dtype=np.uint8))
    return Encoded(np.concatenate(ids).astype(dtype), np.cumsum(lengths) - lengths, skipped,
                   np.concatenate(masks), int(lengths.max()))


def _encode(batch: Batch) -> Encoded:
    tokenizer, text_field, skip_bad = _worker_state["tokenizer"], _worker_state["field"], _worker_state["skip_bad"]
    dtype = _worker_state["dtype"]  # the file's dtype, so the shard is the token file's bytes
    if _worker_state["sft"] is not None:
        return _encode_sft(batch, _worker_state["sft"], skip_bad, dtype)
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
    elif not all(isinstance(t, (str, bytes)) for t in texts):  # parquet values that are not strings
        keep = [i for i, t in enumerate(texts) if isinstance(t, (str, bytes))]
        if not skip_bad:
            number = next(i for i, t in enumerate(texts) if not isinstance(t, (str, bytes)))
            raise _BadRow(batch.first_line + number, f" has {text_field}={texts[number]!r:.40}, not a string; fix "
                          "it or pass --skip-bad to skip such rows")
        skipped = len(texts) - len(keep)
        texts, starts, ends = [texts[i] for i in keep], [starts[i] for i in keep], [ends[i] for i in keep]
    encoded = tokenizer.encode_documents(texts, starts, ends) if texts else []
    lengths = np.fromiter((ids.size for ids in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.cumsum(lengths) - lengths
    ids = np.concatenate(encoded).astype(dtype, copy=False) if encoded else np.empty(0, dtype=dtype)
    return Encoded(ids, offsets[np.asarray(starts, dtype=bool)] if encoded else offsets, skipped)


def _shard_paths(shards: str, index: int) -> tuple[str, str]:
    """Where task `index` writes its ids and its loss mask."""
    return os.path.join(shards, f"{index}.ids"), os.path.join(shards, f"{index}.mask")


def _run_task(task: Task) -> Done:
    """Read, tokenize and write one task to its shard; a bad line ends it, reported, not raised, for the
    main process to number within the file."""
    sft = _worker_state["sft"] is not None
    ids_path, mask_path = _shard_paths(_worker_state["shards"], task.index)
    done = Done(0, np.empty(0, dtype=np.int64), 0)
    starts = []
    with open(ids_path, "wb") as ids_out, open(mask_path, "wb") if sft else contextlib.nullcontext() as mask_out:
        for batch in task_batches(task, sft):
            try:
                encoded = _encode(batch)
            except _BadRow as bad:
                done.bad = (bad.number, bad.rest)
                return done
            ids_out.write(encoded.ids.data)
            starts.append(done.num_tokens + encoded.doc_starts)
            done.num_tokens += encoded.ids.size
            done.lines += len(batch.texts)
            done.skipped += encoded.skipped
            if sft:
                mask_out.write(encoded.loss_mask.data)
                done.loss_tokens += int(np.count_nonzero(encoded.loss_mask))
                done.longest = max(done.longest, encoded.longest)
    if starts:
        done.doc_starts = np.concatenate(starts)
    return done


class Progress:
    """A progress line on stderr (rewritten in place on a terminal, else every few seconds)."""

    def __init__(self, total_bytes: int, stream=None, sft_template: Optional[str] = None):
        self.total, self.stream, self.start = total_bytes, stream or sys.stderr, time.perf_counter()
        self.sft_template = sft_template  # SFT: how the samples are rendered
        self.unit = "documents" if sft_template is None else "samples"
        self.tty = self.stream.isatty()
        self._next = self.start
        self.docs = self.tokens = self.skipped = self.done = self.loss_tokens = self.longest = 0

    def update(self, task: Task, done: Done) -> None:
        self.docs += len(done.doc_starts)
        self.tokens += done.num_tokens
        self.skipped += done.skipped
        self.loss_tokens += done.loss_tokens
        self.longest = max(self.longest, done.longest)
        self.done = task.input_bytes
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


def _done_in_order(planned: Iterator[Task], workers: int, init_args: tuple) -> Iterator[tuple[Task, Done]]:
    """The tasks run in their order; at most 2 per worker in flight, so memory and shards stay bounded.
    One worker runs them in this process; more fork from it, inheriting the loaded tokenizer."""
    if workers <= 1:
        _start_worker(*init_args)
        yield from ((task, _run_task(task)) for task in planned)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _start_worker, init_args) as pool:
        pending: collections.deque = collections.deque()
        for task in planned:
            pending.append((task, pool.apply_async(_run_task, (task,))))
            if len(pending) >= 2 * workers:
                task, result = pending.popleft()
                yield task, result.get()
        while pending:
            task, result = pending.popleft()
            yield task, result.get()


def guided_task_bytes(total_bytes: int, workers: int) -> Callable[[int], int]:
    """How much input the task that begins `done` bytes into it holds (guided scheduling): 1/GUIDE of a
    worker's share of what is left, within [MIN_TASK_BYTES, TASK_BYTES]. The first tasks are big (few
    shards and messages), the last small, so the workers end together."""
    return lambda done: max(MIN_TASK_BYTES, min(TASK_BYTES, (total_bytes - done) // (GUIDE * workers)))


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Python's garbage collector leaves alone what exists when the run starts (torch's objects and the
    like): a full collection would walk all of it in the main process, and in each forked worker also
    write to every page it lies in, copying them from the parent."""
    frozen_before = gc.get_freeze_count() > 0  # a caller's own freeze is theirs to undo
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


@_heap_frozen()
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
    extra = {"field": text_field, "skip_bad": skip_bad, "piece_bytes": prepare_inputs.PIECE_BYTES}
    template = None
    if sft:  # the template decides the ids and the mask
        renderer = SFTRenderer(tokenizer)
        extra.update(renderer.identity)
        template = ("the tokenizer's chat template" if renderer.template_source is not None else
                    "the plain template (the tokenizer has no chat template)")
    fingerprint = source_fingerprint(files, tokenizer, extra)
    total_bytes = sum(f.stat().st_size for f in files)
    task_bytes = guided_task_bytes(total_bytes, workers)
    progress = Progress(total_bytes, progress_stream, template)
    dtype = token_dtype(tokenizer.vocab_size)
    lines_before: collections.Counter = collections.Counter()  # per file: lines (rows) in its tasks so far
    with token_file_writer(prefix, tokenizer, fingerprint, loss_mask=sft) as writer:
        shards = tempfile.mkdtemp(dir=prefix.parent, prefix=f".{prefix.name}.shards.")
        try:
            init_args = (tokenizer, text_field, skip_bad, sft, shards)
            for task, done in _done_in_order(tasks(files, text_field, sft, task_bytes), workers, init_args):
                if done.bad is not None:
                    number, rest = done.bad
                    row = "row" if task.kind == "parquet" else "line"
                    raise UserError(f"{task.path}: {row} {lines_before[task.path] + number}{rest}")
                lines_before[task.path] += done.lines
                ids_path, mask_path = _shard_paths(shards, task.index)
                writer.write(np.fromfile(ids_path, dtype=dtype), done.doc_starts,
                             np.fromfile(mask_path, dtype=np.uint8) if sft else None)
                os.unlink(ids_path)
                if sft:
                    os.unlink(mask_path)
                progress.update(task, done)
        finally:
            shutil.rmtree(shards, ignore_errors=True)
        if writer.num_tokens == 0:
            raise UserError(f"{' '.join(inputs)} holds no {'samples' if sft else 'documents'} (empty files or only "
                            "blank lines); pass inputs with text in them")
    return progress.summary(prefix)
