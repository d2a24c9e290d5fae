"""FP8 scaling recipes: how each tensor's scale is chosen, and the torch reference of every quantization.

A recipe fixes the format of each operand (input, weight, gradient of the output) and the
granularity of its scales:

- `tensorwise`: current scaling, one scale per tensor, computed from this tensor's amax;
- `delayed`: one scale per tensor taken from a history of past amaxes (see `delayed.py`), so
  the cast needs a single read and the new amax is recorded on the way;
- `rowwise`: one scale per row of the GEMM operand along the contracted dimension
  (per token for activations and gradients, per output channel for weights);
- `blockwise`: DeepSeek-V3's scheme, 1x128 tiles for activations and gradients, 128x128 blocks
  for weights; the GEMM applies the scales of each 128-long slice of K to that slice's partial
  sum in FP32.

Conventions: `fp8 = round(x * scale)` and `x ~= fp8 * scale_inv`. `torch._scaled_mm` takes the
`scale_inv` of both operands. A quantized GEMM operand is always stored row-major with the
contracted dimension last, so `a @ b.T` of two `Quantized` is the whole GEMM vocabulary.

The functions here are the references the Triton kernels in `kernels.py` match bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch
import torch.distributed as dist

from angelptm.errors import UserError
from angelptm.fp8.formats import E4M3, E5M2, Fp8Format, cast_to_fp8

BLOCK = 128  # tile and block edge of the blockwise recipe, and its K-slice for FP32 promotion


# ----------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class Float8Recipe:
    """Shared knobs. `power_of_two_scales` rounds each scale down to a power of two, so scaling and
    unscaling are exact; `amax_floor` keeps an all-zero tensor from producing an infinite scale."""

    power_of_two_scales: bool = False
    amax_floor: float = 1e-12

    name: ClassVar[str] = ""
    input_format: ClassVar[Fp8Format] = E4M3
    weight_format: ClassVar[Fp8Format] = E4M3
    grad_format: ClassVar[Fp8Format] = E4M3


@dataclass(frozen=True)
class TensorwiseRecipe(Float8Recipe):
    name: ClassVar[str] = "tensorwise"
    grad_format: ClassVar[Fp8Format] = E5M2


@dataclass(frozen=True)
class DelayedRecipe(Float8Recipe):
    """`amax_history_len` steps of amax (this step's included); the scale leaves `margin` powers
    of two of headroom below the format's maximum, as Transformer Engine's `margin`."""

    amax_history_len: int = 16
    margin: int = 0

    name: ClassVar[str] = "delayed"
    grad_format: ClassVar[Fp8Format] = E5M2

    def __post_init__(self):
        if self.amax_history_len < 1:
            raise UserError(f"precision.fp8.amax_history must be >= 1, got {self.amax_history_len}")
        if self.margin < 0:
            raise UserError(f"delayed-scaling margin must be >= 0, got {self.margin}")


@dataclass(frozen=True)
class RowwiseRecipe(Float8Recipe):
    name: ClassVar[str] = "rowwise"


@dataclass(frozen=True)
class BlockwiseRecipe(Float8Recipe):
    name: ClassVar[str] = "blockwise"


RECIPES = {cls.name: cls for cls in (TensorwiseRecipe, DelayedRecipe, RowwiseRecipe, BlockwiseRecipe)}


def recipe_from_name(name: str | Float8Recipe, **options) -> Float8Recipe:
    """`"delayed"` (plus recipe options such as `amax_history_len=16`) -> DelayedRecipe(...)."""
    if isinstance(name, Float8Recipe):
        return name
    if name not in RECIPES:
        raise UserError(f"precision.fp8.recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    cls = RECIPES[name]
    known = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"fp8 recipe {name!r} has no option {unknown[0]!r}; options: {', '.join(sorted(known))}")
    return cls(**options)


@dataclass(frozen=True)
class AmaxGroups:
    """Process groups whose ranks hold pieces of one logical tensor, per operand role.

    Their amaxes are all-reduced (MAX) so every rank scales its piece like the whole tensor:
    tp for sharded weights; dp and cp for activations and gradients under delayed scaling
    (Transformer Engine's rule, which keeps replicas' scales identical).
    """

    input: tuple = field(default_factory=tuple)
    weight: tuple = field(default_factory=tuple)
    grad_output: tuple = field(default_factory=tuple)


def all_reduce_max(t: torch.Tensor, groups: Sequence) -> torch.Tensor:
    for group in groups:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


# ----------------------------------------------------------------------------------------------
# Scales


def power_of_two_floor(scale: torch.Tensor) -> torch.Tensor:
    """Largest power of two <= scale, by clearing the mantissa bits (exact, unlike log2/exp2)."""
    return (scale.view(torch.int32) & 0x7F800000).view(torch.float32)


def scale_from_amax(amax: torch.Tensor, fmt: Fp8Format, power_of_two: bool = False,
                    amax_floor: float = 1e-12, margin: int = 0) -> torch.Tensor:
    """FP32 scale mapping `amax` onto the format's largest value, less `margin` powers of two."""
    amax = amax.float().clamp_min(amax_floor)
    # A true division: `python_float / tensor` would compute reciprocal() * float, rounding twice.
    scale = torch.full_like(amax, fmt.max).div_(amax)
    if margin:
        scale = scale * 2.0 ** -margin
    return power_of_two_floor(scale) if power_of_two else scale


@dataclass
class Quantized:
    """An FP8 GEMM operand: `data` (rows, cols) row-major, quantized along cols (the contracted
    dimension), and the FP32 `scale_inv` that maps it back. `kind` names the scale granularity:

        "tensor"  one scale, scale_inv shape ()
        "row"     one per row, (rows, 1)
        "tile"    one per 1x128 tile, (rows, ceil(cols / 128)), stored column-major (stride
                  (1, rows)): the layout cuBLASLt's blockwise GEMM reads, with no copy
        "block"   one per 128x128 block, (ceil(rows / 128), ceil(cols / 128))
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    kind: str

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def block(self) -> tuple[int, int]:
        """Rows and columns that share one scale."""
        rows, cols = self.data.shape
        return {"tensor": (rows, cols), "row": (1, cols), "tile": (1, BLOCK), "block": (BLOCK, BLOCK)}[self.kind]

    def dequantize(self) -> torch.Tensor:
        """The FP32 values this operand stands for."""
        return self.data.float() * self.expanded_scale_inv()

    def expanded_scale_inv(self) -> torch.Tensor:
        """scale_inv broadcast to one value per element (a scalar for per-tensor scales)."""
        if self.kind == "tensor":
            return self.scale_inv
        rows, cols = self.data.shape
        block_r, block_c = self.block
        s = self.scale_inv.repeat_interleave(block_r, dim=0)[:rows]
        return s.repeat_interleave(block_c, dim=1)[:, :cols]

    def t(self) -> "Quantized":
        """The transposed operand with the same scales (per-tensor and square-block scales only);
        `data` is copied to stay row-major."""
        if self.kind not in ("tensor", "block"):
            raise ValueError(f"a {self.kind}-scaled operand is quantized along one dimension; quantize the transpose")
        scale_inv = self.scale_inv if self.kind == "tensor" else self.scale_inv.t().contiguous()
        return Quantized(self.data.t().contiguous(), scale_inv, self.kind)


# ----------------------------------------------------------------------------------------------
# Torch references of the quantizations (kernels.py dispatches here off the GPU)


def quantize_tensorwise(x: torch.Tensor, fmt: Fp8Format, *, scale: Optional[torch.Tensor] = None,
                        power_of_two: bool = False, amax_floor: float = 1e-12, transpose: bool = False,
                        record_amax: Optional[torch.Tensor] = None, amax_groups: Sequence = ()
                        ) -> tuple[Quantized, Optional[Quantized]]:
    """One scale for the 2-D tensor `x`. Without `scale` it is computed from x's amax (all-reduced
    over `amax_groups`): current scaling. `record_amax` (a 1-element FP32 tensor) is raised in place
    to x's amax, as delayed scaling records it. With `transpose` the (cols, rows) copy comes too."""
    amax = None
    if scale is None or record_amax is not None:
        amax = x.abs().amax().float()
    if record_amax is not None:
        torch.maximum(record_amax, amax.reshape(record_amax.shape), out=record_amax)
    if scale is None:
        scale = scale_from_amax(all_reduce_max(amax, amax_groups), fmt, power_of_two, amax_floor)
    scale = scale.reshape(())
    data = cast_to_fp8(x.float() * scale, fmt)
    rows = Quantized(data, scale.reciprocal(), "tensor")
    return rows, (rows.t() if transpose else None)


