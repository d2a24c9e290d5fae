"""`angelptm prepare` throughput against the tokenizer's own batch encoder and against `datasets.map`.

The corpus is the stdlib corpus (this Python's standard library, as `data.source: stdlib` reads
it), written once as a folder of .txt files and once as one .jsonl. The tokenizer is a byte-level
BPE of 16384 ids trained here with `tokenizers` on the first 4 MB of that corpus. Each round runs
every side once, each in a fresh process of its own (as a user runs each tool), timed inside it
from the moment its inputs are in place:
  ceiling    a plain loop over `Tokenizer.encode_batch_fast` on texts already in memory, one thread
             (TOKENIZERS_PARALLELISM=false): what one core can tokenize;
  parallel ceiling  the same loop in WORKERS processes at once (started before the clock, each on
             every WORKERS-th text): what this machine's cores deliver together, which is less than
             ceiling x workers where they share caches, memory bandwidth or a physical core;
  datasets   `Dataset.map(batched=True, num_proc=WORKERS)` over the same texts already in memory;
  prepare    `angelptm prepare --workers WORKERS` on the .txt folder and on the .jsonl: loading the
             tokenizer, reading, parsing, tokenizing, writing and checksumming the token file.
A fresh process per side keeps one side's heap from slowing the next: tokenizing in a process that
has tokenized (and freed) a lot before runs slower: 1.6x slower here after a few rounds.
Goals (issue 19): prepare >= 1.5x datasets.map, and >= 90% of ceiling x workers (also reported
against the parallel ceiling, the bound the cores themselves set).

    python benchmarks/data_prepare.py [--rounds 3] [--workers 2]

Prints a table (tokens/s: median, min, max of the rounds; each ratio: the median, min and max of the
per-round ratios, sides of one round having run back to back, in an order rotated from round to
round) and writes benchmarks/results/data_prepare_workers<N>.json.
With 2 cores, `--workers 1` leaves the main process (reading, writing) a core of its own, so it is
the fair test of the ceiling goal there; `--workers 2` shares the 2 cores among 3 processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # every side one thread per process: the processes are the parallelism

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from angelptm.data.prepare import prepare  # noqa: E402
from angelptm.data.sources import stdlib_files  # noqa: E402

BATCH = 1024


def train_tokenizer(texts: list[str], folder: Path, vocab_size: int = 16384) -> Path:
    """A byte-level BPE with <s>, </s>, <pad>, trained on the texts' first 4 MB, as a tokenizer folder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample = "".join(texts)[:4_000_000]
    tokenizer.train_from_iterator([sample[i:i + 100_000] for i in range(0, len(sample), 100_000)], trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return folder


def ceiling(tokenizer: Tokenizer, texts: list[str]) -> int:
    return sum(len(e.ids) for i in range(0, len(texts), BATCH)
               for e in tokenizer.encode_batch_fast(texts[i:i + BATCH], add_special_tokens=False))


# What the parallel ceiling's forked processes encode: set before the pool forks.
_shared: dict = {}


def _encode_share(index: int) -> int:
    texts, workers = _shared["texts"], _shared["workers"]
    return ceiling(_shared["tokenizer"], texts[index::workers])


def parallel_ceiling(pool, workers: int) -> int:
    return sum(pool.map(_encode_share, range(workers)))


def datasets_map(tokenizer: Tokenizer, texts: list[str], workers: int) -> int:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()

    def encode(batch):
        return {"input_ids": [e.ids for e in tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)]}

    mapped = Dataset.from_dict({"text": texts}).map(encode, batched=True, batch_size=BATCH, num_proc=workers,
                                                    remove_columns=["text"])
    return sum(len(ids) for ids in mapped["input_ids"])


def timed(run) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = run()
    return time.perf_counter() - start, tokens


SIDES = ("ceiling", "parallel", "datasets", "prepare-txt", "prepare-jsonl")


def run_side(side: str, data: Path, workers: int) -> tuple[float, int]:
    """One side, once, in this process (a fresh one): its seconds and the ids of text it produced."""
    tok_dir = data / "tokenizer"
    if side.startswith("prepare-"):
        source = data / ("txt" if side == "prepare-txt" else "corpus.jsonl")
        return timed(lambda: _prepare(source, tok_dir, data / f"out-{os.getpid()}", workers))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted((data / "txt").iterdir())]
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    if side == "ceiling":
        return timed(lambda: ceiling(tokenizer, texts))
    if side == "datasets":
        import datasets

        datasets.disable_progress_bars()  # imported before the clock, as a user's script has it
        return timed(lambda: datasets_map(tokenizer, texts, workers))
    _shared.update(tokenizer=tokenizer, texts=texts, workers=workers)
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # forked now: the clock leaves out its start
        pool.map(abs, range(workers))  # one round trip through the started pool, before the clock
        return timed(lambda: parallel_ceiling(pool, workers))


