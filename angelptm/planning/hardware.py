"""Hardware profiles: what one accelerator and its node can do, built in (a100, h100, h200) or from YAML.

Peak rates are the vendors' datasheet figures (dense, no sparsity). The `*_efficiency` fields are
the fractions of those peaks that real kernels sustain; each built-in value says where it comes
from. Bandwidths are per GPU and per direction unless the name says per node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from angelptm.config import read_yaml_file
from angelptm.errors import UserError


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float  # device memory as the driver reports it
    reserved_gib: float  # CUDA context, cuBLAS/NCCL workspaces, allocator slack
    peak_tflops: dict[str, float] = field(default_factory=dict)  # dense, per dtype; 0: not supported
    hbm_gbps: float = 0.0
    intra_node_gbps: float = 0.0  # NVLink, per GPU per direction
    inter_node_gbps: float = 0.0  # network card(s) of one GPU, per direction
    host_link_gbps: float = 0.0  # PCIe between one GPU and host memory, per direction
    intra_node_latency_us: float = 2.0  # one ring step of a collective over NVLink
    inter_node_latency_us: float = 6.0  # one ring step across the network
    gpus_per_node: int = 8
    host_memory_gib: float = 0.0  # per node
    host_memory_gbps: float = 0.0  # per node, all sockets
    nvme_gbps: float = 0.0  # per node, all drives; 0: no NVMe tier
    matmul_efficiency: float = 0.7
    attention_efficiency: float = 0.5
    grouped_gemm_efficiency: float = 0.63  # MoE routed experts' grouped GEMMs
    hbm_efficiency: float = 0.85
    link_efficiency: float = 0.8

    def peak_flops(self, dtype: str) -> float:
        return self.peak_tflops.get(dtype, 0.0) * 1e12


_DTYPES = ("float32", "bfloat16", "float8")

# Datasheets: NVIDIA A100 Tensor Core GPU (SXM4 80GB), NVIDIA H100 Tensor Core GPU (SXM5),
# NVIDIA H200 Tensor Core GPU (SXM); node figures from the DGX A100 / DGX H100 / DGX H200 user
# guides (8 GPUs, one 200 Gb/s HDR resp. 400 Gb/s NDR port per GPU, 1 TB resp. 2 TB host memory).
# Sustained fractions:
#  - hbm 0.85 and links 0.8: what a device-to-device copy and NCCL's bus bandwidth reach against
#    the line rate (nccl-tests all_reduce_perf on DGX systems); the per-step latencies (2 µs on
#    NVLink, 6 µs over InfiniBand) are the small-message times of the same tests;
#  - attention: FlashAttention-2 (Dao, 2023) reaches 50-73% of peak on A100 and ~35% on H100;
#    FlashAttention-3 (Shah et al., 2024) up to 75% on H100: 0.45 sits between the kernels SDPA picks;
#  - matmul: the fraction of peak the transformer's GEMMs sustain inside a training step, kernel
#    launch gaps and clock throttling included. For A100 it follows from Korthikanti et al. 2022,
#    Table 5: the 1T model reaches 57.0% hardware FLOPs utilization with a 12.3% pipeline bubble
#    and unoverlapped tensor-parallel collectives, i.e. ~0.7 of peak while computing. H100 and
#    H200 sustain less of a 3x higher, power-capped peak: with 0.57, GPT-3 175B at tp 4 · pp 8
#    (interleaved) on 512 H100s plans at 48% MFU, against the "up to 47%" MFU Megatron-Core
#    reports on H100 clusters (Megatron-LM README);
#  - grouped GEMM (an MoE block's routed experts, `torch._grouped_mm` over tokens sorted by
#    expert): 0.9 of the dense fraction. Megatron-Core's grouped-GEMM Mixtral 8x7B training runs at
#    468 TFLOP/s per H100 in bf16 (Megatron-Core MoE guide, MCore v0.9), 47% of peak, the MFU its
#    dense GPT runs reach, so the grouped kernels run near the dense rate at Mixtral's sizes; the
#    0.9 margin is for the smaller and uneven row groups of many fine-grained experts and of
#    unbalanced routing, which a dense GEMM does not have.
BUILTIN: dict[str, Hardware] = {
    "a100": Hardware(
        name="A100-SXM4-80GB", memory_gib=79.3, reserved_gib=4.0,
        peak_tflops={"float32": 19.5, "bfloat16": 312.0, "float8": 0.0},
        hbm_gbps=2039.0, intra_node_gbps=300.0, inter_node_gbps=25.0, host_link_gbps=32.0,
        gpus_per_node=8, host_memory_gib=1024.0, host_memory_gbps=409.6, nvme_gbps=25.0,
        matmul_efficiency=0.7, attention_efficiency=0.6, grouped_gemm_efficiency=0.63,
    ),
    "h100": Hardware(
        name="H100-SXM5-80GB", memory_gib=79.6, reserved_gib=4.0,
        peak_tflops={"float32": 66.9, "bfloat16": 989.4, "float8": 1978.9},
        hbm_gbps=3350.0, intra_node_gbps=450.0, inter_node_gbps=50.0, host_link_gbps=64.0,
        gpus_per_node=8, host_memory_gib=2048.0, host_memory_gbps=614.4, nvme_gbps=50.0,
        matmul_efficiency=0.57, attention_efficiency=0.45, grouped_gemm_efficiency=0.51,
    ),
    "h200": Hardware(
        name="H200-SXM-141GB", memory_gib=139.8, reserved_gib=4.0,
        peak_tflops={"float32": 66.9, "bfloat16": 989.4, "float8": 1978.9},
        hbm_gbps=4800.0, intra_node_gbps=450.0, inter_node_gbps=50.0, host_link_gbps=64.0,
        gpus_per_node=8, host_memory_gib=2048.0, host_memory_gbps=614.4, nvme_gbps=50.0,
        matmul_efficiency=0.57, attention_efficiency=0.45, grouped_gemm_efficiency=0.51,
    ),
}


def _check_profile(hw: Hardware, where: str) -> Hardware:
    for f in dataclasses.fields(hw):
        value = getattr(hw, f.name)
        if f.name == "peak_tflops":
            unknown = sorted(set(value) - set(_DTYPES))
            if unknown:
                raise UserError(f"{where}: peak_tflops has unknown dtype {unknown[0]}; use {', '.join(_DTYPES)}")
            if not value.get("bfloat16", 0) > 0:
                raise UserError(f"{where}: peak_tflops.bfloat16 must be a positive number of TFLOP/s")
            if any(not isinstance(v, (int, float)) or v < 0 for v in value.values()):
                raise UserError(f"{where}: peak_tflops values must be numbers >= 0")
        elif f.name != "name":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UserError(f"{where}: {f.name}={value!r} must be a number >= 0")
    for name in ("memory_gib", "hbm_gbps", "intra_node_gbps", "inter_node_gbps", "gpus_per_node",
                 "matmul_efficiency", "attention_efficiency", "grouped_gemm_efficiency", "hbm_efficiency",
                 "link_efficiency"):
        if not getattr(hw, name) > 0:
            raise UserError(f"{where}: {name} must be positive")
    for name in ("matmul_efficiency", "attention_efficiency", "grouped_gemm_efficiency", "hbm_efficiency",
                 "link_efficiency"):
        if getattr(hw, name) > 1:
            raise UserError(f"{where}: {name}={getattr(hw, name)} is a fraction of peak; use a value in (0, 1]")
    if int(hw.gpus_per_node) != hw.gpus_per_node:
        raise UserError(f"{where}: gpus_per_node={hw.gpus_per_node} must be an integer")
    return dataclasses.replace(hw, gpus_per_node=int(hw.gpus_per_node))


def load_hardware(path: Union[str, Path]) -> Hardware:
    """A profile from YAML: every field of `Hardware`, or `base: h100` plus the fields that differ."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"hardware profile {p} does not exist; pass a100, h100, h200 or a YAML file")
    raw = read_yaml_file(p, "hardware profile")
    if not isinstance(raw, dict):
        raise UserError(f"hardware profile {p} must be a mapping of fields (name:, memory_gib:, ...)")
    names = {f.name for f in dataclasses.fields(Hardware)}
    base_name: Optional[str] = raw.pop("base", None)
    if not isinstance(raw.get("peak_tflops", {}), dict):
        raise UserError(f"hardware profile {p}: peak_tflops must map dtypes to TFLOP/s, e.g. {{bfloat16: 989.4}}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"hardware profile {p}: unknown field {unknown[0]}; known: {', '.join(sorted(names))}")
    if base_name is not None:
        if str(base_name).lower() not in BUILTIN:
            raise UserError(f"hardware profile {p}: base={base_name} is not one of {', '.join(BUILTIN)}")
        base = BUILTIN[str(base_name).lower()]
        peaks = {**base.peak_tflops, **raw.pop("peak_tflops", {})}
        hw = dataclasses.replace(base, peak_tflops=peaks, **raw)
    else:
        missing = sorted(names - set(raw))
        if missing:
            raise UserError(f"hardware profile {p}: missing field {missing[0]}; give it or start from base: h100")
        hw = Hardware(**raw)
    return _check_profile(hw, f"hardware profile {p}")


def resolve_hardware(spec: Union[str, Hardware]) -> Hardware:
    """A built-in profile by name, a profile loaded from a YAML path, or `spec` itself."""
    if isinstance(spec, Hardware):
        return spec
    if spec.lower() in BUILTIN:
        return BUILTIN[spec.lower()]
    if spec.endswith((".yaml", ".yml")) or Path(spec).exists():
        return load_hardware(spec)
    raise UserError(f"--gpu {spec} is not a known profile; use {', '.join(BUILTIN)} or a path to a YAML profile")
