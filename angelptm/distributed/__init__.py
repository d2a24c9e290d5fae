"""The 4D-parallel engine: process-group mesh, collectives, TP/SP, CP, pipeline, parallelize."""

from angelptm.distributed.collectives import (
    Group,
    comm_bytes,
    group_of,
    reset_comm_bytes,
)
from angelptm.distributed.mesh import ParallelDims, init, validate_layout
from angelptm.distributed.parallelize import clip_grad_norm_, materialize, parallelize
from angelptm.distributed.tensor_parallel import RNGTracker, full_parameters

__all__ = [
    "Group", "ParallelDims", "RNGTracker", "clip_grad_norm_", "comm_bytes", "full_parameters", "group_of",
    "init", "materialize", "parallelize", "reset_comm_bytes", "validate_layout",
]
