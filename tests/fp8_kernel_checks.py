"""Hold every FP8 Triton kernel to its torch reference, bit for bit, under the Triton CPU interpreter.

Run as a script (test_fp8_kernels.py does, in a fresh process) because TRITON_INTERPRET must be
set before triton is first imported. Prints one JSON object: check name -> "ok" or what differed.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from angelptm.fp8 import E4M3, E5M2, Float8Linear, kernels, update_float8_scales  # noqa: E402
from angelptm.fp8.scaling import Quantized  # noqa: E402

# Awkward shapes: not multiples of any tile, a single row, taller than wide and the reverse.
SHAPES = [(37, 250), (1, 17), (130, 96)]


def awkward_input(shape, dtype, seed):
    """Magnitudes over 16 binades (subnormals after scaling), exact zeros, negative zeros, ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-12, 4, shape, generator=gen).float())
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[3::11] = -0.0
    return x.to(dtype)


def same(a, b) -> str:
    if a is None or b is None:
        return "ok" if a is b else "one side missing"
    if a.kind != b.kind or a.data.shape != b.data.shape:
        return f"layout {a.kind}{tuple(a.data.shape)} vs {b.kind}{tuple(b.data.shape)}"
    bits = a.data.view(torch.uint8) != b.data.view(torch.uint8)
    if bits.any():
        return f"{int(bits.sum())} FP8 values differ"
    if not torch.equal(a.scale_inv, b.scale_inv):
        return "scale_inv differs"
    if layout(a.scale_inv) != layout(b.scale_inv):  # cuBLASLt reads tile scales column-major
        return f"scale_inv strides {a.scale_inv.stride()} vs {b.scale_inv.stride()}"
    return "ok"


def layout(t: torch.Tensor) -> list:
    """The strides that matter: those of dimensions longer than one."""
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


def first_failure(*results: str) -> str:
    return next((r for r in results if r != "ok"), "ok")


