"""The two FP8 formats training uses, E4M3 and E5M2, and the saturating cast into them.

E4M3 (`torch.float8_e4m3fn`: 3 mantissa bits, largest finite 448, no infinities) carries
activations and weights; E5M2 (`torch.float8_e5m2`: 2 mantissa bits, largest finite 57344)
trades precision for range and carries gradients in the tensorwise and delayed recipes.

`cast_to_fp8` is the ground truth every kernel is held to: clamp to the largest finite value
(torch's own cast overflows E5M2 to infinity, and not every version saturates E4M3), then
torch's round-to-nearest-even cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: torch.dtype
    max: float  # largest finite value
    mantissa_bits: int
    min_normal_exp: int  # exponent of the smallest normal number; below it the grid is uniform

    @property
    def unit_roundoff(self) -> float:
        """Largest relative error of one round-to-nearest cast of a normal number in range."""
        return 2.0 ** -(self.mantissa_bits + 1)


E4M3 = Fp8Format("e4m3", torch.float8_e4m3fn, 448.0, mantissa_bits=3, min_normal_exp=-6)
E5M2 = Fp8Format("e5m2", torch.float8_e5m2, 57344.0, mantissa_bits=2, min_normal_exp=-14)


def cast_to_fp8(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of an already scaled float tensor."""
    return x.clamp(-fmt.max, fmt.max).to(fmt.dtype)
