"""Typed run configuration: dataclasses for every key, YAML loading, `--set` overrides, validation.

The schema is DESIGN.md's. Every key has a default, and the defaults together are the embedded
demo job (`configs/demo.yaml` spells the same values out). Every check raises `ConfigError` with
one line that names the dotted key and the fix, so the CLI can print it and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from angelptm.errors import ConfigError


@dataclass
class ModelConfig:
    arch: Literal["llama", "gpt"] = "llama"
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: Optional[int] = 4  # null: as many as n_heads (plain multi-head attention)
    ffn_dim: Optional[int] = 768  # null: 8/3·dim rounded up to 64 (llama) or 4·dim (gpt)
    vocab_size: int = 259  # the byte tokenizer's 256 bytes + BOS, EOS, PAD
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False


@dataclass
class ParallelConfig:
    dp: Union[int, Literal["auto"]] = "auto"
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = True
    cp_mode: Literal["ring", "ulysses"] = "ring"
    pp_schedule: Literal["gpipe", "1f1b", "interleaved", "zero_bubble"] = "1f1b"
    pp_virtual_stages: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 600.0  # a collective that waits longer (a stalled or dead peer) ends every rank


@dataclass
class Fp8Config:
    enabled: bool = False
    recipe: Literal["tensorwise", "delayed", "rowwise", "blockwise"] = "tensorwise"
    amax_history: int = 16
    fp8_all_gather: bool = False
    power_of_two_scales: bool = False
    skip: list[str] = field(default_factory=lambda: ["output", "embedding"])


@dataclass
class PrecisionConfig:
    dtype: Literal["float32", "bfloat16"] = "float32"
    fp8: Fp8Config = field(default_factory=Fp8Config)


@dataclass
class ZeroConfig:
    stage: int = 0
    page_mb: float = 32.0
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    nvme_dir: Optional[str] = None
    device_budget_gb: Optional[float] = None
    prefetch_pages: int = 2


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: Optional[float] = 1.0  # null or 0: no clipping
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class DataConfig:
    source: Literal["stdlib", "text", "tokens", "synthetic"] = "stdlib"
    path: Optional[str] = None
    tokenizer: Literal["byte"] = "byte"
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 240
    global_batch: int = 8
    micro_batch: int = 8
    seq_len: int = 256
    seed: int = 0
    output_dir: str = "runs/demo"
    log_every: int = 10
    ckpt_every: int = 80  # 0: only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | PATH of a step_<N> folder
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    deterministic: bool = False
    compile: bool = False  # torch.compile each transformer block (fuses FP8 casts, cuts launch overhead)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sample_prompt: str = "def "
    sample_tokens: int = 160  # generated after training; 0: none
    max_skipped_steps: int = 10  # consecutive non-finite steps before the run stops (exit 3)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def grad_accum_steps(self, dp: int) -> int:
        """Microbatches per optimizer step on each rank: global_batch / (micro_batch · dp)."""
        per_step = self.train.micro_batch * dp
        if self.train.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.train.global_batch} is not a multiple of "
                f"train.micro_batch × dp = {self.train.micro_batch} × {dp}; "
                f"set train.global_batch to a multiple of {per_step}"
            )
        steps = self.train.global_batch // per_step
        if steps > MAX_MICROBATCHES:
            raise ConfigError(
                f"train.global_batch={self.train.global_batch} makes {steps} microbatches per step (global_batch /"
                f" (micro_batch × dp)), more than {MAX_MICROBATCHES}; lower it or raise train.micro_batch")
        return steps


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


@dataclass(frozen=True)
class _Override:
    """A `--set` value: its text as typed, and that text read as YAML.

    String keys take the text verbatim (so `train.output_dir=2024-01-01` stays a string);
    every other key takes the YAML reading (ints, floats, bools, lists, null).
    """

    text: str
    parsed: Any


def _takes_text(tp: Any) -> bool:
    if tp is str:
        return True
    args = get_args(tp)
    return get_origin(tp) in (Union, types.UnionType) and set(args) == {str, type(None)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    if isinstance(value, _Override):
        value = value.text if _takes_text(tp) and value.parsed is not None else value.parsed
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}={value!r} must be {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be {_type_name(tp)}, e.g. [a, b]")
        (inner,) = get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:  # "12", or "1e6" (a string to YAML 1.1), read exactly
                number = decimal.Decimal(value.strip())
                if number.is_finite() and number.adjusted() < 64 and number == number.to_integral_value():
                    return int(number)
            except decimal.InvalidOperation:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in the schema, not input


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else (
                f"known keys: {', '.join(names)}"
            )
            raise ConfigError(f"unknown config key {dotted}: {hint}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Validation: ranges and combinations


MAX_TENSOR_NUMEL = 2**63 // 4  # torch sizes a float32 tensor's bytes in an int64 ("Storage size ... overflowed")
MAX_SAMPLES = 2**63 - 1  # sample g = step · global_batch + row is an int64 index (data.sampler)
# Every microbatch of a step is an action in the pipeline schedule's lists, built before the first
# step (~30 µs each on one core): 65536 build in ~2 s. Real jobs use hundreds.
MAX_MICROBATCHES = 2**16
MIN_PAGE_MB = 1024 * 4 / 2**20  # one aligned shard: zerocache.pages.SHARD_ALIGN_NUMEL float32 elements
MAX_AMAX_HISTORY = 2**16  # each FP8 operand keeps, and rotates every step, a float32 history this long


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(value > 0, f"{section}.{name}={value} must be positive")


def _resolve_model(m: ModelConfig) -> None:
    _positive(m, "model", "dim", "n_layers", "n_heads", "vocab_size", "max_seq_len")
    if m.n_kv_heads is None:
        m.n_kv_heads = m.n_heads
    if m.ffn_dim is None:
        m.ffn_dim = 4 * m.dim if m.arch == "gpt" else 64 * math.ceil(8 * m.dim / 3 / 64)
    _positive(m, "model", "n_kv_heads", "ffn_dim", "rope_theta", "norm_eps")
    _check(
        m.dim % m.n_heads == 0,
        f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; pick n_heads dividing dim",
    )
    _check(
        (m.dim // m.n_heads) % 2 == 0,
        f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for rotary embeddings",
    )
    _check(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
        "pick n_kv_heads dividing n_heads",
    )
    # The largest weight: the embedding / output head (vocab × dim), a projection (dim × dim) or
    # an MLP matrix (ffn × dim). Memory for the whole model is the trainer's preflight's to check.
    other, name = max((m.vocab_size, "model.vocab_size"), (m.dim, "model.dim"), (m.ffn_dim, "model.ffn_dim"))
    _check(
        m.dim * other <= MAX_TENSOR_NUMEL,
        f"model.dim={m.dim} × {name}={other} = {m.dim * other:.3g} elements in one weight, more than a "
        f"tensor can hold ({MAX_TENSOR_NUMEL:.3g}); lower " + ("model.dim" if name == "model.dim" else f"{name} or model.dim"),
    )


def validate(cfg: Config) -> Config:
    """Check ranges and combinations, fill the derived defaults, and return `cfg`."""
    _resolve_model(cfg.model)
    p = cfg.parallel
    _positive(p, "parallel", "tp", "pp", "cp", "pp_virtual_stages")
    _check(p.dp == "auto" or p.dp > 0, f"parallel.dp={p.dp} must be positive or auto")
    f8 = cfg.precision.fp8
    _check(0 < f8.amax_history <= MAX_AMAX_HISTORY, f"precision.fp8.amax_history={f8.amax_history} must lie "
           f"between 1 and {MAX_AMAX_HISTORY} steps (Transformer Engine's default is 1024, ours 16)")
    z = cfg.zero
    _check(0 <= z.stage <= 3, f"zero.stage={z.stage} must be 0, 1, 2 or 3")
    _check(
        not f8.fp8_all_gather or (f8.enabled and z.stage == 3 and f8.recipe in ("tensorwise", "rowwise")),
        "precision.fp8.fp8_all_gather=true gathers stage-3 weights in FP8; it needs precision.fp8.enabled=true, "
        f"zero.stage=3 (got {z.stage}) and precision.fp8.recipe tensorwise or rowwise (got {f8.recipe})",
    )
    _check(
        z.page_mb >= MIN_PAGE_MB,
        f"zero.page_mb={z.page_mb:g} is smaller than one aligned shard (1024 float32 elements, 4 KiB); "
        f"set zero.page_mb to at least {MIN_PAGE_MB} (the default is 32)",
    )
    _check(z.prefetch_pages >= 0, f"zero.prefetch_pages={z.prefetch_pages} must be >= 0")
    _check(
        z.offload_params == "none" or z.stage == 3,
        f"zero.offload_params={z.offload_params} needs sharded parameters; set zero.stage=3",
    )
    _check(
        z.offload_params != "nvme",
        "zero.offload_params=nvme is not supported (stage-3 parameters live on device or host); "
        "use zero.offload_params=cpu",
    )
    _check(
        z.offload_optimizer != "nvme" or z.nvme_dir is not None,
        "zero.offload_optimizer=nvme needs a folder; set zero.nvme_dir=/path/on/nvme",
    )
    _check(
        z.device_budget_gb is None or z.device_budget_gb > 0,
        f"zero.device_budget_gb={z.device_budget_gb} must be positive or null",
    )
    o = cfg.optim
    _positive(o, "optim", "lr", "eps")
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must lie between 0 and optim.lr={o.lr}")
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]",
    )
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(o.grad_clip is None or o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    d = cfg.data
    _check(
        d.source not in ("text", "tokens") or d.path is not None,
        f"data.source={d.source} reads a file or folder; set data.path=/path/to/it",
    )
    _check(
        d.source in ("text", "tokens") or d.path is None,
        f"data.path={d.path} is read only by data.source text or tokens, not {d.source}; set data.source "
        "or drop data.path",
    )
    _check(d.seed >= 0, f"data.seed={d.seed} must be >= 0")
    t = cfg.train
    _positive(t, "train", "steps", "global_batch", "micro_batch", "seq_len", "log_every")
    _check(t.ckpt_every >= 0, f"train.ckpt_every={t.ckpt_every} must be >= 0 (0: only at the end)")
    _check(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    _check(cfg.parallel.timeout_s > 0, f"parallel.timeout_s={cfg.parallel.timeout_s} must be positive (seconds)")
    _check(t.max_skipped_steps >= 1, f"train.max_skipped_steps={t.max_skipped_steps} must be >= 1")
    _check(t.sample_tokens >= 0, f"train.sample_tokens={t.sample_tokens} must be >= 0")
    _check(
        t.seq_len <= cfg.model.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
        "raise model.max_seq_len or lower train.seq_len",
    )
    _check(
        t.global_batch % t.micro_batch == 0,
        f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch="
        f"{t.micro_batch}; set train.global_batch to a multiple of {t.micro_batch}",
    )
    _check(
        t.steps * t.global_batch <= MAX_SAMPLES,
        f"train.steps × train.global_batch = {t.steps} × {t.global_batch} sequences overflow a 64-bit "
        "sample index; lower train.global_batch or train.steps",
    )
    _check(
        t.resume in ("auto", "never") or bool(t.resume),
        "train.resume must be auto, never or the path of a checkpoint folder",
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading, overriding, saving


def parse_override(text: str) -> tuple[list[str], _Override]:
    """`a.b=c` -> (["a", "b"], c) with c kept as typed and read as YAML (ints, floats, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} has no '='; write it as --set section.key=value")
    key, _, value = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} names no key; write it as --set section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path, _Override(value, parsed)


def _apply_override(raw: dict, path: list[str], value: _Override) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        if node.get(part) is None:  # absent, or a YAML section left empty
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def config_from_dict(raw: Optional[dict], overrides: Optional[list[str]] = None) -> Config:
    """Build and validate a Config from a plain dict (as read from YAML) plus `a.b=c` overrides."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping of sections (model:, train:, ...)")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy we may edit
    for text in overrides or []:
        _apply_override(raw, *parse_override(text))
    return validate(_build(Config, raw, ""))


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"key {key!r} given twice (line {line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML would
    keep the last value silently, so an edit made to the first copy would do nothing."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            # Merged keys (<<: *anchor) may be overridden; that is what merging is for.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise _DuplicateKey(key_node.value, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (or the embedded defaults when `path` is None) and apply overrides."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass the path of a YAML file")
        raw = read_yaml_file(p, "config file")
    return config_from_dict(raw, overrides)


def read_yaml_file(path: Path, what: str) -> Any:
    """The YAML document in `path`, or a one-line error naming `what` (e.g. "config file"), the
    file and, where the parser knows it, the line."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{what} {path}: {e}; keep one") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{what} {path} is not valid YAML{line}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not text; pass a YAML file") from None


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