def run() -> dict:
    out = {}
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = awkward_input(shape, dtype, seed=shape[0])
            for fmt in (E4M3, E5M2):
                for pow2 in (False, True):
                    tag = f"{shape} {str(dtype)[6:]} {fmt.name} pow2={pow2}"
                    both = dict(power_of_two=pow2)
                    for rows, t in ((True, True), (True, False), (False, True)):
                        ours, ref = (kernels.cast_tensorwise(x, fmt, rows=rows, transpose=t, backend=b, **both)
                                     for b in ("triton", "torch"))
                        out[f"tensorwise current rows={rows} t={t} {tag}"] = first_failure(*map(same, ours, ref))
                        ours, ref = (kernels.cast_rowwise(x, fmt, rows=rows, transpose=t, backend=b, **both)
                                     for b in ("triton", "torch"))
                        out[f"rowwise rows={rows} t={t} {tag}"] = first_failure(*map(same, ours, ref))

                    # Delayed: a given scale large enough to saturate the biggest values.
                    scale = torch.tensor(fmt.max / float(x.float().abs().max()) * 4)
                    rec_ours, rec_ref = torch.full((1,), 1e-3), torch.full((1,), 1e-3)
                    ours = kernels.cast_tensorwise(x, fmt, scale=scale, transpose=True, record_amax=rec_ours,
                                                   backend="triton")
                    ref = kernels.cast_tensorwise(x, fmt, scale=scale, transpose=True, record_amax=rec_ref,
                                                  backend="torch")
                    amax_ok = "ok" if torch.equal(rec_ours, rec_ref) else "recorded amax differs"
                    out[f"tensorwise delayed {tag}"] = first_failure(*map(same, ours, ref), amax_ok)

                    for rows, t in ((True, True), (True, False), (False, True)):
                        ours, ref = (kernels.cast_tiles(x, fmt, rows=rows, transpose=t, backend=b, **both)
                                     for b in ("triton", "torch"))
                        out[f"tiles 1x128 rows={rows} t={t} {tag}"] = first_failure(*map(same, ours, ref))

                    for t in (True, False):
                        ours, ref = (kernels.cast_blocks(x, fmt, transpose=t, backend=b, **both)
                                     for b in ("triton", "torch"))
                        out[f"blocks t={t} {tag}"] = first_failure(*map(same, ours, ref))
            for dim in (None, 0, 1):
                amax_ok = torch.equal(kernels.amax(x, dim, backend="triton"), kernels.amax(x, dim, backend="torch"))
                out[f"amax dim={dim} {shape} {dtype}"] = "ok" if amax_ok else "amax differs"

    # Values that round to zero keep their sign, as torch's cast gives: FP8 -0.0 is 0x80.
    tiny = torch.tensor([[-1e-10, 1e-10, -0.0, 0.0] * 4, [-3.0, 3.0, -1e-5, 2.0] * 4])
    for fmt in (E4M3, E5M2):
        ours = kernels.cast_tensorwise(tiny, fmt, backend="triton")[0].data.view(torch.uint8)
        out[f"negative underflow keeps its sign {fmt.name}"] = "ok" if ours[0, 0] == 0x80 == ours[0, 2] else \
            f"codes {ours[0, :4].tolist()}"

    zeros = torch.zeros(20, 40)
    ours = kernels.cast_tensorwise(zeros, E4M3, transpose=True, backend="triton")
    ref = kernels.cast_tensorwise(zeros, E4M3, transpose=True, backend="torch")
    out["all-zero tensor"] = first_failure(same(ours[0], ref[0]), "ok" if torch.isfinite(ours[0].scale_inv) else "inf")

    # The blockwise GEMM sums each K-slice in FP32 in its own order: equal up to FP32 rounding.
    for m, n, k in ((48, 80, 300), (17, 144, 96), (32, 256, 256)):
        a = kernels.cast_tiles(awkward_input((m, k), torch.float32, 1), E4M3, backend="torch")[0]
        w = awkward_input((n, k), torch.float32, 2)
        tiles = kernels.cast_tiles(w, E4M3, backend="torch")[0]
        # The kernel reads scales through their strides: row-major tile scales too.
        for name, b in (("blocks", kernels.cast_blocks(w, E4M3, backend="torch")[0]), ("tiles", tiles),
                        ("row-major tiles", Quantized(tiles.data, tiles.scale_inv.contiguous(), "tile"))):
            ours = kernels.blockwise_mm(a, b, torch.float32, backend="triton")
            ref = kernels.blockwise_mm(a, b, torch.float32, backend="torch")
            err = ((ours - ref).abs().max() / ref.abs().max()).item()
            out[f"blockwise gemm {m}x{n}x{k} b={name}"] = "ok" if err < 1e-6 else f"max rel diff {err:.2e}"
    # float32 layers take the kernels' single-copy paths, bfloat16 ones their fused transposes.
    for recipe in ("tensorwise", "delayed", "rowwise", "blockwise"):
        for dtype in (torch.float32, torch.bfloat16):
            if recipe == "blockwise" and dtype == torch.float32:
                out["Float8Linear blockwise float32: kernel path within FP32 summation-order bound"] = \
                    blockwise_layer_within_bound()
                continue
            runs = [float8_linear_steps(recipe, backend, dtype) for backend in ("triton", "torch")]
            if recipe == "blockwise":
                # The blockwise GEMM kernel's bf16 output: the interpreter truncates where the GPU and
                # torch round to nearest, and the next FP8 cast can widen that one bf16 ulp to one FP8 ulp.
                worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(*runs))
                out[f"Float8Linear {recipe} {dtype}: kernel path ~ reference path"] = \
                    "ok" if worst < 0.05 else f"max rel diff {worst:.2e}"
                continue
            same_all = all(torch.equal(a, b) for a, b in zip(*runs))
            out[f"Float8Linear {recipe} {dtype}: kernel path == reference path"] = \
                "ok" if same_all else "outputs or grads differ"
    return out


