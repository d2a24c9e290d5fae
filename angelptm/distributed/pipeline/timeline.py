"""Run a schedule on paper: check that it can execute, time it with unit costs, print it as a table.

`simulate` plays every rank's action list the way the runtime does: compute takes a fixed time,
and a rank moves past a batch of sends and receives once each receive has met its send; sends
complete in the background (gloo). With `strict`, a rank also waits until each of its sends has
met its receive: the most conservative model of NCCL, whose batches complete in order on one
stream, so a schedule that runs under it cannot deadlock there either.
Anything that could not run raises `ScheduleError`: a deadlock, a receive matched to the wrong
send, a backward before its forward, a microbatch missing or done twice. The same timing gives
each rank's idle fraction, which the bubble benchmark holds the measured one against.
"""

from __future__ import annotations

from dataclasses import dataclass

from angelptm.distributed.pipeline.schedules import (
    BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, RECV_ACTIVATION, RECV_GRAD, SEND_ACTIVATION,
    SENDS, Action, Schedule, batches, matching_recv, peer_of,
)

# Backward costs twice the forward; zero-bubble splits it into two halves of the forward's cost.
UNIT_COSTS = {FORWARD: 1.0, BACKWARD: 2.0, BACKWARD_INPUT: 1.0, BACKWARD_WEIGHT: 1.0}


class ScheduleError(ValueError):
    """A schedule that cannot execute as written."""


@dataclass
class Timeline:
    spans: list[list[tuple[Action, float, float]]]  # per rank: (compute action, start, end)
    makespan: float
    peak_in_flight: list[int]  # per rank: most microbatches whose activations were alive at once
    virtual_stages: int

    def idle_fraction(self, rank: int) -> float:
        busy = sum(end - start for _, start, end in self.spans[rank])
        return 1.0 - busy / self.makespan


