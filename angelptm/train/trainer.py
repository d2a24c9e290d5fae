"""The Trainer: config -> mesh -> model -> parallelize -> optimizer -> data -> loop -> metrics, checkpoints.

It reads top to bottom as the data flows. Everything that depends on the layout lives in
`angelptm.distributed` (and ZeROCache); this file only calls it, so a single process and a
4D-parallel job run the same loop. Every check of user input happens before anything is written
to the output folder, so a bad config or checkpoint leaves nothing half-written behind.
"""

from __future__ import annotations

import functools
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from angelptm import distributed
from angelptm.config import Config, save_config
from angelptm.data import build_datasets, build_sampler
from angelptm.data.prefetch import Prefetcher
from angelptm.data.rows import Rows
from angelptm.distributed.collectives import all_reduce, comm_bytes, group_of, reset_comm_bytes
from angelptm.distributed.context_parallel import shard_sequence
from angelptm.distributed.mesh import DATA_DIMS, ParallelDims, device_of, validate_layout, world_from_env
from angelptm.distributed.pipeline import PipelineRunner, build_schedule, merge_stages, split_model, stage_layer_ranges
from angelptm.distributed.tensor_parallel import vocab_slice
from angelptm.errors import ConfigError, UserError
from angelptm.finetune import lora
from angelptm.fp8 import update_float8_scales
from angelptm.models.llama import build_llama, flops_per_token
from angelptm.train.routing_stats import MoEStepStats
from angelptm.train import checkpoint as ckpt
from angelptm.train.faults import OutputLock, Preemption, SkipCounter, TrainingStopped
from angelptm.train.loggers import build_loggers
from angelptm.train.loss import TokenMeanLoss
from angelptm.train.evaluate import Validation
from angelptm.train.metrics import MetricsLogger, peak_flops
from angelptm.train.preflight import check_run
from angelptm.train.schedule import lr_at
from angelptm.zerocache import ZeROCacheOptimizer


