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

from angelptm.config_validation import MAX_MICROBATCHES, validate
from angelptm.errors import ConfigError


@dataclass
class MoEConfig:
    """Mixture of experts in the feed-forward layers (`angelptm.models.moe`); n_experts 0 = dense."""

    n_experts: int = 0
    top_k: int = 2  # routed experts per token
    n_shared_experts: int = 0  # experts every token passes through, added to the routed output
    expert_ffn_dim: Optional[int] = None  # null: model.ffn_dim
    router: Literal["softmax", "sigmoid"] = "softmax"
    balance: Literal["aux_loss", "aux_free"] = "aux_loss"  # aux_free: DeepSeek-V3's per-expert selection bias
    aux_loss_coef: float = 0.01  # load-balancing loss (balance=aux_loss)
    z_loss_coef: float = 0.0  # router z-loss
    capacity_factor: Optional[float] = None  # null: dropless
    first_dense_layers: int = 0  # the first N layers keep the dense feed-forward
    bias_update_rate: float = 0.001  # balance=aux_free: the bias step per training step


@dataclass
class RopeScalingConfig:
    """Scaled rotary positions, as Hugging Face's `rope_scaling` defines them (`angelptm.models.rope`)."""

    type: Literal["llama3", "linear", "dynamic"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only: the context the model was pre-trained at


@dataclass
class ModelConfig:
    arch: Literal["llama", "gpt"] = "llama"
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: Optional[int] = 4  # null: as many as n_heads (plain multi-head attention)
    head_dim: Optional[int] = None  # width of one attention head; null: dim / n_heads (Qwen3 sets its own)
    ffn_dim: Optional[int] = 768  # null: 8/3·dim rounded up to 64 (llama) or 4·dim (gpt)
    vocab_size: int = 259  # the byte tokenizer's 256 bytes + BOS, EOS, PAD
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: Optional[RopeScalingConfig] = None  # null: plain RoPE
    qkv_bias: bool = False  # biases on wq, wk, wv (Qwen2)
    o_bias: bool = False  # a bias on wo (Llama's attention_bias sets both)
    qk_norm: Literal["none", "before_rope", "after_rope"] = "none"  # per-head RMSNorm of q, k (Qwen3 / Hunyuan)
    sliding_window: Optional[int] = None  # attend to at most this many latest positions (Mistral); null: all
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def resolved_head_dim(self) -> int:
        """The width of one attention head: `head_dim`, or dim / n_heads where it is null."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim


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
    ep: int = 1  # expert parallelism: experts split over ep ranks carved from dp × cp (ep divides dp·cp)


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


DataSource = Literal["stdlib", "text", "tokens", "megatron", "synthetic"]


@dataclass
class BlendSourceConfig:
    """One entry of `data.sources` or of a `data.valid` blend."""

    path: Optional[str] = None
    weight: float = 1.0  # relative: the weights of a blend are normalised to sum to 1
    source: DataSource = "tokens"


@dataclass
class DataConfig:
    source: DataSource = "stdlib"
    path: Optional[str] = None
    tokenizer: str = "byte"  # byte, or a Hugging Face tokenizer folder / tokenizer.json
    seed: int = 0
    sources: list[BlendSourceConfig] = field(default_factory=list)  # a weighted blend instead of source/path
    valid: Optional[Union[str, list[BlendSourceConfig]]] = None  # a token file (or Megatron) prefix, or a blend
    valid_fraction: float = 0.0  # else hold out this fraction of the training documents
    format: Literal["text", "sft"] = "text"  # sft: rows of a `prepare --sft` token file, loss on its mask only
    pack: bool = False  # several documents per sequence; attention and positions restart at each document
    overlong: Literal["truncate", "drop"] = "truncate"  # format=sft: a sample longer than train.seq_len


LoggerName = Literal["jsonl", "tensorboard", "wandb"]


@dataclass
class WandbConfig:
    project: str = "angelptm"
    name: Optional[str] = None  # null: the output folder's name
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: a run folder for `wandb sync`


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
    init_from: Optional[str] = None  # PATH of a checkpoint: its weights only, at step 0; a resume point wins
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    deterministic: bool = False
    compile: bool = False  # torch.compile each transformer block (fuses FP8 casts, cuts launch overhead)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sample_prompt: str = "def "
    sample_tokens: int = 160  # generated after training; 0: none
    max_skipped_steps: int = 10  # consecutive non-finite steps before the run stops (exit 3)
    eval_every: int = 0  # steps between validation passes; 0: none
    eval_batches: int = 8  # global batches per validation pass
    loggers: list[LoggerName] = field(default_factory=lambda: ["jsonl"])  # where step records go
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class LoraConfig:
    """Low-rank adapters on the named projections (`angelptm.finetune.lora`); rank 0 = full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])


@dataclass
class FinetuneConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

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
