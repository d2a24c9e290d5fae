"""Loss normalisation: the loss is the mean over the loss tokens of the whole global batch, not a mean of
microbatch means. With targets masked so that microbatches hold unequal numbers of loss tokens, the
loss and the weights after training are the same for gradient accumulation 1, 2 and 4 and for dp 1
and 2, the reported loss is the true token mean of the batch, and so is the validation loss."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from angelptm.config import config_from_dict
from angelptm.data import TokenSampler, build_datasets
from angelptm.data.prefetch import Prefetcher
from angelptm.data.rows import IGNORE, Rows
from angelptm.data.sampler import sample_indices
from angelptm.distributed import materialize
from angelptm.distributed.parity import TINY_JOB, LayoutRun, compare
from angelptm.distributed.spawn import run_distributed
from angelptm.models.llama import build_llama
from angelptm.train.checkpoint import load_model
from angelptm.train.evaluate import Validation

JOB = {**TINY_JOB, "model": {**TINY_JOB["model"], "n_layers": 2}, "optim": {"warmup_steps": 2},
       "train": {**TINY_JOB["train"], "steps": 4, "global_batch": 8, "micro_batch": 8}}
EVAL_BATCHES = 2


class MaskedWindows(TokenSampler):
    """The token windows with a prompt of IGNORE targets at the start of each row, its length a
    function of the sample number g (13·g mod seq_len): rows take from 1 to seq_len loss tokens, so
    the microbatches of a batch hold unequal numbers of them, as SFT batches do."""

    def microbatch(self, step: int, start: int, count: int) -> Rows:
        rows = super().microbatch(step, start, count)
        prompt = torch.from_numpy(sample_indices(step, start, count, self.global_batch) * 13 % self.seq_len)
        masked = torch.arange(self.seq_len)[None, :] < prompt[:, None]
        return Rows(rows.inputs, rows.targets.masked_fill(masked, IGNORE), rows.positions, rows.doc_ids)


def _train_with_sampler(job: dict, runs: list[list[str]], output_root: str, sampler_class: type) -> list:
    """On every rank: for each list of settings, the real Trainer reading `sampler_class` over its own
    data (in place of the sampler the config builds, as a packed sampler would be); the validation
    loss over EVAL_BATCHES batches of that sampler before training, then training to the end."""
    from angelptm.train.trainer import Trainer

    results = []
    for i, settings in enumerate(runs):
        trainer = Trainer(config_from_dict(job, settings + [f"train.output_dir={output_root}/{i}"]))
        t = trainer.cfg.train
        trainer.sampler = sampler_class(trainer.sampler.dataset, t.seq_len, t.global_batch, trainer.cfg.data.seed)
        trainer.batches = Prefetcher(functools.partial(trainer.host_rows, trainer.sampler))
        val_loss = Validation(trainer.sampler, 1, EVAL_BATCHES).run(trainer)["val_loss"]
        record = trainer.fit()
        results.append((record["loss"], record["comm_bytes"], val_loss))
    dist.destroy_process_group()
    return results


def run_with_sampler(sampler_class: type, runs: list[list[str]], world_size: int,
                     job: Optional[dict] = None) -> list[LayoutRun]:
    """As `angelptm.distributed.parity.run_layouts`, one run per list of settings (`--set` overrides),
    with the Trainer reading `sampler_class`; each run's `val_losses` holds the validation loss
    taken before training."""
    with tempfile.TemporaryDirectory() as out:
        per_rank = run_distributed(_train_with_sampler, world_size, job or JOB, runs, out, sampler_class,
                                   init_group=False)
        results = []
        for i in range(len(runs)):
            records = [json.loads(line) for line in (Path(out) / str(i) / "metrics.jsonl").read_text().splitlines()]
            _, model = load_model(Path(out) / str(i))  # the final checkpoint's full weights
            ranks = [rank_results[i] for rank_results in per_rank]
            results.append(LayoutRun([r["loss"] for r in records], [r["grad_norm"] for r in records],
                                     [loss for loss, _, _ in ranks],
                                     {name: p.detach() for name, p in model.named_parameters()},
                                     ranks[0][1], [ranks[0][2]], records))
    return results


def token_mean_loss(model: torch.nn.Module, rows: Rows) -> float:
    """The mean cross-entropy over the loss tokens of `rows`, computed directly with the plain model."""
    logits = model(rows.inputs, rows.positions, rows.doc_ids)
    return F.cross_entropy(logits.flatten(0, 1), rows.targets.flatten(), ignore_index=IGNORE).item()


def sampler_and_model(sampler_class: type, job: dict):
    """The sampler the runs read and the plain model at the Trainer's initial weights."""
    cfg = config_from_dict(job)
    train, _ = build_datasets(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)
    sampler = sampler_class(train, cfg.train.seq_len, cfg.train.global_batch, cfg.data.seed)
    return sampler, materialize(build_llama(cfg.model), torch.device("cpu"), cfg.train.seed)


def concatenated(batches: list[Rows]) -> Rows:
    return Rows(*(None if parts[0] is None else torch.cat(parts) for parts in zip(
        *((b.inputs, b.targets, b.positions, b.doc_ids) for b in batches))))


def test_microbatches_hold_unequal_loss_token_counts():
    sampler, _ = sampler_and_model(MaskedWindows, JOB)
    counts = [sampler.microbatch(0, start, 2).loss_tokens() for start in range(0, 8, 2)]
    assert len(set(counts)) == 4 and max(counts) > 1.5 * min(counts), counts


@pytest.fixture(scope="module")
def reference():
    """Accumulation 1: the whole global batch in one microbatch, on one process."""
    return run_with_sampler(MaskedWindows, [[]], 1)[0]


@pytest.mark.slow
@torch.no_grad()
def test_loss_is_the_token_mean_of_the_global_batch(reference):
    sampler, model = sampler_and_model(MaskedWindows, JOB)
    first_step = token_mean_loss(model, sampler.microbatch(0, 0, JOB["train"]["global_batch"]))
    assert abs(reference.losses[0] - first_step) / first_step < 1e-6
    validation = token_mean_loss(model, concatenated([sampler.microbatch(step, 0, JOB["train"]["global_batch"])
                                                      for step in range(EVAL_BATCHES)]))
    assert abs(reference.val_losses[0] - validation) / validation < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("world, settings", [
    (1, [["train.micro_batch=4"], ["train.micro_batch=2"]]),
    (2, [["parallel.dp=2", "train.micro_batch=4"], ["parallel.dp=2", "train.micro_batch=1"]]),
], ids=["accumulation-2-and-4", "dp2-accumulation-1-and-4"])
def test_same_losses_and_weights_under_every_accumulation_and_dp(reference, world, settings):
    for run_settings, run in zip(settings, run_with_sampler(MaskedWindows, settings, world)):
        loss_diff, weight_diff = compare(run, reference)
        val_diff = abs(run.val_losses[0] - reference.val_losses[0]) / reference.val_losses[0]
        print(run_settings, f"loss {loss_diff:.1e} weights {weight_diff:.1e} val_loss {val_diff:.1e}")
        assert loss_diff < 1e-6 and weight_diff < 1e-5 and val_diff < 1e-6, (run_settings, loss_diff, weight_diff)
        assert len(set(run.last_losses)) == 1
