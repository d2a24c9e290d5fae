"""ZeROCache: the data-parallel engine. Sharded optimizer state, gradients and parameters (ZeRO
stages 0-3) in fixed-size pages that live on the device, in pinned host memory or on NVMe.

`ZeROCacheOptimizer` is the entry point; its state dict saves with DCP and loads back through
`angelptm.dcp_safe.load`, which runs no pickled code.
"""

from angelptm.zerocache.optimizer import ZeROCacheOptimizer

__all__ = ["ZeROCacheOptimizer"]
