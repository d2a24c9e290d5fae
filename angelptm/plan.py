"""`angelptm plan`: memory per rank, FLOPs, communication, step time and MFU for a config on N GPUs.

`plan(cfg, world_size, hardware)` prices the layout a config asks for; `search(...)` enumerates
layouts (tp inside a node, pp, cp, dp, ep for an MoE model, ZeRO stage, microbatch size,
activation checkpointing, pipeline schedule) and ranks those that fit by estimated throughput.
Both are arithmetic on the config (`angelptm.planning`): no model is built, so a 1T-parameter
plan takes milliseconds.
An impossible layout comes back with `valid=False` and the reasons, never as an exception.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Optional, Union

from angelptm.config import Config, load_config
from angelptm.errors import UserError
from angelptm.planning.hardware import Hardware, resolve_hardware
from angelptm.planning.layer_time import all_to_all_bytes
from angelptm.planning.layout import Layout, layout_from_config, layout_problems
from angelptm.planning.memory import GIB, Memory, memory
from angelptm.planning.model import ANGELPTM, Implementation, ModelShape, model_shape
from angelptm.planning.search import candidate_layouts
from angelptm.planning.timing import MOE_OVERLAP, OVERLAP, Comm, Timing, timing


@dataclass
class Plan:
    """One layout priced: memory per rank, communication, step time, and whether it runs and fits."""

    arch: str
    params: int  # every expert of an MoE model
    active_params: int  # those one token passes through
    hardware: str
    world_size: int
    layout: Layout
    microbatches: int
    valid: bool  # the engine can run this layout
    fits: bool  # valid, and its memory fits device and host
    reasons: list[str]  # why it is invalid or does not fit
    memory: Optional[Memory]
    timing: Optional[Timing]
    comm: Optional[Comm]
    assumptions: tuple[str, ...] = OVERLAP

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(m: ModelShape, lay: Layout, cfg: Config, hw: Hardware, impl: Implementation = ANGELPTM,
             time_if_unfit: bool = True, world_problems: tuple[str, ...] = ()) -> Plan:
    """Price one layout of one model; the shared step of `plan` and `search` (which skips timing
    layouts that do not fit). `world_problems` say why the degrees do not fill the world."""
    reasons = [*world_problems, *layout_problems(m, lay, cfg, hw)]
    result = Plan(arch=m.arch, params=m.num_params, active_params=m.active_params, hardware=hw.name,
                  world_size=lay.world_size, layout=lay, microbatches=lay.microbatches(cfg.train.global_batch),
                  valid=not reasons, fits=False, reasons=reasons, memory=None, timing=None, comm=None,
                  assumptions=OVERLAP + (MOE_OVERLAP if m.n_experts else ()))
    if reasons:
        return result
    mem, zb = memory(m, lay, cfg, hw, impl)
    result.memory, result.fits = mem, mem.fits
    reasons += zb.problems
    if mem.device_total > mem.device_capacity:
        reasons.append(f"needs {mem.device_total / GIB:.1f} GiB per GPU on the {mem.stage} stage, "
                       f"{hw.name} has {mem.device_capacity / GIB:.1f} GiB")
    if mem.host_per_node > mem.host_capacity_per_node:
        reasons.append(f"needs {mem.host_per_node / GIB:.0f} GiB of host memory per node, "
                       f"{hw.name} nodes have {mem.host_capacity_per_node / GIB:.0f} GiB")
    if mem.fits or time_if_unfit:
        result.timing, result.comm = timing(m, lay, cfg, hw, impl, zb)
    return result


def _check_world(world_size: int) -> None:
    if world_size < 1:
        raise UserError(f"--world-size {world_size} must be a positive number of GPUs")


def plan(cfg: Config, world_size: int, hardware: Union[str, Hardware] = "h100",
         impl: Implementation = ANGELPTM) -> Plan:
    """The plan for the layout `cfg.parallel` / `cfg.zero` / `cfg.train` ask for on `world_size` GPUs."""
    _check_world(world_size)
    hw = resolve_hardware(hardware)
    lay, world_problems = layout_from_config(cfg, world_size)
    result = evaluate(model_shape(cfg.model), lay, cfg, hw, impl, world_problems=tuple(world_problems))
    result.world_size = world_size
    return result


def search(cfg: Config, world_size: int, hardware: Union[str, Hardware] = "h100", top: int = 5,
           impl: Implementation = ANGELPTM) -> list[Plan]:
    """The `top` layouts of `cfg`'s model on `world_size` GPUs that fit, fastest first.

    The model, precision, batch, sequence and offload settings stay as configured; the layout
    (degrees, ZeRO stage, microbatch, checkpointing, schedule) is what varies.
    """
    _check_world(world_size)
    if top < 1:
        raise UserError(f"--top {top} must be at least 1")
    hw = resolve_hardware(hardware)
    m = model_shape(cfg.model)
    fitting = []
    for group in candidate_layouts(m, cfg, hw, world_size):
        for lay in group:
            p = evaluate(m, lay, cfg, hw, impl, time_if_unfit=False)
            if p.fits:
                fitting.append(p)
                break
    # Fastest first; between equals (communication fully hidden) the simpler layout: lower ZeRO
    # stage, fewer context-parallel, pipeline, tensor- and expert-parallel ranks, then more memory free.
    fitting.sort(key=lambda p: (-p.timing.tokens_per_s, p.layout.zero_stage, p.layout.cp, p.layout.pp,
                                p.layout.tp, p.layout.ep, p.memory.device_total))
    return fitting[:top]


# ---------------------------------------------------------------------------------------------
# Text rendering


def _gib(x: float) -> str:
    return f"{x / GIB:9.2f}"


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}".rstrip()


def render(p: Plan, cfg: Config) -> str:
    md, moe = cfg.model, cfg.model.moe
    lines = [
        f"model     {p.arch} {p.params / 1e9:.2f}B parameters: dim {md.dim}, {md.n_layers} layers, "
        f"{md.n_heads} heads / {md.n_kv_heads} kv, ffn {md.ffn_dim}, vocab {md.vocab_size}",
    ]
    if moe.n_experts:
        lines.append(
            f"experts   {moe.n_experts} routed (top {moe.top_k}, ffn {moe.expert_ffn_dim}), "
            f"{moe.n_shared_experts} shared, first {moe.first_dense_layers} layers dense; "
            f"{p.active_params / 1e9:.2f}B parameters active per token")
    lines += [
        f"batch     {cfg.train.global_batch} sequences x {cfg.train.seq_len} tokens per step, "
        f"{cfg.precision.dtype}" + (f" + fp8 {cfg.precision.fp8.recipe}" if cfg.precision.fp8.enabled else ""),
        f"hardware  {p.world_size} x {p.hardware}",
        f"layout    {p.layout.describe()}, {p.microbatches} microbatches per step",
    ]
    if not p.valid:
        lines.append("verdict   INVALID: " + "; ".join(p.reasons))
        return "\n".join(lines)
    mem, t, c = p.memory, p.timing, p.comm
    lines += [
        "",
        f"memory per GPU ({mem.stage} pipeline stage)       GiB",
        f"  parameters                         {_gib(mem.params)}",
        f"  gradients                          {_gib(mem.grads)}",
        f"  optimizer state                    {_gib(mem.optimizer)}",
        f"  activations                        {_gib(mem.activations)}",
        f"  fp8 buffers                        {_gib(mem.fp8_buffers)}",
        f"  communication buffers              {_gib(mem.comm_buffers)}",
        f"  reserved (context, workspaces)     {_gib(mem.reserved)}",
        f"  device total                       {_gib(mem.device_total)}  of {mem.device_capacity / GIB:.1f}",
        f"  host (pinned) / nvme               {_gib(mem.host)}  /{_gib(mem.nvme)}",
        "",
        f"FLOPs per step  {_si(t.model_flops, 'FLOP')} model, {_si(t.hardware_flops, 'FLOP')} with recomputation",
        f"communication per GPU per step: tp {_si(c.tp, 'B')}, cp {_si(c.cp, 'B')}, "
        f"pp {_si(c.pp, 'B')}, dp {_si(c.dp, 'B')}" + (f", ep {_si(c.ep, 'B')}" if moe.n_experts else ""),
    ]
    if moe.n_experts:
        each = all_to_all_bytes(model_shape(md), p.layout, cfg)
        rerun = p.layout.checkpointing == "full"
        lines.append(f"all-to-all per GPU: {_si(each, 'B')} sent by each dispatch or combine of a microbatch, "
                     f"{6 if rerun else 4} per MoE block and microbatch (forward, backward"
                     + (", recomputed forward)" if rerun else ")"))
    lines += ["", "time per step                           s"]
    parts = ("gemm", "attention", "elementwise", "recompute", "tp_comm", "cp_comm", "ep_comm", "pp_comm",
             "bubble", "dp_exposed", "optimizer")
    for name in (n for n in parts if n != "ep_comm" or moe.n_experts):
        lines.append(f"  {name.replace('_', ' '):<32}{getattr(t, name):10.3f}")
    lines += [
        f"  step                            {t.step:10.3f}",
        "",
        f"throughput  {_si(t.tokens_per_s, 'tokens/s')}, {t.model_tflops_per_gpu:.0f} TFLOP/s per GPU "
        f"({t.hardware_tflops_per_gpu:.0f} with recomputation), MFU {100 * t.mfu:.1f}%",
        "verdict     " + ("fits" if p.fits else "DOES NOT FIT: " + "; ".join(p.reasons)),
        "",
        "assumed overlap:",
    ]
    lines += [f"  - {a}" for a in p.assumptions]
    return "\n".join(lines)


def render_search(plans: list[Plan], cfg: Config, world_size: int, hardware: str) -> str:
    head = (f"best layouts for {cfg.model.arch} {plans[0].params / 1e9:.1f}B on {world_size} x {hardware}"
            if plans else f"no layout of this model fits on {world_size} x {hardware}")
    lines = [head]
    if plans:
        lines.append(f"  {'#':>2}  {'layout':<72} {'GiB/GPU':>8} {'step s':>9} {'tokens/s':>12} {'MFU':>6}")
    for i, p in enumerate(plans, 1):
        t = p.timing
        lines.append(
            f"  {i:>2}  {p.layout.describe():<72} {p.memory.device_total / GIB:8.1f} {t.step:9.3f} "
            f"{t.tokens_per_s:12.0f} {100 * t.mfu:5.1f}%"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="angelptm plan", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="YAML config")
    ap.add_argument("--world-size", type=int, required=True, help="number of GPUs")
    ap.add_argument("--gpu", default="h100", help="a100, h100, h200 or a YAML hardware profile")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    ap.add_argument("--search", action="store_true", help="rank the layouts that fit")
    ap.add_argument("--top", type=int, default=5, help="layouts to show with --search")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    return ap


def plan_main(argv: list[str]) -> int:
    """Exit status: 0 when the planned layout (or, with --search, some layout) fits, 1 when none
    does. Bad input raises UserError, which the `angelptm` command turns into one line and exit 2."""
    args = _parser().parse_args(argv)
    cfg = load_config(args.config, args.set)
    hw = resolve_hardware(args.gpu)
    if args.search:
        plans = search(cfg, args.world_size, hw, top=args.top)
        print(json.dumps([p.to_dict() for p in plans], indent=1) if args.json
              else render_search(plans, cfg, args.world_size, hw.name))
        return 0 if plans else 1
    result = plan(cfg, args.world_size, hw)
    print(json.dumps(result.to_dict(), indent=1) if args.json else render(result, cfg))
    return 0 if result.fits else 1