def float8_linear_steps(recipe: str, backend: str, dtype: torch.dtype, upstream=None) -> list:
    """Two training steps of one layer (bias, 111 tokens) with every cast on `backend`; the loss is
    sum(y^2), or sum(y * upstream) when an upstream gradient is given."""
    os.environ["ANGELPTM_FP8_BACKEND"] = backend
    torch.manual_seed(0)
    layer = Float8Linear(IN_FEATURES, OUT_FEATURES, bias=True, recipe=recipe, dtype=dtype)
    x = torch.randn(3, 37, IN_FEATURES, dtype=dtype, requires_grad=True)
    results = []
    for _ in range(2):
        y = layer(x)
        (y.square() if upstream is None else y * upstream).sum().backward()
        update_float8_scales(layer)
        results += [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]
        x.grad = layer.weight.grad = layer.bias.grad = None
        with torch.no_grad():
            layer.weight.add_(0.01)
    os.environ.pop("ANGELPTM_FP8_BACKEND")
    return results


IN_FEATURES, OUT_FEATURES = 144, 160
FP32_UNIT_ROUNDOFF = 2.0 ** -24
E4M3_MAX_REL_ROUNDING = 2.0 ** -4  # round to nearest with 3 mantissa bits


def blockwise_layer_within_bound() -> str:
    """The blockwise layer's kernel path against its reference path, in float32.

    Both paths cast the same tensors with the same math (the casts are held bit for bit above), and
    a fixed upstream gradient keeps dy, and so its casts, the same on both. What is left to differ
    is the order in which each GEMM sums its FP32 terms: products of FP8 values are exact in FP32,
    and any order of summing n terms lies within gamma_n * sum|terms| of the exact sum (Higham,
    Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5), gamma_n = n*u / (1 - n*u),
    so two orders differ by at most 2 * gamma_n * sum|terms|. n counts the K additions plus, per
    128-long K-slice, the scaling multiply and the add into the accumulator, plus the bias add and
    the output rounding. Cauchy-Schwarz bounds sum|a_i*b_i| by |a|*|b|, and an E4M3 value is within
    2^-4 of its source (no input here is small enough to reach E4M3's subnormals after scaling),
    so sum|terms| <= (1 + 2^-4)^2 * |row of a| * |row of b| in the sources' own norms.
    """
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(3, 37, OUT_FEATURES, generator=gen)
    runs = [float8_linear_steps("blockwise", backend, torch.float32, upstream) for backend in ("triton", "torch")]
    torch.manual_seed(0)  # the layer's weights and input, as float8_linear_steps makes them
    w0 = Float8Linear(IN_FEATURES, OUT_FEATURES, bias=True, recipe="blockwise").weight.detach()
    x = torch.randn(3, 37, IN_FEATURES).reshape(-1, IN_FEATURES).double()
    dy = upstream.reshape(-1, OUT_FEATURES).double()
    for step in range(2):
        w = (w0 + 0.01 * step).double()
        y_ours, dx_ours, dw_ours, db_ours = runs[0][4 * step:4 * step + 4]
        y_ref, dx_ref, dw_ref, db_ref = runs[1][4 * step:4 * step + 4]
        checks = {  # name: (ours, reference, rows of a, rows of b, reduction length)
            "y": (y_ours.reshape(-1, OUT_FEATURES), y_ref.reshape(-1, OUT_FEATURES), x, w, IN_FEATURES),
            "x.grad": (dx_ours.reshape(-1, IN_FEATURES), dx_ref.reshape(-1, IN_FEATURES), dy, w.t(), OUT_FEATURES),
            "weight.grad": (dw_ours, dw_ref, dy.t(), x.t(), x.shape[0]),
        }
        for name, (ours, ref, a, b, k) in checks.items():
            n = k + 2 * (-(-k // 128)) + 2
            gamma = n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF)
            magnitude = (1 + E4M3_MAX_REL_ROUNDING) ** 2 * a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :]
            bound = 2 * gamma * magnitude + 2 * FP32_UNIT_ROUNDOFF * ref.double().abs()
            excess = ((ours.double() - ref.double()).abs() - bound).max().item()
            if excess > 0:
                return f"step {step + 1} {name}: exceeds the summation-order bound by {excess:.2e}"
        if not torch.equal(db_ours, db_ref):  # the bias gradient is one torch sum on both paths
            return f"step {step + 1} bias.grad differs"
    return "ok"


if __name__ == "__main__":
    json.dump(run(), sys.stdout)
