"""ZeROCache: the data-parallel engine. Sharded optimizer state, gradients and parameters (ZeRO
stages 0-3) in fixed-size pages that live on the device, in pinned host memory or on NVMe.

`ZeROCacheOptimizer` is the entry point; `dcp_safe` reads checkpoints without running pickled code.
"""

from angelptm.zerocache.dcp_safe import SafeFileSystemReader
from angelptm.zerocache.optimizer import ZeROCacheOptimizer

__all__ = ["SafeFileSystemReader", "ZeROCacheOptimizer"]
