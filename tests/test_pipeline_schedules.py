"""Schedules as data: the action lists themselves, their simulation, the timeline table, bad input."""

from __future__ import annotations

import itertools

import pytest

from angelptm.distributed.pipeline import (
    Action, ScheduleError, build_schedule, format_timeline, simulate, theoretical_idle_fraction,
)
from angelptm.distributed.pipeline.schedules import (
    BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, COMMUNICATION, FORWARD, RECV_ACTIVATION, SEND_ACTIVATION,
    SENDS, _interleaved_ticks, _with_communication, matching_recv, peer_of,
)
from angelptm.errors import ConfigError


def _cases():
    for pp, m in itertools.product(range(1, 7), range(1, 13)):
        for name in ("gpipe", "1f1b", "zero_bubble"):
            yield name, pp, m, 1
        if pp > 1 and m % pp == 0:
            for v in (1, 2, 3):
                yield "interleaved", pp, m, v


CASES = list(_cases())


def test_every_schedule_runs_without_deadlock_under_both_send_models():
    for name, pp, m, v in CASES:
        schedule = build_schedule(name, pp, m, v)
        simulate(schedule)  # gloo: sends complete in the background
        simulate(schedule, strict=True)  # NCCL's in-order batches: a send waits for its receive


def test_each_forward_precedes_its_backward_on_its_own_rank():
    for name, pp, m, v in CASES:
        for rank, actions in enumerate(build_schedule(name, pp, m, v)):
            at = {a: i for i, a in enumerate(actions) if a.kind not in COMMUNICATION}
            assert len(at) == len([a for a in actions if a.kind not in COMMUNICATION]), "an action repeats"
            for s in range(rank, pp * v, pp):
                for k in range(m):
                    f = at[Action(FORWARD, s, k)]
                    if name == "zero_bubble":
                        assert f < at[Action(BACKWARD_INPUT, s, k)] < at[Action(BACKWARD_WEIGHT, s, k)]
                    else:
                        assert f < at[Action(BACKWARD, s, k)]


def test_sends_and_receives_pair_up_in_order_between_each_two_ranks():
    for name, pp, m, v in CASES:
        schedule = build_schedule(name, pp, m, v)
        for src, dst in itertools.product(range(pp), repeat=2):
            sent = [matching_recv(a) for a in schedule[src] if a.kind in SENDS and peer_of(a, pp) == dst]
            received = [a for a in schedule[dst]
                        if a.kind in COMMUNICATION and a.kind not in SENDS and peer_of(a, pp) == src]
            assert sent == received, (name, pp, m, v, src, dst)


def test_simulated_bubble_matches_theory():
    for name, pp, m, v in CASES:
        if m < pp:
            continue
        timeline = simulate(build_schedule(name, pp, m, v))
        for rank in range(pp):
            assert timeline.idle_fraction(rank) == pytest.approx(theoretical_idle_fraction(name, pp, m, v))


def test_zero_bubble_cuts_the_bubble_to_a_third_without_more_activation_memory():
    for pp, m in [(4, 8), (4, 16), (8, 16), (2, 4)]:
        one_f_one_b = simulate(build_schedule("1f1b", pp, m))
        zero_bubble = simulate(build_schedule("zero_bubble", pp, m))
        assert zero_bubble.idle_fraction(0) <= 0.45 * one_f_one_b.idle_fraction(0)
        assert max(zero_bubble.peak_in_flight) <= max(one_f_one_b.peak_in_flight) == min(pp, m)


def test_in_flight_microbatches_per_rank():
    pp, m = 4, 8
    assert simulate(build_schedule("gpipe", pp, m)).peak_in_flight == [m] * pp
    assert simulate(build_schedule("1f1b", pp, m)).peak_in_flight == [pp - r for r in range(pp)]


def test_timeline_table():
    # Rank 0 warms up with one forward, then alternates; rank 1 (the last stage) alternates from
    # the start. Zero-bubble's weight passes (W) fill the slots where 1F1B idles.
    assert format_timeline(build_schedule("1f1b", 2, 3)) == "\n".join([
        "rank 0 | F0 F1  .  . B0 B0 F2 B1 B1  . B2 B2 | idle 0.250",
        "rank 1 |  . F0 B0 B0 F1 B1 B1 F2 B2 B2  .  . | idle 0.250",
    ])
    assert format_timeline(build_schedule("zero_bubble", 2, 3)) == "\n".join([
        "rank 0 | F0 F1  . I0 W0 F2 I1 W1 I2 W2 | idle 0.100",
        "rank 1 |  . F0 I0 F1 I1 W0 F2 I2 W1 W2 | idle 0.100",
    ])


# ---------------------------------------------------------------------------------------------
# The simulator rejects schedules that could not run


def _swap(actions: list[Action], a: Action, b: Action) -> list[Action]:
    i, j = actions.index(a), actions.index(b)
    out = list(actions)
    out[i], out[j] = out[j], out[i]
    return out


def test_simulator_catches_receives_out_of_order():
    schedule = build_schedule("1f1b", 2, 4)
    schedule[1] = _swap(schedule[1], Action(RECV_ACTIVATION, 1, 1), Action(RECV_ACTIVATION, 1, 2))
    with pytest.raises(ScheduleError, match="matched with"):
        simulate(schedule)


def test_simulator_catches_a_missing_send_as_deadlock():
    schedule = build_schedule("1f1b", 2, 4)
    schedule[0] = [a for a in schedule[0] if a != Action(SEND_ACTIVATION, 0, 3)]
    with pytest.raises(ScheduleError, match=r"deadlock: .*rank 1 waits in \[.*recv_act\(stage 1, mb 3\)\]"):
        simulate(schedule)


def test_simulator_catches_backward_before_forward_and_missing_work():
    schedule = build_schedule("gpipe", 2, 2)
    schedule[1] = _swap(schedule[1], Action(FORWARD, 1, 1), Action(BACKWARD, 1, 1))
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate(schedule)
    schedule = build_schedule("zero_bubble", 2, 2)
    schedule[0] = [a for a in schedule[0] if a != Action(BACKWARD_WEIGHT, 0, 1)]
    with pytest.raises(ScheduleError, match="never completes microbatch 1"):
        simulate(schedule)


def test_strict_model_catches_sends_that_wait_on_each_other():
    # Interleaved 1F1B with every action in a tick of its own: fine while sends complete in the
    # background, but under NCCL's in-order batches the wrap-around from the last rank to the
    # first closes a cycle of sends each waiting for the next. Shared F+B ticks avoid it.
    pp, m, v = 4, 8, 2
    one_per_tick = [[[a] for tick in _interleaved_ticks(r, pp, m, v) for a in tick] for r in range(pp)]
    schedule = _with_communication(one_per_tick, pp)
    simulate(schedule)
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(schedule, strict=True)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before any work


@pytest.mark.parametrize("args,message", [
    (("pipedream", 2, 4, 1), "parallel.pp_schedule='pipedream' is not one of"),
    (("interleaved", 4, 6, 2), "multiple of parallel.pp=4"),
    (("1f1b", 2, 4, 2), "needs parallel.pp_schedule=interleaved"),
    (("interleaved", 1, 4, 2), "needs parallel.pp >= 2"),
    (("gpipe", 2, 0, 1), "all >= 1"),
])
def test_bad_schedule_requests_raise_one_line(args, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_schedule(*args)
    assert "\n" not in str(err.value)
