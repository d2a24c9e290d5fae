"""Pipeline parallelism: stage splitting, schedules as explicit action lists, and the runtime that executes them.

    schedule = build_schedule("1f1b", pp, microbatches, virtual_stages)  # every rank's actions
    stages = split_model(meta_model, pp_rank, pp, virtual_stages)      # this rank's stages
    # ... parallelize and materialize each stage as a whole model ...
    model = merge_stages(stages)                 # its parameters, full names: optimizer, checkpoints
    runner = PipelineRunner(stages, schedule[pp_rank], pp_group, loss_fn, activation_shape)
    loss = runner.step(input_microbatches, target_microbatches)         # on every pp rank

`format_timeline(schedule)` prints any schedule as a table; `simulate(schedule)` checks that it
can run and times it with unit costs.
"""

from angelptm.distributed.pipeline.runtime import PipelineRunner
from angelptm.distributed.pipeline.schedules import (
    SCHEDULES, Action, build_schedule, gpipe, interleaved_one_f_one_b, one_f_one_b, zero_bubble_h1,
)
from angelptm.distributed.pipeline.split import merge_stages, split_model, stage_layer_ranges
from angelptm.distributed.pipeline.timeline import (
    ScheduleError, format_timeline, simulate, theoretical_idle_fraction,
)

__all__ = [
    "SCHEDULES", "Action", "PipelineRunner", "ScheduleError", "build_schedule", "format_timeline", "gpipe",
    "interleaved_one_f_one_b", "merge_stages", "one_f_one_b", "simulate", "split_model", "stage_layer_ranges",
    "theoretical_idle_fraction", "zero_bubble_h1",
]