def run_in_fresh_process(side: str, data: Path, workers: int) -> tuple[float, int]:
    done = subprocess.run([sys.executable, __file__, "--side", side, "--data", str(data), "--workers", str(workers)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"side {side} failed:\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    return result["seconds"], result["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, run by the rounds below
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        seconds, tokens = run_side(args.side, args.data, args.workers)
        print(json.dumps({"seconds": seconds, "tokens": tokens}))
        return
    files = stdlib_files()
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    corpus_bytes = sum(len(t.encode()) for t in texts)
    names = {"ceiling": "ceiling (1 process)", "parallel": f"parallel ceiling ({args.workers} processes)",
             "datasets": f"datasets.map (num_proc={args.workers})",
             "prepare-txt": f"prepare txt (workers={args.workers})",
             "prepare-jsonl": f"prepare jsonl (workers={args.workers})"}
    rates: dict[str, list[float]] = {name: [] for name in names.values()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(texts, tmp / "tokenizer")
        (tmp / "txt").mkdir()
        for i, text in enumerate(texts):
            (tmp / "txt" / f"{i:05d}.txt").write_text(text)
        with open(tmp / "corpus.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        counted = set()
        for round_ in range(args.rounds):
            # Every round runs every side once, in an order rotated each round: no side always follows the
            # same one.
            for side in SIDES[round_ % len(SIDES):] + SIDES[:round_ % len(SIDES)]:
                seconds, tokens = run_in_fresh_process(side, tmp, args.workers)
                counted.add(tokens)
                rates[names[side]].append(tokens / seconds)
                print(f"round {round_ + 1} {names[side]:32s} {tokens:>11,} tokens {seconds:6.2f} s "
                      f"{tokens / seconds:>11,.0f} tokens/s", flush=True)
    if len(counted) != 1:
        raise SystemExit(f"the sides tokenized different numbers of ids: {sorted(counted)}")
    ceiling_name, parallel_name, datasets_name = (names[side] for side in SIDES[:3])
    baselines = {"vs_datasets_map": lambda r: rates[datasets_name][r],
                 "vs_ceiling_x_workers": lambda r: rates[ceiling_name][r] * args.workers,
                 "vs_parallel_ceiling": lambda r: rates[parallel_name][r]}
    rows = []
    print(f"\n{'side':36s} {'tokens/s median':>16s} {'min':>11s} {'max':>11s}   per-round ratio median (min-max): "
          f"{'vs datasets':>18s} {'vs ceiling x w':>18s} {'vs parallel':>18s}")
    for name, values in rates.items():
        # Ratios of the sides run back to back in the same round: what busy cores slow, they slow alike.
        ratios = {goal: [values[r] / baseline(r) for r in range(args.rounds)] for goal, baseline in baselines.items()}
        spread = {goal: {"median": statistics.median(v), "min": min(v), "max": max(v)} for goal, v in ratios.items()}
        rows.append({"side": name, "tokens_per_s": {"median": statistics.median(values), "min": min(values),
                                                    "max": max(values), "all": values},
                     **{f"ratio_{goal}": spread[goal] for goal in baselines}})
        print(f"{name:36s} {statistics.median(values):>16,.0f} {min(values):>11,.0f} {max(values):>11,.0f}   "
              + " ".join(f"{s['median']:>6.2f} ({s['min']:.2f}-{s['max']:.2f})" for s in spread.values()))
    results = Path(__file__).resolve().parent / "results" / f"data_prepare_workers{args.workers}.json"
    results.write_text(json.dumps({
        "benchmark": "data_prepare", "rounds": args.rounds, "workers": args.workers,
        "corpus": {"files": len(files), "bytes": corpus_bytes, "what": "stdlib corpus (data.source: stdlib)"},
        "tokenizer": "byte-level BPE, 16384 ids, trained on the corpus' first 4 MB",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "cores shared with other jobs while measured; ceiling x workers assumes idle cores "
                            "that scale linearly, the parallel ceiling is what they delivered"},
        "goals": {"vs_datasets_map": 1.5, "vs_ceiling_x_workers": 0.9, "vs_parallel_ceiling": 0.9},
        "results": rows,
    }, indent=2))
    print(f"wrote {results}")


def _prepare(source: Path, tok_dir: Path, out: Path, workers: int) -> int:
    with open(os.devnull, "w") as quiet:
        prepare([str(source)], str(tok_dir), str(out), workers=workers, progress_stream=quiet)
    index_path = out.with_name(out.name + ".json")
    index = json.loads(index_path.read_text())
    index_path.unlink()
    out.with_name(out.name + ".bin").unlink()
    # The text's ids alone, as the other sides count them: less the EOS that ends each document.
    return index["num_tokens"] - index["num_docs"]


if __name__ == "__main__":
    main()
