"""The 4D-parallel engine: process-group mesh, collectives, TP/SP, CP, pipeline, parallelize."""

from angelptm.distributed.mesh import ParallelDims, init
from angelptm.distributed.parallelize import materialize, parallelize

__all__ = ["ParallelDims", "init", "materialize", "parallelize"]