def theoretical_idle_fraction(name: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble time over step time for equal-cost stages (F = I = W, B = I + W).

    GPipe and 1F1B idle (p-1) forward+backward slots out of m+p-1; interleaving divides the
    bubble (relative to compute) by v; ZB-H1 leaves (p-1)·(F + I - W) = (p-1)·F idle out of 3m·F.
    """
    p, m, v = pp, microbatches, virtual_stages
    if name in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if name == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if name == "zero_bubble":
        return (p - 1) / (3 * m + p - 1)
    raise ValueError(f"no bubble formula for schedule {name!r}")


class _Rank:
    """One rank's progress through its steps during a simulation."""

    def __init__(self, rank: int, actions: list[Action]):
        self.rank = rank
        self.steps = list(batches(actions))
        self.position = 0
        self.clock = 0.0
        self.posted = False  # the current batch's operations are posted
        self.slot: dict[Action, int] = {}  # each posted send/recv: its place in its (sender, receiver) queue
        self.done: set[Action] = set()  # compute actions finished and receives completed
        self.spans: list[tuple[Action, float, float]] = []
        self.in_flight = 0
        self.peak_in_flight = 0


def _fail(rank: int, action: Action, why: str) -> None:
    raise ScheduleError(f"rank {rank}: {action} {why}")


def _run_compute(state: _Rank, action: Action, pp: int, num_stages: int, costs: dict) -> None:
    r, s, k = state.rank, action.stage, action.microbatch
    if s % pp != r:
        _fail(r, action, f"belongs on rank {s % pp}")
    if action in state.done:
        _fail(r, action, "runs twice")
    if action.kind == FORWARD:
        if s > 0 and Action(RECV_ACTIVATION, s, k) not in state.done:
            _fail(r, action, "runs before its input was received")
    elif action.kind in (BACKWARD, BACKWARD_INPUT):
        if Action(FORWARD, s, k) not in state.done:
            _fail(r, action, "runs before its forward")
        if s < num_stages - 1 and Action(RECV_GRAD, s, k) not in state.done:
            _fail(r, action, "runs before its output gradient was received")
        other = BACKWARD_INPUT if action.kind == BACKWARD else BACKWARD
        if Action(other, s, k) in state.done:
            _fail(r, action, "repeats a backward already done")
    elif Action(BACKWARD_INPUT, s, k) not in state.done:
        _fail(r, action, "runs before its input-gradient pass")
    state.done.add(action)
    # A microbatch's activations live from its forward until the pass that last reads them.
    if action.kind == FORWARD:
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    elif action.kind in (BACKWARD, BACKWARD_WEIGHT):
        state.in_flight -= 1
    end = state.clock + costs[action.kind]
    state.spans.append((action, state.clock, end))
    state.clock = end


def _post(state: _Rank, batch: list[Action], pp: int, queues: dict) -> None:
    for action in batch:
        if action.stage % pp != state.rank:
            _fail(state.rank, action, f"belongs on rank {action.stage % pp}")
        if action.kind in SENDS:
            producers = (FORWARD,) if action.kind == SEND_ACTIVATION else (BACKWARD, BACKWARD_INPUT)
            if not any(Action(kind, action.stage, action.microbatch) in state.done for kind in producers):
                _fail(state.rank, action, "sends a tensor not computed yet")
            queue = queues.setdefault((state.rank, peer_of(action, pp)), ([], []))[0]
        else:
            queue = queues.setdefault((peer_of(action, pp), state.rank), ([], []))[1]
        state.slot[action] = len(queue)
        queue.append((action, state.clock))
    state.posted = True


def _completion(state: _Rank, batch: list[Action], pp: int, queues: dict, strict: bool):
    """When the posted batch completes, or None while a peer has not posted its side yet.

    The n-th send from one rank to another meets the n-th receive posted for it there.
    """
    finish = state.clock
    for action in batch:
        is_send = action.kind in SENDS
        if is_send and not strict:
            continue
        peer = peer_of(action, pp)
        sends, recvs = queues[(state.rank, peer) if is_send else (peer, state.rank)]
        theirs = recvs if is_send else sends
        n = state.slot[action]
        if len(theirs) <= n:
            return None
        send, recv = (action, theirs[n][0]) if is_send else (theirs[n][0], action)
        if matching_recv(send) != recv:
            _fail(state.rank, action, f"is matched with {theirs[n][0]} on rank {peer}")
        finish = max(finish, theirs[n][1])
    return finish


def simulate(schedule: Schedule, costs: dict | None = None, strict: bool = False) -> Timeline:
    """Execute `schedule` on paper; raise ScheduleError if it could not run as written."""
    costs = costs or UNIT_COSTS
    pp = len(schedule)
    num_stages = 1 + max(a.stage for actions in schedule for a in actions)
    ranks = [_Rank(r, actions) for r, actions in enumerate(schedule)]
    queues: dict = {}  # (sender, receiver) -> (posted sends, posted receives), each (action, time)
    while any(st.position < len(st.steps) for st in ranks):
        moved = False
        for st in ranks:
            while st.position < len(st.steps):
                step = st.steps[st.position]
                if isinstance(step, Action):
                    _run_compute(st, step, pp, num_stages, costs)
                else:
                    if not st.posted:
                        _post(st, step, pp, queues)
                    finish = _completion(st, step, pp, queues, strict)
                    if finish is None:
                        break
                    st.done.update(a for a in step if a.kind in (RECV_ACTIVATION, RECV_GRAD))
                    st.clock, st.posted = finish, False
                st.position += 1
                moved = True
        if not moved:
            stuck = "; ".join(f"rank {st.rank} waits in [{', '.join(map(str, st.steps[st.position]))}]"
                              for st in ranks if st.position < len(st.steps))
            raise ScheduleError(f"deadlock: {stuck}")
    for (src, dst), (sends, recvs) in queues.items():
        if len(sends) != len(recvs):
            raise ScheduleError(f"rank {src} sends {len(sends)} tensors to rank {dst}, which receives {len(recvs)}")
    _check_complete(ranks, pp, num_stages)
    return Timeline(
        spans=[st.spans for st in ranks],
        makespan=max(st.clock for st in ranks),
        peak_in_flight=[st.peak_in_flight for st in ranks],
        virtual_stages=num_stages // pp,
    )


def _check_complete(ranks: list[_Rank], pp: int, num_stages: int) -> None:
    """Every stage runs the forward and the full backward of every microbatch."""
    microbatches = {a.microbatch for a, _, _ in ranks[0].spans if a.kind == FORWARD and a.stage == 0}
    for s in range(num_stages):
        done = ranks[s % pp].done
        for k in range(len(microbatches)):
            whole = Action(BACKWARD, s, k) in done
            split = Action(BACKWARD_INPUT, s, k) in done and Action(BACKWARD_WEIGHT, s, k) in done
            if Action(FORWARD, s, k) not in done or not (whole or split):
                raise ScheduleError(f"stage {s} never completes microbatch {k}")


def _label(action: Action, pp: int, virtual_stages: int) -> str:
    chunk = f".{action.stage // pp}" if virtual_stages > 1 else ""
    return f"{action.kind}{action.microbatch}{chunk}"


def format_timeline(schedule: Schedule, costs: dict | None = None) -> str:
    """The schedule as a table: one row per rank, one column per time unit, '.' where it idles.

    Labels read kind + microbatch (+ '.chunk' with virtual stages): F forward, B backward,
    I input-gradient pass, W weight-gradient pass. Costs (whole units) default to UNIT_COSTS.
    """
    timeline = simulate(schedule, costs)
    pp, v = len(schedule), timeline.virtual_stages
    columns = int(round(timeline.makespan))
    cells = [["."] * columns for _ in range(pp)]
    for r, spans in enumerate(timeline.spans):
        for action, start, end in spans:
            for t in range(int(round(start)), int(round(end))):
                cells[r][t] = _label(action, pp, v)
    width = max(len(c) for row in cells for c in row)
    lines = []
    for r, row in enumerate(cells):
        body = " ".join(c.rjust(width) for c in row)
        lines.append(f"rank {r} | {body} | idle {timeline.idle_fraction(r):.3f}")
    return "\n".join(lines)
