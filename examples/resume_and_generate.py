"""Train, stop part-way, resume where the run left off, then sample from the newest checkpoint.

    python examples/resume_and_generate.py [--output-dir runs/example]

The first Trainer stops after step 40 of 80 (as a job cut short by its time limit would) and
leaves a checkpoint; the second, with `train.resume: auto`, continues from step 41 with exactly
the losses an uninterrupted run would have had.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

import angelptm as ap
from angelptm.generate import generate_text
from angelptm.train.checkpoint import latest_checkpoint, load_model


def train(output_dir: str, until: int) -> dict:
    cfg = ap.load_config("configs/demo.yaml", overrides=[
        f"train.output_dir={output_dir}", "train.steps=80", "train.log_every=10", "optim.warmup_steps=10",
    ])
    record = ap.Trainer(cfg).fit(until=until)
    dist.destroy_process_group()  # the next Trainer sets up its own
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/example")
    args = parser.parse_args()

    print(f"stopped after step 40, loss {train(args.output_dir, until=40)['loss']:.4f}")
    print(f"resumed to step 80, loss {train(args.output_dir, until=80)['loss']:.4f}")

    cfg, model = load_model(latest_checkpoint(Path(args.output_dir) / "checkpoints"))
    print(generate_text(model, "def ", max_new_tokens=120, context=cfg.model.max_seq_len, temperature=0.8))


if __name__ == "__main__":
    main()
