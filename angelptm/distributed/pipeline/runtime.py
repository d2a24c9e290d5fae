"""Execute one rank's schedule: run its stages' compute and post its point-to-point batches, in order.

The runner makes no decisions: the action list says what runs when. Tensor shapes are fixed when
the runner is built, so a receive allocates its buffer at once and no step ever exchanges shapes.
Each run of consecutive send/recv actions is one `batch_isend_irecv`; its receives are waited
before the next compute (which needs them), its sends only at the end of the step. Gradients are
left in the stages' parameters, scaled as in a single process (mean over the microbatches), and
the step's mean loss is returned on every rank of the pipeline.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from angelptm.distributed.collectives import Group, count_bytes
from angelptm.distributed.pipeline.schedules import (
    BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, RECV_ACTIVATION, RECV_GRAD, SEND_ACTIVATION, SENDS,
    Action, batches, forward_only, peer_of,
)
from angelptm.distributed.pipeline.split_backward import (
    WeightWork, postpone_weight_grads, run_weight_grads, split_linear_backward,
)

Key = tuple[int, int]  # (stage, microbatch)


class _StepState:
    """Tensors in flight during one step, each dropped as soon as its last user has run."""

    def __init__(self, stage_kwargs: Sequence[dict[str, Any]]) -> None:
        self.stage_kwargs = stage_kwargs  # per microbatch, for every stage's forward
        self.inputs: dict[Key, torch.Tensor] = {}  # stage inputs, for their gradients
        self.outputs: dict[Key, torch.Tensor] = {}  # stage outputs (the scaled loss on the last stage)
        self.input_grads: dict[Key, torch.Tensor] = {}  # waiting to be sent upstream
        self.received: dict[Action, torch.Tensor] = {}  # keyed by the receive action
        self.weight_work: dict[Key, list[WeightWork]] = {}  # zero-bubble: postponed dW
        self.pending_sends: list[tuple[dist.Work, torch.Tensor]] = []  # tensors kept alive until sent
        self.losses: list[torch.Tensor] = []


class PipelineRunner:
    """Runs `actions` (this rank's list from `build_schedule`) over `stages` (this rank's chunks).

    `stages[c]` is stage c·pp + rank (from `split_model`); `activation_shape` is the shape of the
    hidden states passed between stages (and of their gradients); `loss_fn(output, target)`
    returns a microbatch's loss on the last stage, which the runner averages over the microbatches
    (the trainer's is scaled so that this average is the mean over the batch's loss tokens); `autocast` (a reusable context manager)
    wraps each forward and loss.
    """

    def __init__(self, stages: Sequence[nn.Module], actions: list[Action], group: Group,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 activation_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", autocast: Optional[ContextManager] = None):
        self.stages = list(stages)
        self.actions = actions
        self.group = group
        self.pp = group.size
        self.num_stages = self.pp * len(self.stages)
        used = {a.stage // self.pp for a in actions}
        if used != set(range(len(self.stages))):
            raise ValueError(f"the schedule uses chunks {sorted(used)} but {len(self.stages)} stages were given")
        self.microbatches = len({a.microbatch for a in actions if a.kind == FORWARD})
        self.forward_actions = forward_only(self.pp, self.microbatches, len(self.stages))[group.rank]
        self.loss_fn = loss_fn
        self.shape = torch.Size(activation_shape)
        self.dtype, self.device = dtype, torch.device(device)
        self.autocast = autocast or nullcontext()
        self.timeline: list[tuple[Action, float, float]] = []  # the last step's compute, host timestamps
        if any(a.kind == BACKWARD_WEIGHT for a in actions):
            for stage in self.stages:
                split_linear_backward(stage)
        # NCCL wants every rank of a group in the group's first call; P2P calls involve only two.
        dist.barrier(group=group.pg)

    def step(self, inputs: Optional[Sequence[torch.Tensor]], targets: Optional[Sequence[torch.Tensor]],
             stage_kwargs: Optional[Sequence[dict[str, Any]]] = None) -> float:
        """Run one step; return the mean loss over the microbatches, on every pp rank.

        `inputs[k]` (token ids of microbatch k) are read only on the rank holding stage 0 and
        `targets[k]` only on the one holding the last stage; other ranks may pass None.
        `stage_kwargs[k]` are keyword arguments every stage's forward takes for microbatch k (the
        positions and doc ids of packed rows, which every layer needs), so every rank passes them.
        """
        return self._run(self.actions, inputs, targets, stage_kwargs)

    @torch.no_grad()
    def evaluate(self, inputs: Optional[Sequence[torch.Tensor]], targets: Optional[Sequence[torch.Tensor]],
                 stage_kwargs: Optional[Sequence[dict[str, Any]]] = None) -> float:
        """The mean loss over the microbatches, forwards only (no gradients), on every pp rank."""
        return self._run(self.forward_actions, inputs, targets, stage_kwargs)

    def _run(self, actions: list[Action], inputs, targets, stage_kwargs) -> float:
        holds = {a.stage for a in actions}
        for name, seq, stage in (("inputs", inputs, 0), ("targets", targets, self.num_stages - 1)):
            if stage in holds and (seq is None or len(seq) != self.microbatches):
                raise ValueError(f"stage {stage} needs {self.microbatches} microbatches of {name}")
        if stage_kwargs is not None and len(stage_kwargs) != self.microbatches:
            raise ValueError(f"stage_kwargs holds {len(stage_kwargs)} microbatches, not {self.microbatches}")
        state = _StepState(stage_kwargs or [{}] * self.microbatches)
        self.timeline = []
        for item in batches(actions):
            if isinstance(item, Action):
                start = time.perf_counter()
                self._compute(item, inputs, targets, state)
                self.timeline.append((item, start, time.perf_counter()))
            else:
                self._exchange(item, state)
        for work, _ in state.pending_sends:
            work.wait()
        return self._mean_loss(state)

    # -----------------------------------------------------------------------------------------

    def _compute(self, action: Action, inputs, targets, state: _StepState) -> None:
        key = (action.stage, action.microbatch)
        if action.kind == FORWARD:
            self._forward(action, inputs, targets, state)
        elif action.kind in (BACKWARD, BACKWARD_INPUT):
            output = state.outputs.pop(key)
            grad = None if action.stage == self.num_stages - 1 else state.received.pop(Action(RECV_GRAD, *key))
            if action.kind == BACKWARD_INPUT:
                with postpone_weight_grads() as work:
                    torch.autograd.backward(output, grad)
                state.weight_work[key] = work
            else:
                torch.autograd.backward(output, grad)
            stage_input = state.inputs.pop(key)
            if action.stage > 0:
                state.input_grads[key] = stage_input.grad
        else:
            run_weight_grads(state.weight_work.pop(key))

    def _forward(self, action: Action, inputs, targets, state: _StepState) -> None:
        key = (action.stage, action.microbatch)
        if action.stage == 0:
            x = inputs[action.microbatch]
        else:
            x = state.received.pop(Action(RECV_ACTIVATION, *key)).requires_grad_()
        with self.autocast:
            y = self.stages[action.stage // self.pp](x, **state.stage_kwargs[action.microbatch])
            if action.stage == self.num_stages - 1:
                loss = self.loss_fn(y, targets[action.microbatch])
        state.inputs[key] = x
        if action.stage == self.num_stages - 1:
            state.losses.append(loss.detach())
            # Each microbatch adds 1/m of its gradient, as the single-process mean over microbatches.
            state.outputs[key] = loss / self.microbatches
        else:
            state.outputs[key] = y

    def _exchange(self, batch: list[Action], state: _StepState) -> None:
        ops = []
        for action in batch:
            key = (action.stage, action.microbatch)
            if action.kind in SENDS:
                source = state.outputs[key].detach() if action.kind == SEND_ACTIVATION else state.input_grads.pop(key)
                if source.shape != self.shape:
                    raise ValueError(
                        f"stage {action.stage} sends a tensor of shape {tuple(source.shape)}, but the pipeline "
                        f"was built for activation_shape={tuple(self.shape)}"
                    )
                tensor, op = source.contiguous(), dist.isend
                count_bytes(self.group, tensor.numel() * tensor.element_size())
            else:
                tensor, op = torch.empty(self.shape, dtype=self.dtype, device=self.device), dist.irecv
                state.received[action] = tensor
            ops.append(dist.P2POp(op, tensor, group=self.group.pg, group_peer=peer_of(action, self.pp)))
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):
            # A coalescing backend (NCCL) returns one handle for the batch; waiting on it only
            # orders the device streams, so the host goes on at once.
            for work in works:
                work.wait()
            return
        for op, work in zip(ops, works):
            if op.op is dist.irecv:
                work.wait()
            else:
                state.pending_sends.append((work, op.tensor))

    def _mean_loss(self, state: _StepState) -> float:
        if state.losses:
            loss = torch.stack(state.losses).mean().float()
        else:
            loss = torch.zeros((), device=self.device)
        dist.broadcast(loss, group=self.group.pg, group_src=self.pp - 1)
        return loss.item()
