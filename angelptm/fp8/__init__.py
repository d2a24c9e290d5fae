"""FP8 mixed precision: formats, scaling recipes, Triton cast kernels, `Float8Linear`, FP8 MoE experts
(`Float8Experts`) and model conversion.

    model = convert_to_float8(model, recipe="delayed", amax_history_len=16)
    ...
    optimizer.step()
    update_float8_scales(model)   # fresh FP8 weights; delayed scaling: all-reduce amaxes, rotate histories
"""

from angelptm.fp8.convert import convert_to_float8, update_float8_scales
from angelptm.fp8.delayed import DelayedScale
from angelptm.fp8.formats import E4M3, E5M2, Fp8Format
from angelptm.fp8.grouped import Float8Experts
from angelptm.fp8.linear import Float8Linear
from angelptm.fp8.scaling import (AmaxGroups, BlockwiseRecipe, DelayedRecipe, Float8Recipe, Quantized,
                                  RowwiseRecipe, TensorwiseRecipe, recipe_from_name)

__all__ = [
    "AmaxGroups", "BlockwiseRecipe", "DelayedRecipe", "DelayedScale", "E4M3", "E5M2", "Float8Experts", "Float8Linear",
    "Float8Recipe", "Fp8Format", "Quantized", "RowwiseRecipe", "TensorwiseRecipe", "convert_to_float8",
    "recipe_from_name", "update_float8_scales",
]
