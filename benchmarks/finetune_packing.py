"""SFT throughput, packed rows against padded rows, on chat samples of long-tailed lengths.

The data: CHATS multi-turn chats cut from this Python's standard library text, with a seeded
long-tailed shape like real chat data: a geometric number of user/assistant turn pairs (1, 2, 3, ...
with probability 1/2, 1/4, 1/8, ...) and each turn's length in characters log-normal (a few samples
fill a row, most are far shorter).
They are rendered by a byte-level BPE of 2048 ids trained here with `tokenizers` on stdlib text
(no chat template, so angelptm's PLAIN rendering: loss on the assistant turns only) and written
once with `prepare(..., sft=True)`.

The runs: the real `Trainer`, one process, CPU, one torch thread, the same model (dim 256, 4 layers,
8 heads, 4 kv heads, ffn 768, vocab 2048; 4.2M parameters), global batch of ROWS = 8 rows of SEQ = 256
tokens, steps, AdamW and LR schedule, with data.pack=false (one sample per row, padded to the row)
and data.pack=true (several samples per row, positions and doc ids restarting at each),
alternating for --repeats rounds, the order swapped every round. A side's time is from the end of
its first step to the end of its last (the first step's warm-up left out; everything the loop does
between steps kept in). Reported per side: loss tokens/s (the assistant tokens trained on), all
tokens/s (row tokens, padding included: what the model computes), the fraction of row tokens that
are padding (counted in the sampler's rows of every step), and the final loss; and the speedup
packed / padded in loss tokens/s per round (median, min, max), beside the ratio of loss tokens per
step (the speedup if a packed step took as long as a padded one: both compute 8 x 256 tokens).
The two sides train on different samples per step (a packed row holds several), so their final
losses differ for that reason.

    .venv/bin/python benchmarks/finetune_packing.py [--repeats 5] [--steps 40]

Prints a table and writes benchmarks/results/finetune_packing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from data_prepare import train_tokenizer  # noqa: E402

from angelptm.config import config_from_dict  # noqa: E402
from angelptm.data import TokenFile  # noqa: E402
from angelptm.data.prepare import prepare  # noqa: E402
from angelptm.data.sources import stdlib_files  # noqa: E402
from angelptm.data.rows import IGNORE  # noqa: E402
from angelptm.train.trainer import Trainer  # noqa: E402

CHATS = 3000
VOCAB = 2048
SEQ, ROWS = 256, 8
MODEL = {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 768, "vocab_size": VOCAB,
         "max_seq_len": SEQ}
OPTIM = {"lr": 1e-3, "min_lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0,
         "warmup_steps": 5, "schedule": "cosine"}
USER_CHARS, ASSISTANT_CHARS, SIGMA = 25, 70, 1.0  # log-normal medians (characters) and shape of a turn


def chats(count: int, text: str, seed: int = 0) -> list[list[dict]]:
    """`count` chats of long-tailed lengths: Geometric(1/2) turn pairs (at least one), log-normal turn lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        turns = []
        for _ in range(int(rng.geometric(0.5))):
            for role, median in (("user", USER_CHARS), ("assistant", ASSISTANT_CHARS)):
                length = max(1, int(rng.lognormal(np.log(median), SIGMA)))
                start = int(rng.integers(0, len(text) - length))
                turns.append({"role": role, "content": text[start:start + length]})
        out.append(turns)
    return out


