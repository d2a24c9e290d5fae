"""Pipeline schedules as data: for each pp rank, the explicit list of actions it executes in one step.

A schedule function decides only the order of compute on each rank (forward, backward, or the
split backward of zero-bubble: input-gradient then weight-gradient), in ticks of compute that run
back to back. `_with_communication` then adds the point-to-point traffic the same way for every
schedule: a tick's sends right after it, its receives right before it. Consecutive send/recv
actions form one batch, which the runtime posts with a single `batch_isend_irecv`.

Stages are numbered globally, 0 .. pp·v-1 for v virtual stages per rank; stage s lives on rank
s % pp as that rank's chunk s // pp (Megatron's interleaved placement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

from angelptm.errors import ConfigError

FORWARD = "F"
BACKWARD = "B"  # input and weight gradients in one pass
BACKWARD_INPUT = "I"  # zero-bubble: gradient w.r.t. the stage input only
BACKWARD_WEIGHT = "W"  # zero-bubble: the deferred weight gradients
SEND_ACTIVATION = "send_act"  # stage s's output to stage s+1
RECV_ACTIVATION = "recv_act"  # stage s's input from stage s-1
SEND_GRAD = "send_grad"  # gradient of stage s's input to stage s-1
RECV_GRAD = "recv_grad"  # gradient of stage s's output from stage s+1

SENDS = (SEND_ACTIVATION, SEND_GRAD)
COMMUNICATION = (SEND_ACTIVATION, RECV_ACTIVATION, SEND_GRAD, RECV_GRAD)


@dataclass(frozen=True)
class Action:
    kind: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}(stage {self.stage}, mb {self.microbatch})"


Schedule = list[list[Action]]  # schedule[pp_rank] = that rank's actions, in execution order


def batches(actions: list[Action]) -> Iterator[Union[Action, list[Action]]]:
    """Yield the compute actions one by one and each run of consecutive send/recv as one list."""
    run: list[Action] = []
    for action in actions:
        if action.kind in COMMUNICATION:
            run.append(action)
            continue
        if run:
            yield run
            run = []
        yield action
    if run:
        yield run


def peer_of(action: Action, pp: int) -> int:
    """The pp rank on the other end of a send or receive."""
    towards_next = action.kind in (SEND_ACTIVATION, RECV_GRAD)
    return (action.stage + (1 if towards_next else -1)) % pp


def matching_recv(send: Action) -> Action:
    """The receive, on the peer, that a send must meet."""
    if send.kind == SEND_ACTIVATION:
        return Action(RECV_ACTIVATION, send.stage + 1, send.microbatch)
    return Action(RECV_GRAD, send.stage - 1, send.microbatch)


# ---------------------------------------------------------------------------------------------
# Compute orders. A rank's order is a list of ticks: compute that runs back to back, with one
# batch of communication between consecutive ticks.


def _single(actions: list[Action]) -> list[list[Action]]:
    return [[a] for a in actions]


def _gpipe_ticks(rank: int, m: int) -> list[list[Action]]:
    return _single([Action(FORWARD, rank, k) for k in range(m)] + [Action(BACKWARD, rank, k) for k in range(m)])


def _one_f_one_b_ticks(rank: int, pp: int, m: int) -> list[list[Action]]:
    """Warm up with the forwards that fill the pipeline below this rank, then alternate F and B."""
    warmup = min(pp - rank - 1, m)
    order = [Action(FORWARD, rank, k) for k in range(warmup)]
    for k in range(m - warmup):
        order += [Action(FORWARD, rank, warmup + k), Action(BACKWARD, rank, k)]
    order += [Action(BACKWARD, rank, k) for k in range(m - warmup, m)]
    return _single(order)


def _zero_bubble_h1_ticks(rank: int, pp: int, m: int) -> list[list[Action]]:
    """1F1B with the backward split in two; weight passes are postponed to fill the cooldown.

    Forwards and input-gradient passes keep 1F1B's order. Rank r postpones its weight passes by
    r microbatches in the steady phase, which shortens the critical input-gradient chain back up
    the pipeline, and spends that backlog in the cooldown where 1F1B idles. Rank r then holds at
    most (pp - r) + r = pp microbatches, the peak of 1F1B's first stage.
    """
    warmup = min(pp - rank - 1, m)
    lag = min(rank, m)
    order = [Action(FORWARD, rank, k) for k in range(warmup)]
    weights_done = 0
    for k in range(m):
        if warmup + k < m:
            order.append(Action(FORWARD, rank, warmup + k))
        order.append(Action(BACKWARD_INPUT, rank, k))
        if k >= lag:
            order.append(Action(BACKWARD_WEIGHT, rank, weights_done))
            weights_done += 1
    order += [Action(BACKWARD_WEIGHT, rank, k) for k in range(weights_done, m)]
    return _single(order)


def _interleaved_ticks(rank: int, pp: int, m: int, v: int) -> list[list[Action]]:
    """1F1B over the rank's v chunks: microbatches go through the chunks in groups of pp.

    The i-th forward is microbatch (i // (pp·v))·pp + i % pp of chunk (i // pp) % v; backwards
    visit the chunks in reverse. The warmup covers the forwards that must run before the first
    backward reaches this rank. Each steady-state forward and backward share one tick, so all
    ranks exchange in lockstep, one batch per pair; with separate ticks the wrap-around from the
    last rank to the first closes a cycle of sends that all wait for one another.
    """
    total = m * v

    def unit(i: int, backward: bool) -> Action:
        chunk = (i // pp) % v
        if backward:
            chunk = v - 1 - chunk
        mb = (i // (pp * v)) * pp + i % pp
        return Action(BACKWARD if backward else FORWARD, chunk * pp + rank, mb)

    warmup = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    ticks = [[unit(i, False)] for i in range(warmup)]
    ticks += [[unit(warmup + i, False), unit(i, True)] for i in range(total - warmup)]
    ticks += [[unit(i, True)] for i in range(total - warmup, total)]
    return ticks


# ---------------------------------------------------------------------------------------------
# Communication, the same for every schedule


def _needs(action: Action, num_stages: int) -> Action | None:
    """The receive that must complete before `action` can run, if any."""
    if action.kind == FORWARD and action.stage > 0:
        return Action(RECV_ACTIVATION, action.stage, action.microbatch)
    if action.kind in (BACKWARD, BACKWARD_INPUT) and action.stage < num_stages - 1:
        return Action(RECV_GRAD, action.stage, action.microbatch)
    return None


def _produces(action: Action, num_stages: int) -> Action | None:
    """The send that `action`'s result feeds, if any."""
    if action.kind == FORWARD and action.stage < num_stages - 1:
        return Action(SEND_ACTIVATION, action.stage, action.microbatch)
    if action.kind in (BACKWARD, BACKWARD_INPUT) and action.stage > 0:
        return Action(SEND_GRAD, action.stage, action.microbatch)
    return None


def _with_communication(ticks: list[list[list[Action]]], pp: int) -> Schedule:
    """Flatten each rank's ticks, with a tick's receives before it and its sends after it.

    Messages between two ranks are matched in the order they were posted, so a receive must
    never be posted ahead of one the peer sends earlier: before each tick this rank posts every
    not-yet-posted receive from a peer up to the last one the tick needs, in the peer's send
    order. The earlier ones were sent first, so waiting for them costs nothing extra.
    """
    num_stages = 1 + max(a.stage for rank_ticks in ticks for tick in rank_ticks for a in tick)
    # incoming[r][q]: the receives rank r must post for peer q, in the order q sends them.
    incoming: list[dict[int, list[Action]]] = [{} for _ in range(pp)]
    for q, rank_ticks in enumerate(ticks):
        for action in (a for tick in rank_ticks for a in tick):
            send = _produces(action, num_stages)
            if send is not None:
                incoming[peer_of(send, pp)].setdefault(q, []).append(matching_recv(send))
    schedule: Schedule = []
    for r, rank_ticks in enumerate(ticks):
        posted = dict.fromkeys(incoming[r], 0)
        actions: list[Action] = []
        for tick in rank_ticks:
            for recv in filter(None, (_needs(a, num_stages) for a in tick)):
                q = peer_of(recv, pp)
                upto = incoming[r][q].index(recv) + 1
                if upto > posted[q]:
                    actions += incoming[r][q][posted[q]:upto]
                    posted[q] = upto
            actions += tick
            actions += filter(None, (_produces(a, num_stages) for a in tick))
        schedule.append(actions)
    return schedule


# ---------------------------------------------------------------------------------------------
# The schedules


def gpipe(pp: int, microbatches: int) -> Schedule:
    """All forwards, then all backwards: simplest, and holds every microbatch's activations."""
    return _with_communication([_gpipe_ticks(r, microbatches) for r in range(pp)], pp)


def one_f_one_b(pp: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): GPipe's bubble with at most pp microbatches in flight."""
    return _with_communication([_one_f_one_b_ticks(r, pp, microbatches) for r in range(pp)], pp)


def interleaved_one_f_one_b(pp: int, microbatches: int, virtual_stages: int) -> Schedule:
    """Interleaved 1F1B: v chunks per rank shrink the bubble v-fold for v-fold more messages."""
    ticks = [_interleaved_ticks(r, pp, microbatches, virtual_stages) for r in range(pp)]
    return _with_communication(ticks, pp)


def zero_bubble_h1(pp: int, microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with split backward; weight passes fill the bubble, to about a third of 1F1B's."""
    return _with_communication([_zero_bubble_h1_ticks(r, pp, microbatches) for r in range(pp)], pp)


def forward_only(pp: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Every forward and no backward (evaluation): each rank runs its chunks in order, microbatch by microbatch."""
    ticks = [_single([Action(FORWARD, chunk * pp + r, k) for chunk in range(virtual_stages)
                      for k in range(microbatches)]) for r in range(pp)]
    return _with_communication(ticks, pp)


SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")


def build_schedule(name: str, pp: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """The schedule `parallel.pp_schedule` names, after checking the combination can work."""
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={name!r} is not one of: {', '.join(SCHEDULES)}")
    if pp < 1 or microbatches < 1 or virtual_stages < 1:
        raise ConfigError(
            f"a pipeline needs parallel.pp={pp}, microbatches={microbatches} and "
            f"parallel.pp_virtual_stages={virtual_stages} all >= 1"
        )
    if virtual_stages > 1 and name != "interleaved":
        raise ConfigError(
            f"parallel.pp_virtual_stages={virtual_stages} needs parallel.pp_schedule=interleaved "
            f"(got {name}); set one or the other"
        )
    if name == "interleaved":
        if pp < 2:
            raise ConfigError("parallel.pp_schedule=interleaved needs parallel.pp >= 2; use 1f1b for pp=1")
        if microbatches % pp:
            raise ConfigError(
                f"parallel.pp_schedule=interleaved needs the microbatch count (train.global_batch / "
                f"(train.micro_batch × dp) = {microbatches}) to be a multiple of parallel.pp={pp}; "
                "change train.global_batch"
            )
        return interleaved_one_f_one_b(pp, microbatches, virtual_stages)
    return {"gpipe": gpipe, "1f1b": one_f_one_b, "zero_bubble": zero_bubble_h1}[name](pp, microbatches)