def quantize_groups(x: torch.Tensor, fmt: Fp8Format, *, group: Optional[int], dim: int,
                    power_of_two: bool = False, amax_floor: float = 1e-12) -> Quantized:
    """One scale per `group` consecutive elements along `dim` of the 2-D tensor `x` (the whole
    length when `group` is None: rowwise). `dim=0` quantizes down the columns and returns the
    transposed operand (cols, rows), which is what a GEMM contracting over x's rows needs."""
    src = x.t() if dim == 0 else x
    rows, cols = src.shape
    size = cols if group is None else group
    n_groups = math.ceil(cols / size)
    padded = torch.nn.functional.pad(src.float(), (0, n_groups * size - cols))
    tiles = padded.view(rows, n_groups, size)
    amax = tiles.abs().amax(dim=-1)
    scale = scale_from_amax(amax, fmt, power_of_two, amax_floor)
    data = cast_to_fp8(tiles * scale[:, :, None], fmt).view(rows, n_groups * size)[:, :cols].contiguous()
    if group is None:
        return Quantized(data, scale.reciprocal(), "row")
    return Quantized(data, scale.reciprocal().t().contiguous().t(), "tile")


def quantize_blocks(x: torch.Tensor, fmt: Fp8Format, *, block: int = BLOCK, transpose: bool = False,
                    power_of_two: bool = False, amax_floor: float = 1e-12
                    ) -> tuple[Quantized, Optional[Quantized]]:
    """One scale per `block` x `block` square of the 2-D tensor `x` (weights in the blockwise recipe)."""
    rows, cols = x.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.nn.functional.pad(x.float(), (0, nc * block - cols, 0, nr * block - rows))
    blocks = padded.view(nr, block, nc, block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = scale_from_amax(amax, fmt, power_of_two, amax_floor)
    data = cast_to_fp8(blocks * scale[:, None, :, None], fmt).view(nr * block, nc * block)
    q = Quantized(data[:rows, :cols].contiguous(), scale.reciprocal(), "block")
    return q, (q.t() if transpose else None)