def build_sft_data(folder: Path) -> tuple[Path, Path, dict]:
    """(tokenizer folder, token file prefix, a summary of the sample lengths) of the benchmark's chat set."""
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files())[:2_000_000]
    tokenizer = train_tokenizer([text[:1_000_000]], folder / "tokenizer", VOCAB)
    rows = chats(CHATS, text)
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in rows))
    with open(os.devnull, "w") as quiet:
        prepare([str(folder / "chats.jsonl")], str(tokenizer), str(folder / "tokens"), workers=1, sft=True,
                progress_stream=quiet)
    data = TokenFile(folder / "tokens")
    lengths = np.diff(np.append(np.asarray(data.doc_offsets, dtype=np.int64), len(data)))
    summary = {"samples": int(len(lengths)), "tokens": int(lengths.sum()),
               "length_percentiles": {f"p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90, 99)},
               "longest": int(lengths.max()), "longer_than_a_row": int((lengths > SEQ + 1).sum())}
    return tokenizer, folder / "tokens", summary


def sft_job(tokenizer: Path, tokens: Path, pack: bool, steps: int, output_dir: Path) -> dict:
    return {"model": MODEL, "optim": OPTIM, "precision": {"dtype": "float32"},
            "data": {"source": "tokens", "path": str(tokens), "tokenizer": str(tokenizer), "format": "sft",
                     "pack": pack, "overlong": "truncate"},
            "train": {"steps": steps, "global_batch": ROWS, "micro_batch": ROWS, "seq_len": SEQ, "log_every": 1,
                      "ckpt_every": 0, "resume": "never", "sample_tokens": 0, "device": "cpu",
                      "output_dir": str(output_dir)}}


def row_counts(sampler, steps: int, pad_id: int) -> dict[str, list[int]]:
    """Per step, from the rows the sampler hands the trainer: loss tokens, padding tokens, row tokens."""
    counts = {"loss": [], "padding": [], "row": []}
    for step in range(steps):
        rows = sampler.microbatch(step, 0, ROWS)
        counts["loss"].append(int((rows.targets != IGNORE).sum()))
        counts["padding"].append(int((rows.inputs == pad_id).sum()))  # <pad> is in no rendered sample
        counts["row"].append(rows.inputs.numel())
    return counts


def train(job: dict, pad_id: int) -> dict:
    """Train `job` with the real Trainer; the times of the ends of its steps, its final loss, its rows' counts."""
    trainer = Trainer(config_from_dict(job))
    step_ends: list[float] = []
    take_step = trainer.train_step

    def timed_step():
        stats = take_step()
        step_ends.append(time.perf_counter())
        return stats

    trainer.train_step = timed_step
    record = trainer.fit()
    steps = job["train"]["steps"]
    return {"seconds": step_ends[-1] - step_ends[0], "final_loss": record["loss"],
            "counts": row_counts(trainer.sampler, steps, pad_id)}


def rates(run: dict) -> dict[str, float]:
    """Tokens per second over steps 2..N (the time runs from the end of step 1)."""
    counts, seconds = run["counts"], run["seconds"]
    return {"loss_tokens_per_s": sum(counts["loss"][1:]) / seconds,
            "all_tokens_per_s": sum(counts["row"][1:]) / seconds,
            "padding_fraction": sum(counts["padding"]) / sum(counts["row"])}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sides = {"padded (data.pack=false)": False, "packed (data.pack=true)": True}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer, tokens, data_summary = build_sft_data(tmp)
        pad_id = json.loads((tmp / "tokens.json").read_text())["pad_id"]
        print(f"{data_summary['samples']} samples, {data_summary['tokens']:,} tokens, lengths "
              f"{data_summary['length_percentiles']}, {data_summary['longer_than_a_row']} longer than a row")
        for round_ in range(args.repeats):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))  # alternating, order swapped
            for name in order:
                run = train(sft_job(tokenizer, tokens, sides[name], args.steps, tmp / f"run{round_}-{sides[name]}"),
                            pad_id)
                runs[name].append({**run, **rates(run)})
                print(f"round {round_ + 1} {name:26s} {runs[name][-1]['loss_tokens_per_s']:>9,.0f} loss tokens/s "
                      f"{runs[name][-1]['all_tokens_per_s']:>9,.0f} all tokens/s final loss {run['final_loss']:.4f}")
    padded, packed = (runs[name] for name in sides)
    speedups = [b["loss_tokens_per_s"] / a["loss_tokens_per_s"] for a, b in zip(padded, packed)]
    rows = []
    print(f"\n{'side':26s} {'loss tok/s median':>18s} {'(min-max)':>19s} {'all tok/s':>10s} {'padding':>8s} "
          f"{'final loss':>11s}")
    for name, side_runs in runs.items():
        row = {"side": name,
               "loss_tokens_per_s": spread([r["loss_tokens_per_s"] for r in side_runs]),
               "all_tokens_per_s": spread([r["all_tokens_per_s"] for r in side_runs]),
               "padding_fraction": side_runs[0]["padding_fraction"],  # the same rows every round
               "loss_tokens_per_step": statistics.mean(side_runs[0]["counts"]["loss"]),
               "final_loss": spread([r["final_loss"] for r in side_runs])}
        rows.append(row)
        lt = row["loss_tokens_per_s"]
        print(f"{name:26s} {lt['median']:>18,.0f} {lt['min']:>9,.0f}-{lt['max']:<9,.0f} "
              f"{row['all_tokens_per_s']['median']:>10,.0f} {row['padding_fraction']:>8.1%} "
              f"{row['final_loss']['median']:>11.4f}")
    rows[1]["speedup_vs_padded"] = spread(speedups)
    # What the speedup would be if a packed step took as long as a padded one (the same row tokens).
    rows[1]["loss_tokens_per_step_ratio_vs_padded"] = rows[1]["loss_tokens_per_step"] / rows[0]["loss_tokens_per_step"]
    s = rows[1]["speedup_vs_padded"]
    print(f"speedup packed / padded (loss tokens/s): median {s['median']:.2f}x, min {s['min']:.2f}x, "
          f"max {s['max']:.2f}x; loss tokens per step {rows[1]['loss_tokens_per_step_ratio_vs_padded']:.2f}x")
    results = Path(__file__).resolve().parent / "results" / "finetune_packing.json"
    results.write_text(json.dumps({
        "benchmark": "finetune_packing", "repeats": args.repeats, "steps": args.steps,
        "data": {**data_summary, "what": f"{CHATS} chats cut from stdlib text: Geometric(1/2) turn pairs (at "
                 f"least one), turn lengths log-normal (median {USER_CHARS} characters for user turns, "
                 f"{ASSISTANT_CHARS} for assistant turns, sigma {SIGMA}); byte-level BPE of {VOCAB} ids, PLAIN "
                 "rendering, loss on assistant tokens; data.overlong=truncate"},
        "job": {"model": MODEL, "optim": OPTIM, "seq_len": SEQ, "global_batch_rows": ROWS, "micro_batch": ROWS,
                "precision": "float32", "trainer": "angelptm Trainer, 1 process, CPU, torch threads 1"},
        "timing": "from the end of step 1 to the end of the last step; tokens of steps 2..N",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "note": "cores shared with other jobs while measured; sides alternate, order swapped each round"},
        "note": "final losses differ because a packed step trains on more samples than a padded one "
                "(the same rows, not the same samples)",
        "results": rows,
    }, indent=2))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
