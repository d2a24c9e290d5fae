"""angelptm: train large language models with FP8, 4D parallelism and ZeROCache on plain PyTorch.

The stable entry points are `load_config`, `Trainer`, `fp8.convert_to_float8` and
`zerocache.ZeROCacheOptimizer`. Subpackages load on first use, so `import angelptm` stays cheap.
"""

import importlib

from angelptm.config import Config, load_config
from angelptm.errors import ConfigError, UserError

__version__ = "0.1.0"

_LAZY = {
    "Trainer": ("angelptm.train.trainer", "Trainer"),
    "ParallelDims": ("angelptm.distributed.mesh", "ParallelDims"),
}
_SUBPACKAGES = {"distributed", "fp8", "zerocache", "models", "data", "train", "plan"}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"angelptm.{name}")
    raise AttributeError(f"module 'angelptm' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "UserError", "Trainer", "ParallelDims", "load_config"]
