"""FP8 training accuracy by recipe: final loss of the Trainer's run in each recipe against full precision, ours next to torchao's.

    python benchmarks/fp8_training_accuracy.py [--steps 120 --seeds 0 1 2]

The run: dim 128, 2 layers, 4 heads, synthetic data, fp32 master weights, the demo's optimizer
and schedule, one process on CPU. Each recipe trains with several seeds (model init and data);
its figure is the mean of the last 10 steps' losses relative to full precision with the same
seed. The seed-to-seed spread of full precision itself is shown beside them, because a single
final loss on a curve still falling steeply moves by several percent with the seed alone.
torchao's rowwise recipe (`convert_to_float8_training`, E4M3 everywhere, power-of-two scales)
replaces our conversion in the same Trainer run. Writes (the entry for this run length of) benchmarks/results/fp8_training_accuracy.json.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import tempfile
import warnings
from contextlib import nullcontext, redirect_stderr
from pathlib import Path
from unittest import mock

from torch import nn

from angelptm.config import config_from_dict
from angelptm.train.trainer import Trainer

parallelize = importlib.import_module("angelptm.distributed.parallelize")  # the module, not its function
LAST = 10  # steps averaged for the final loss
# name -> fp8 overrides; None is full precision. The control changes only the order in which the
# gradient is summed (two microbatches of 4 instead of one of 8): the same arithmetic up to rounding.
CONTROL = "full precision, micro_batch 4"
RECIPES = {
    "full precision": None,
    CONTROL: None,
    "tensorwise": {"recipe": "tensorwise"},
    "delayed": {"recipe": "delayed"},
    "rowwise": {"recipe": "rowwise"},
    "rowwise, power-of-two scales": {"recipe": "rowwise", "power_of_two_scales": True},
    "blockwise": {"recipe": "blockwise"},
    "torchao rowwise": "torchao",
}


def torchao_rowwise(model: nn.Module, fp8, tp, data) -> None:
    """Stands in for angelptm's `apply_float8`: torchao's rowwise recipe on the same layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    skip = tuple(fp8.skip)
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=lambda _, name: not name.split(".")[-1] in skip)


def run(name: str, seed: int, steps: int, workdir: Path) -> list[float]:
    fp8 = RECIPES[name]
    raw = {
        "model": {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4},
        "data": {"source": "synthetic", "seed": seed},
        "train": {"steps": steps, "seed": seed, "log_every": 1, "ckpt_every": 0, "keep_checkpoints": 1,
                  "sample_tokens": 0, "resume": "never", "device": "cpu",
                  "output_dir": str(workdir / f"{name.replace(' ', '_').replace(',', '')}_{seed}")},
    }
    if name == CONTROL:
        raw["train"]["micro_batch"] = 4
    if isinstance(fp8, dict):
        raw["precision"] = {"fp8": {"enabled": True, **fp8}}
    elif fp8 == "torchao":
        raw["precision"] = {"fp8": {"enabled": True}}  # the switch; torchao does the conversion
    cfg = config_from_dict(raw)
    patch = mock.patch.object(parallelize, "apply_float8", torchao_rowwise) if fp8 == "torchao" else nullcontext()
    with patch, redirect_stderr(io.StringIO()):  # the progress lines of 20 runs would bury the table
        Trainer(cfg).fit()
    out = Path(cfg.train.output_dir) / "metrics.jsonl"
    return [row["loss"] for row in map(json.loads, out.read_text().splitlines()) if "loss" in row]


def final(curve: list[float]) -> float:
    return statistics.fmean(curve[-LAST:])


def steps_behind(curve: list[float], reference: list[float]) -> int:
    """How many steps before its end the reference's 10-step mean loss last fell to `curve`'s final
    one (-1: `curve` ends lower than the reference does). Meaningful while the loss still falls."""
    ref = [statistics.fmean(reference[i - LAST : i]) for i in range(LAST, len(reference) + 1)]
    above = [i for i, loss in enumerate(ref) if loss > final(curve)]
    return len(ref) - 2 - above[-1] if above else len(ref) - 1


def tabulate(steps: int, curves: dict[str, dict[str, list[float]]]) -> dict:
    """The run's figures from its loss curves {recipe: {seed: losses}}."""
    seeds = list(curves["full precision"])
    rows = []
    for name, by_seed in curves.items():
        rel = [final(by_seed[s]) / final(curves["full precision"][s]) - 1 for s in seeds]
        behind = [steps_behind(by_seed[s], curves["full precision"][s]) for s in seeds]
        rows.append({"recipe": name, "final_loss": [final(by_seed[s]) for s in seeds],
                     "relative_to_full_precision": rel, "median_relative": statistics.median(rel),
                     "mean_relative": statistics.fmean(rel), "steps_behind_full_precision": behind})
    fp = [final(curves["full precision"][s]) for s in seeds]
    spread = (max(fp) - min(fp)) / statistics.median(fp)
    print(f"\nfinal loss (mean of the last {LAST} of {steps} steps) relative to full precision, seeds {seeds}")
    print(f"full precision across seeds: {min(fp):.4f} .. {max(fp):.4f} (spread {spread:.1%})")
    for row in rows:
        per_seed = " ".join(f"{r:+.2%}" for r in row["relative_to_full_precision"])
        behind = " ".join(map(str, row["steps_behind_full_precision"]))
        print(f"{row['recipe']:<30} median {row['median_relative']:+.2%} mean {row['mean_relative']:+.2%}"
              f"   per seed {per_seed}   steps behind {behind}")
    return {"seeds": seeds, "last_steps_averaged": LAST, "full_precision_seed_spread": spread, "rows": rows,
            "curves": curves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--tabulate", action="store_true",
                        help="recompute the figures from the curves in the results file; train nothing")
    args = parser.parse_args()
    out = Path(__file__).resolve().parent / "results" / "fp8_training_accuracy.json"
    runs = json.loads(out.read_text())["runs"] if out.exists() else {}  # one entry per run length
    if args.tabulate:
        runs = {steps: tabulate(int(steps), run["curves"]) for steps, run in runs.items()}
        out.write_text(json.dumps({"runs": runs}, indent=1))
        return

    curves: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["full precision"] + [r for r in args.recipes if r != "full precision"]:
            for seed in args.seeds:
                curves.setdefault(name, {})[str(seed)] = losses = run(name, seed, args.steps, Path(tmp))
                print(f"{name:<30} seed {seed}: final {final(losses):.4f}", flush=True)
    runs[str(args.steps)] = tabulate(args.steps, curves)
    if out.exists():  # another length may have been written meanwhile
        runs = {**json.loads(out.read_text())["runs"], str(args.steps): runs[str(args.steps)]}
    out.write_text(json.dumps({"runs": runs}, indent=1))


if __name__ == "__main__":
    main()