class Trainer:
    """Build everything a run needs from `cfg`; `fit()` trains and returns the last step's record.

    Where a run starts: a resume point (`train.resume`: with `auto`, the newest complete checkpoint
    in the run's own output_dir) continues that run exactly. Only when there is none does
    `train.init_from` apply: a fresh run (step 0, zero optimizer moments, its own LR schedule)
    from that checkpoint's weights. So a fine-tuning job that restarts resumes its own progress
    instead of starting over from the weights it began with.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        if cfg.model.arch != "llama":
            raise ConfigError(f"model.arch={cfg.model.arch} can be planned but not trained; set model.arch=llama")

        # Layout: checked before any process-group work so every rank fails the same way.
        p = cfg.parallel
        _, _, world_size = world_from_env()
        self.dims = ParallelDims.from_config(p, world_size)
        validate_layout(self.dims, cfg)
        self.accum_steps = cfg.grad_accum_steps(self.dims.dp)
        # What this machine cannot hold is refused from the planner's estimate, before anything is
        # built (a model of millions of layers takes minutes to build even on the meta device).
        warnings = check_run(cfg, self.dims)
        meta_model = build_llama(cfg.model, "meta")
        schedule = build_schedule(p.pp_schedule, self.dims.pp, self.accum_steps, p.pp_virtual_stages)
        stage_layer_ranges(meta_model, self.dims.pp * p.pp_virtual_stages, t.seq_len)  # can the layers be split?
        self.mesh = distributed.init(self.dims, self._backend(), p.timeout_s)
        self.rank = dist.get_rank()
        self.dp_rank = self.mesh["dp"].get_local_rank()
        # tp ranks share a microbatch; cp ranks split its sequence; dp and cp together split the step's tokens.
        self.pp, self.tp, self.cp, self.data_group = (group_of(self.mesh, d) for d in ("pp", "tp", "cp", DATA_DIMS))
        self.device = self._pick_device(t.device)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        train_data, valid_data = self._build_datasets()
        self.sampler = build_sampler(train_data, t.seq_len, t.global_batch, cfg.data.seed, cfg.data)
        warnings += [note for note in [self.sampler.note()] if note]  # SFT samples truncated or dropped
        self.batches = Prefetcher(functools.partial(self.host_rows, self.sampler))
        self.validation = None if valid_data is None or not t.eval_every else Validation(
            build_sampler(valid_data, t.seq_len, t.global_batch, cfg.data.seed, cfg.data), t.eval_every,
            t.eval_batches)

        # The output folder is this run's alone from here on; a failure before training begins
        # takes back what the lock created, so bad input leaves nothing behind.
        self.output_dir = Path(t.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.lock = OutputLock(self.output_dir)
        self._on_rank0(self.lock.acquire)
        try:
            self._build(cfg, meta_model, schedule, warnings)
        except BaseException:
            self.lock.release(undo=True)
            raise

    def _build(self, cfg: Config, meta_model: torch.nn.Module, schedule: list, notes: list[str]) -> None:
        t, p = cfg.train, cfg.parallel
        # Resume point: found and verified before anything is written to the output folder.
        notes = notes + (self._on_rank0(lambda: ckpt.recover_interrupted_saves(self.ckpt_root)) or [])
        resume_from, resume_record, skipped = self._find_resume_point()
        notes += skipped
        init_from, init_record = (None, None) if resume_from else self._find_init_point()
        if resume_from:
            self._check_same_model(resume_from, "set train.resume=never")
        elif init_from:
            self._check_same_model(init_from, "point train.init_from at a checkpoint of this model")

        # Model: cut on the meta device into this rank's pipeline stages (the whole model when pp=1),
        # each transformed for the layout and materialised; the runner executes the schedule over them.
        stages = [
            distributed.materialize(distributed.parallelize(stage, self.mesh, cfg), self.device, t.seed)
            for stage in split_model(meta_model, self.pp.rank, self.pp.size, p.pp_virtual_stages, t.seq_len)
        ]
        self.model = merge_stages(stages)  # this rank's parameters under their full names
        # The routing losses' gradient is scaled as a microbatch's loss is: 1/m for the runner's mean
        # over m microbatches, times cp because the cp ranks' gradients are averaged, though each
        # holds its own tokens' part of the one loss (tp ranks' parts are summed).
        self.moe_stats = MoEStepStats(self.model, self.device)
        self.moe_stats.watch(stages, aux_loss_scale=self.cp.size / self.accum_steps)
        # ZeROCache, the data-parallel engine, shards over dp × cp; the mesh also tells it the tp
        # slices (partial gradients, norm, checkpoint places) and the pp stages (norm) it holds.
        self.optimizer = ZeROCacheOptimizer.from_config(self.model, self.mesh, cfg)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if cfg.precision.dtype == "bfloat16" else nullcontext()
        )
        hidden_seq_shards = self.cp.size * (self.tp.size if p.sequence_parallel else 1)
        head = stages[-1]
        self.token_loss = TokenMeanLoss(self.data_group)
        self.runner = PipelineRunner(
            stages, schedule[self.pp.rank], self.pp,
            lambda logits, targets: self._loss(logits, targets, vocab_slice(head)),
            activation_shape=(t.micro_batch, t.seq_len // hidden_seq_shards, cfg.model.dim),
            device=self.device, autocast=self.autocast,
        )

        self.step = 0
        if resume_from:
            self.step = self._load(resume_from, resume_record)
        elif init_from:
            self._load(init_from, init_record, weights_only=True)

        # Rank 0's TensorBoard / W&B writers, made before anything else is written: a missing
        # package stops every rank with one line and leaves the output folder as it was.
        loggers = self._on_rank0(lambda: build_loggers(cfg, self.output_dir, self.step)) or []
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            save_config(cfg, self.output_dir / "config.yaml")
        tokens_per_step = t.global_batch * t.seq_len
        self.flops_per_step = flops_per_token(cfg.model, t.seq_len) * tokens_per_step
        self.peak_flops = peak_flops(self.device, cfg.precision.dtype)
        self.metrics = MetricsLogger(
            self.output_dir / "metrics.jsonl", t.steps, enabled=self.rank == 0, resume_step=self.step, loggers=loggers
        )
        for note in notes:
            self.metrics.message(f"warning: {note}")
        if resume_from:
            unused = f" (train.init_from={t.init_from} applies only to a fresh run)" if t.init_from else ""
            self.metrics.message(f"resumed from {resume_from} at step {self.step}{unused}")
        elif init_from:
            self.metrics.message(f"initialised from the weights of {init_from}")
        self.skips = SkipCounter(t.max_skipped_steps)

    # -----------------------------------------------------------------------------------------
    # Set-up helpers

    def _backend(self) -> str:
        """train.device=cpu keeps a job on the CPU (gloo) even where GPUs are present."""
        backend, device = self.cfg.parallel.backend, self.cfg.train.device
        if device == "cpu" and backend == "nccl":
            raise ConfigError("train.device=cpu cannot use parallel.backend=nccl; set parallel.backend=gloo or auto")
        return "gloo" if device == "cpu" else backend

    def _pick_device(self, wanted: str) -> torch.device:
        device = device_of(self.mesh)
        if wanted == "cuda" and device.type != "cuda":
            raise ConfigError("train.device=cuda but no CUDA device is in use; set train.device=auto")
        return device

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """fn() on global rank 0 alone (its result there, None elsewhere); a UserError it raises
        stops every rank with the same line."""
        outcome: list[Any] = [None]
        result = None
        if self.rank == 0:
            try:
                result = fn()
            except UserError as e:
                outcome[0] = str(e)
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise UserError(outcome[0])
        return result

    def _build_datasets(self):
        """Rank 0 builds any cache first, so ranks do not race to write it; its error stops every rank."""
        t = self.cfg.train
        build = lambda: build_datasets(self.cfg.data, t.seq_len, self.cfg.model.vocab_size)  # noqa: E731
        dataset = self._on_rank0(build)
        return dataset if self.rank == 0 else build()

    def _find_resume_point(self) -> tuple[Optional[Path], Optional[dict[str, Any]], list[str]]:
        """The checkpoint to resume from, its verified record, and a line for each newer one
        `auto` had to skip."""
        resume = self.cfg.train.resume
        if resume == "never":
            return None, None, []
        if resume == "auto":
            found, record, skipped = ckpt.newest_complete_checkpoint(self.ckpt_root)
            if skipped and found is None:
                raise UserError(f"no complete checkpoint in {self.ckpt_root} ({skipped[0]}); delete the broken "
                                "ones or set train.resume=never")
            return found, record, skipped
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"train.resume={resume} does not exist; pass a step_<N> checkpoint folder, auto or never")
        return path, ckpt.read_train_state(path), []

    def _find_init_point(self) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
        """The checkpoint `train.init_from` names (a step_<N> folder, an imported one or a run's
        output_dir) and its verified record; consulted only when there is nothing to resume."""
        init_from = self.cfg.train.init_from
        if init_from is None:
            return None, None
        try:
            folder = ckpt.resolve_checkpoint(Path(init_from))
        except UserError as e:
            raise UserError(f"train.init_from: {e}") from None
        return folder, ckpt.read_train_state(folder)

    def _check_same_model(self, folder: Path, fix: str) -> None:
        saved = ckpt.checkpoint_config(folder).model
        if saved != self.cfg.model:
            diffs = [f"model.{k}={getattr(saved, k)}" for k in vars(saved) if getattr(saved, k) != getattr(self.cfg.model, k)]
            raise UserError(
                f"checkpoint {folder} holds a different model ({', '.join(diffs)}); "
                f"use the same model section or {fix}"
            )

    def _load(self, folder: Path, record: dict[str, Any], weights_only: bool = False) -> int:
        """Load model (and, for a training checkpoint, optimizer, sampler, RNG); return the next step.

        `weights_only` (train.init_from) takes the model's weights alone: fresh optimizer moments,
        step 0 and its own LR schedule, whatever else the checkpoint holds."""
        state = self._checkpoint_state()
        training_checkpoint = ckpt.has_optimizer_state(record) and not weights_only
        if not training_checkpoint:
            del state["optim"]  # weights only (e.g. imported): the moments start at zero
        stored = ckpt.stored_keys(folder)
        # Buffers of features the saving run had (FP8 scaling state, MoE routing biases); none for weights only.
        state["buffers"] = {k: v for k, v in state["buffers"].items() if not weights_only and f"buffers.{k}" in stored}
        fresh = lora.fresh_adapters(state["model"], stored)  # a base model's: the adapters keep their initial values
        ckpt.load_state(folder, state)
        self.optimizer.load_state_dict({**state, "model": {**state["model"], **fresh}})
        self.model.load_state_dict(state["buffers"], strict=False)
        if not training_checkpoint:
            return 0
        if record.get("world_size") == dist.get_world_size():
            ckpt.restore_rng(folder)
        return self.sampler.load_state_dict(record["sampler"])

    # -----------------------------------------------------------------------------------------
    # The loop

    def fit(self, until: Optional[int] = None) -> dict[str, Any]:
        """Train from the current step to `train.steps`, or stop early after step `until` (with a
        checkpoint there, as a job cut short by its time limit would); return the last record.

        A SIGTERM to any rank ends the run after the step in progress, with a checkpoint."""
        t = self.cfg.train
        last = min(until, t.steps) if until is not None else t.steps
        record: dict[str, Any] = {}
        start = time.perf_counter()
        first_step = self.step
        preemption = Preemption()
        try:
            while self.step < last:
                step_start = time.perf_counter()
                stats = self.train_step()
                self.step += 1
                step_time = time.perf_counter() - step_start
                preempted = not ckpt.all_ranks_ok(not preemption.requested)  # SIGTERM on any rank
                evaluated = self.validation is not None and self.validation.due(self.step)
                if evaluated:
                    stats.update(self.validation.run(self))
                if self.step % t.log_every == 0 or self.step == last or preempted or evaluated:
                    elapsed = time.perf_counter() - start
                    record = self._record(stats, step_time, elapsed / (self.step - first_step))
                    self.metrics.log(record)
                self.skips.record(self.step, stats["skipped"])
                if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == last or preempted:
                    self.save_checkpoint()
                if preempted:
                    self.metrics.message(f"SIGTERM: stopped after step {self.step} with a checkpoint; "
                                         "train.resume=auto continues from it")
                    break
            summary = self.skips.summary(self.step - first_step)
            if summary:
                self.metrics.message(summary)
        finally:
            preemption.restore()
            self.metrics.close()
        if self.step >= t.steps:
            self.lock.release()
        return record

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch: microbatches, gradient sync, clip, update.
        A step whose loss or gradient norm is not finite changes nothing but the FP8 scales."""
        t = self.cfg.train
        lr = lr_at(self.step, self.cfg.optim, t.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        reset_comm_bytes()
        # Forward and backward of every microbatch, in the order the pipeline schedule says; the
        # gradients (of the mean over the batch's loss tokens) are reduced over dp × cp once, at the end.
        with self.optimizer.no_sync():
            loss, _ = self.batch_loss(self.batches.get(self.step), self.runner.step)  # loaded while the last step ran
        self.optimizer.reduce_gradients()
        clip = self.cfg.optim.grad_clip
        grad_norm = float(self.optimizer.clip_grad_norm_(clip if clip else float("inf")))  # inf: measure only
        skipped = not (math.isfinite(grad_norm) and math.isfinite(loss))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad()
        update_float8_scales(self.model)  # delayed FP8 scaling advances every step, skipped ones too
        stats = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": skipped}
        if self.cfg.model.moe.n_experts:  # routing over the whole batch; aux-free biases move only on a taken step
            stats.update(self.moe_stats.finish_step(self.data_group, self.pp, update_bias=not skipped))
        return {**stats, "comm_bytes": self._comm_bytes(), "data_wait_s": self.batches.wait_s}

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, vocab: tuple[int, int]) -> torch.Tensor:
        """A microbatch's share of the batch's token-mean cross-entropy (`TokenMeanLoss`). The MoE
        layers' auxiliary losses train the router through the layers' outputs, so the loss
        reported stays the language model's, comparable with dense runs and val_loss
        (moe_aux_loss is logged apart)."""
        return self.token_loss.loss(logits, targets, self.tp, vocab)

    def host_rows(self, sampler, step: int) -> list[Rows]:
        """This rank's rows of `step`'s global batch on the host, one `Rows` per microbatch (pinned
        for an asynchronous copy when training on a GPU)."""
        t = self.cfg.train
        rows = [sampler.microbatch(step, (self.dp_rank * self.accum_steps + micro) * t.micro_batch, t.micro_batch)
                for micro in range(self.accum_steps)]
        return [r.map(torch.Tensor.pin_memory) for r in rows] if self.device.type == "cuda" else rows

    def microbatches(self, rows: list[Rows]) -> list[Rows]:
        """The microbatches of `host_rows` on this rank's device, every field cut to this cp rank's
        tokens (load-balanced chunks for the ring, a contiguous slice for Ulysses)."""
        mode = self.cfg.parallel.cp_mode
        return [micro.map(lambda x: shard_sequence(x.to(self.device, non_blocking=True), self.cp, mode))
                for micro in rows]

    def batch_loss(self, rows: list[Rows], run: Callable[..., float]) -> tuple[float, int]:
        """Run this rank's microbatches `rows` (from `host_rows`) through `run`, the runner's `step` or
        `evaluate`: the whole batch's loss (the mean over its loss tokens) on every rank, and their count."""
        micro = self.microbatches(rows)
        count = self.token_loss.count(micro)
        loss = run([m.inputs for m in micro], [m.targets for m in micro],
                   [{"positions": m.positions, "doc_ids": m.doc_ids} for m in micro])
        return self.mean_over_data(loss), count

    def mean_over_data(self, loss: float) -> float:
        """Each dp/cp rank ran its own tokens, its loss scaled by `TokenMeanLoss`: the average over
        them is the loss of the whole batch, which every rank then reports."""
        return all_reduce(torch.tensor(loss, device=self.device), self.data_group).item() / self.data_group.size

    def _comm_bytes(self) -> dict[str, int]:
        """Bytes this rank sent in the step, per mesh dimension; ZeROCache's page traffic is dp × cp's."""
        sent = comm_bytes()
        zerocache_sent = sum(getattr(self.optimizer, "comm_bytes", {}).values())
        if zerocache_sent:
            sent[self.data_group.name] = sent.get(self.data_group.name, 0) + zerocache_sent
        return sent

    def _record(self, stats: dict[str, float], step_time: float, mean_step_time: float) -> dict[str, Any]:
        t = self.cfg.train
        tokens = t.global_batch * t.seq_len
        record = {"step": self.step, **stats, "tokens_per_sec": tokens / step_time, "step_time_s": step_time}
        if self.peak_flops:
            record["mfu"] = self.flops_per_step / step_time / (self.peak_flops * dist.get_world_size())
        record.update(self.optimizer.memory_metrics())
        if self.device.type == "cuda":
            record["mem_device_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        record["eta_s"] = mean_step_time * (t.steps - self.step)
        record["tokens_by_source"] = self.sampler.tokens_by_source(self.step)
        return record

    # -----------------------------------------------------------------------------------------
    # Checkpoints

    def _checkpoint_state(self) -> dict[str, Any]:
        """The engine's parameters and optimizer state, and the model's persistent buffers."""
        state = self.optimizer.state_dict()
        params = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        state["buffers"] = {k: v.detach().clone() for k, v in self.model.state_dict(keep_vars=True).items()
                            if k not in params}
        return state

    def save_checkpoint(self) -> Path:
        # An update can overflow weights whose gradients were finite (a huge learning rate): such
        # weights are never saved, so every checkpoint on disk can be resumed from.
        if not self.optimizer.parameters_finite():
            raise TrainingStopped(f"the weights are not finite after step {self.step}, so no checkpoint is written; "
                                  "lower optim.lr and resume from the last checkpoint")
        train_state = {"step": self.step, "sampler": self.sampler.state_dict(self.step), "kind": "train"}
        return ckpt.save_checkpoint(
            self.ckpt_root / f"{ckpt.STEP_PREFIX}{self.step}",
            self.cfg,
            self._checkpoint_state(),
            train_state,
            keep=self.cfg.train.keep_checkpoints,
        )
