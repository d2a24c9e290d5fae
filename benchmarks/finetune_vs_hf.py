"""One SFT job in angelptm's Trainer and in Hugging Face's `transformers.Trainer`, side by side on CPU.

The same job on both sides:
  model      a transformers `LlamaForCausalLM` built here from a seed (dim 256, 4 layers, 8 heads,
             4 kv heads, ffn 768, vocab 2048), saved with save_pretrained; angelptm starts from it
             through `import_hf` and `train.init_from`, transformers loads it with from_pretrained;
  data       finetune_packing.py's chat set (long-tailed lengths, byte-level BPE, loss on the assistant
             tokens), prepared once with `prepare(..., sft=True)`;
  batches    angelptm runs its best configuration, data.pack=true: ROWS rows of SEQ tokens a step, each
             holding several samples with positions and doc ids restarting at each. Step k of the
             Hugging Face run holds exactly the samples of angelptm's step k, in the same order, padded
             to the longest in the batch (DataCollator-style dynamic padding, its usual setting;
             train_sampling_strategy=sequential so the order is kept), labels -100 on the untrained
             tokens and the padding; so both sides train on the same tokens each step;
  optimizer  AdamW (lr 1e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on the matrices only, as
             angelptm's ZeROCache groups them), gradient clipping at 1.0, the same warmup + cosine
             schedule (transformers gets it as a LambdaLR of angelptm's `lr_at`); float32;
  loss       the mean over the batch's loss tokens on both (transformers' num_items_in_batch).
Each side runs in this one process, one torch thread, alternating for --repeats rounds. Time: from
the end of step 1 to the end of the last step (each side's first step, warm-up, left out; all
its loop does between steps kept in); tokens/s counts the loss tokens of steps 2..N, the same on
both sides. Reported: loss tokens/s per side, the ratio angelptm / transformers per round
(median, min, max), the final loss of each and the largest per-step loss difference.
Goal (issue 20): >= 1.5x at equal loss.

    .venv/bin/python benchmarks/finetune_vs_hf.py [--repeats 3] [--steps 40]

Prints a table and writes benchmarks/results/finetune_vs_hf.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune_packing import OPTIM, ROWS, SEQ, VOCAB, build_sft_data, spread, sft_job

from angelptm.config import DataConfig, OptimConfig, config_from_dict
from angelptm.data import PackedSFTSampler, TokenFile
from angelptm.models.hf import import_hf
from angelptm.train.checkpoint import checkpoint_config
from angelptm.train.schedule import lr_at
from angelptm.train.trainer import Trainer

HF_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=768, vocab_size=VOCAB, max_position_embeddings=SEQ)
LABEL_IGNORE = -100  # transformers' ignore index
EQUAL_LOSS = 1e-4  # "equal loss": every step's losses within this relative difference (the project's parity rule)
GOAL = 1.5  # issue 20: angelptm's loss tokens/s over transformers'


def make_hf_model(folder: Path, tokenizer: Path) -> dict:
    """Save a seeded LlamaForCausalLM (and the tokenizer files) to `folder`; return its special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    special = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**HF_MODEL, **special)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer / name).read_bytes())
    return special


def step_samples(tokens: Path, steps: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per step of the packed angelptm run, its samples in order: (ids, labels with -100 where untrained).
    The samples are those of the rows that run's sampler builds (the same data config, seed and plan)."""
    data = TokenFile(tokens)
    sampler = PackedSFTSampler(data, SEQ, ROWS, seed=DataConfig().seed, overlong="truncate")
    out = []
    for step in range(steps):
        samples = []
        for number in range(step * ROWS, (step + 1) * ROWS):
            for item in sampler.members(number):
                where = sampler.samples.starts[item] + np.arange(sampler.samples.lengths[item])
                ids = np.asarray(data.tokens[where], dtype=np.int64)
                trained = np.asarray(data.loss_mask[where], dtype=bool)
                trained[0] = False  # a sample's first token is never a target
                samples.append((ids, np.where(trained, ids, LABEL_IGNORE)))
        out.append(samples)
    return out


def pad_to_longest(pad_id: int):
    """The collator: one dataset item is one step's samples, padded to the longest of them."""
    def collate(items: list[list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, torch.Tensor]:
        (samples,) = items
        longest = max(len(ids) for ids, _ in samples)
        input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), LABEL_IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, (ids, sample_labels) in enumerate(samples):
            input_ids[row, :len(ids)] = torch.from_numpy(ids)
            labels[row, :len(ids)] = torch.from_numpy(sample_labels)
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return collate


def train_ours(tokenizer: Path, tokens: Path, imported: Path, steps: int, output_dir: Path) -> dict:
    job = sft_job(tokenizer, tokens, True, steps, output_dir)
    job["model"] = dataclasses.asdict(checkpoint_config(imported).model)
    job["train"]["init_from"] = str(imported)
    trainer = Trainer(config_from_dict(job))
    step_ends, losses = [], []
    take_step = trainer.train_step

    def timed_step():
        stats = take_step()
        step_ends.append(time.perf_counter())
        losses.append(stats["loss"])
        return stats

    trainer.train_step = timed_step
    trainer.fit()
    return {"seconds": step_ends[-1] - step_ends[0], "losses": losses, "threads": torch.get_num_threads()}


def train_hf(hf_dir: Path, batches: list, pad_id: int, steps: int, output_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, Trainer as HFTrainer, TrainerCallback, TrainingArguments

    step_ends, losses = [], []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    class RecordingTrainer(HFTrainer):
        """Keeps each step's loss unrounded (the logged one is rounded to 4 digits)."""

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss))
            return loss

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    optim = OptimConfig(**OPTIM)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim, steps) / optim.lr)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=optim.lr, adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_epsilon=optim.eps,
        weight_decay=optim.weight_decay, max_grad_norm=optim.grad_clip, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        train_sampling_strategy="sequential", seed=0)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=batches, data_collator=pad_to_longest(pad_id),
                               optimizers=(optimizer, schedule), callbacks=[StepEnds()])
    trainer.train()
    return {"seconds": step_ends[-1] - step_ends[0], "losses": losses, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours_name, hf_name = "angelptm Trainer (data.pack=true)", "transformers Trainer (pad to longest)"
    runs: dict[str, list[dict]] = {ours_name: [], hf_name: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer, tokens, data_summary = build_sft_data(tmp)
        special = make_hf_model(tmp / "hf", tokenizer)
        imported = import_hf(tmp / "hf", tmp / "imported")
        batches = step_samples(tokens, args.steps)
        loss_tokens = [sum(int((labels[1:] != LABEL_IGNORE).sum()) for _, labels in step) for step in batches]
        hf_tokens = [len(step) * max(len(ids) for ids, _ in step) for step in batches]
        sides = {
            ours_name: lambda out: train_ours(tokenizer, tokens, imported, args.steps, out),
            hf_name: lambda out: train_hf(tmp / "hf", batches, special["pad_token_id"], args.steps, out),
        }
        for round_ in range(args.repeats):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))  # alternating, order swapped
            for name in order:
                run = sides[name](tmp / f"run{round_}-{len(runs[name])}-{name.split()[0]}")
                run["loss_tokens_per_s"] = sum(loss_tokens[1:]) / run["seconds"]
                runs[name].append(run)
                print(f"round {round_ + 1} {name:40s} {run['loss_tokens_per_s']:>8,.0f} loss tokens/s "
                      f"final loss {run['losses'][-1]:.6f} (threads {run['threads']})")
    ours, theirs = runs[ours_name], runs[hf_name]
    ratios = [a["loss_tokens_per_s"] / b["loss_tokens_per_s"] for a, b in zip(ours, theirs)]
    per_step = [max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"])) for a, b in zip(ours, theirs)]
    final_diff = [abs(a["losses"][-1] - b["losses"][-1]) for a, b in zip(ours, theirs)]
    rows = []
    print(f"\n{'side':40s} {'loss tok/s median':>18s} {'(min-max)':>19s} {'final loss':>11s}")
    for name, side_runs in runs.items():
        row = {"side": name, "loss_tokens_per_s": spread([r["loss_tokens_per_s"] for r in side_runs]),
               "final_loss": spread([r["losses"][-1] for r in side_runs]),
               "losses_round_1": side_runs[0]["losses"]}
        rows.append(row)
        lt = row["loss_tokens_per_s"]
        print(f"{name:40s} {lt['median']:>18,.0f} {lt['min']:>9,.0f}-{lt['max']:<9,.0f} "
              f"{row['final_loss']['median']:>11.6f}")
    rows[0]["speedup_vs_transformers"] = spread(ratios)
    s = rows[0]["speedup_vs_transformers"]
    met = s["median"] >= GOAL and max(per_step) < EQUAL_LOSS
    print(f"angelptm / transformers (loss tokens/s): median {s['median']:.2f}x, min {s['min']:.2f}x, "
          f"max {s['max']:.2f}x; final-loss difference up to {max(final_diff):.2e}, "
          f"per-step relative up to {max(per_step):.2e}; "
          f"goal >= {GOAL}x at equal loss {'met' if met else 'NOT met'}")
    results = Path(__file__).resolve().parent / "results" / "finetune_vs_hf.json"
    results.write_text(json.dumps({
        "benchmark": "finetune_vs_hf", "repeats": args.repeats, "steps": args.steps,
        "data": {**data_summary,
                 "what": "finetune_packing.py's chat set (long-tailed lengths, loss on assistant tokens)"},
        "job": {"model": {"hf": "LlamaForCausalLM", **HF_MODEL}, "optim": OPTIM, "seq_len": SEQ,
                "angelptm": f"Trainer, data.pack=true, {ROWS} rows of {SEQ} tokens a step, train.init_from the "
                            "import_hf checkpoint",
                "transformers": "transformers.Trainer, each step the samples of angelptm's step in its order, "
                                "padded to the longest in the batch, labels -100 off the assistant tokens, sdpa "
                                "attention, torch AdamW with the same groups and a LambdaLR of angelptm's schedule",
                "precision": "float32", "process": "one process, CPU, torch threads 1"},
        "tokens_per_step": {"loss_tokens_mean": statistics.mean(loss_tokens),
                            "angelptm_row_tokens": ROWS * SEQ,
                            "transformers_padded_tokens_mean": statistics.mean(hf_tokens),
                            "samples_per_step_mean": statistics.mean(len(step) for step in batches)},
        "timing": "from the end of step 1 to the end of the last step; loss tokens of steps 2..N",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "note": "cores shared with other jobs while measured; sides alternate, order swapped each round"},
        "goals": {"vs_transformers": GOAL, "equal_loss_per_step_relative": EQUAL_LOSS},
        "goal_met": met,
        "loss_agreement": {"final_loss_abs_difference_max": max(final_diff),
                           "per_step_relative_difference_max": max(per_step)},
        "results": rows,
    }, indent=2))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
