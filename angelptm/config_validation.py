"""The rules a run configuration must meet: ranges, combinations, the limits of what torch can
index, and the derived defaults (`validate`). Each broken rule is one `ConfigError` line naming
the dotted key and the fix. What depends on the machine (memory, folders) is the trainer's
preflight's to check (`angelptm.train.preflight`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from angelptm.errors import ConfigError

if TYPE_CHECKING:
    from angelptm.config import Config, ModelConfig

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


PATH_SOURCES = ("text", "tokens", "megatron")  # the data sources that read data.path


def _check_source(source: str, path: Any, source_key: str, path_key: str) -> None:
    _check(source not in PATH_SOURCES or path is not None,
           f"{source_key}={source} reads a file or folder; set {path_key}=/path/to/it")
    _check(source in PATH_SOURCES or path is None,
           f"{path_key}={path} is read only by {source_key} {', '.join(PATH_SOURCES)}, not {source}; "
           f"set {source_key} or drop {path_key}")


def _check_blend(entries: list, key: str) -> None:
    seen: dict[tuple, int] = {}
    for i, entry in enumerate(entries):
        _check_source(entry.source, entry.path, f"{key}[{i}].source", f"{key}[{i}].path")
        _check(entry.weight > 0, f"{key}[{i}].weight={entry.weight} must be positive (weights are relative)")
        first = seen.setdefault((entry.source, entry.path), i)
        _check(first == i, f"{key}[{i}] repeats {key}[{first}] ({entry.source} {entry.path}); "
                           "keep one entry and add up their weights")


def _resolve_model(m: ModelConfig) -> None:
    _positive(m, "model", "dim", "n_layers", "n_heads", "vocab_size", "max_seq_len")
    if m.n_kv_heads is None:
        m.n_kv_heads = m.n_heads
    if m.ffn_dim is None:
        m.ffn_dim = 4 * m.dim if m.arch == "gpt" else 64 * math.ceil(8 * m.dim / 3 / 64)
    _positive(m, "model", "n_kv_heads", "ffn_dim", "rope_theta", "norm_eps")
    if m.head_dim is None:
        _check(
            m.dim % m.n_heads == 0,
            f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; pick n_heads dividing dim "
            "or set model.head_dim",
        )
        _check(
            (m.dim // m.n_heads) % 2 == 0,
            f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for rotary embeddings",
        )
    else:
        _positive(m, "model", "head_dim")
        _check(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for rotary embeddings")
    _check(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
        "pick n_kv_heads dividing n_heads",
    )
    _check(m.sliding_window is None or m.sliding_window > 0,
           f"model.sliding_window={m.sliding_window} must be positive or null (no window)")
    r = m.rope_scaling
    if r is not None:
        _check(r.factor >= 1, f"model.rope_scaling.factor={r.factor} must be >= 1 (1: no scaling)")
        if r.type == "llama3":
            _check(0 < r.low_freq_factor < r.high_freq_factor,
                   f"model.rope_scaling: low_freq_factor={r.low_freq_factor} and high_freq_factor="
                   f"{r.high_freq_factor} must satisfy 0 < low < high (Llama 3.1 uses 1 and 4)")
            _positive(r, "model.rope_scaling", "original_max_position_embeddings")
    # The largest weight: the embedding / output head (vocab × dim), a projection (dim × dim) or
    # an MLP matrix (ffn × dim). Memory for the whole model is the trainer's preflight's to check.
    other, name = max((m.vocab_size, "model.vocab_size"), (m.dim, "model.dim"), (m.ffn_dim, "model.ffn_dim"))
    _check(
        m.dim * other <= MAX_TENSOR_NUMEL,
        f"model.dim={m.dim} × {name}={other} = {m.dim * other:.3g} elements in one weight, more than a "
        f"tensor can hold ({MAX_TENSOR_NUMEL:.3g}); lower " + ("model.dim" if name == "model.dim" else f"{name} or model.dim"),
    )


def _resolve_moe(cfg: Config) -> None:
    m, e = cfg.model, cfg.model.moe
    _check(e.n_experts >= 0, f"model.moe.n_experts={e.n_experts} must be >= 0 (0: a dense model)")
    if e.n_experts == 0:
        return
    if e.expert_ffn_dim is None:
        e.expert_ffn_dim = m.ffn_dim
    _check(1 <= e.top_k <= e.n_experts, f"model.moe.top_k={e.top_k} must lie between 1 and "
           f"model.moe.n_experts={e.n_experts}; lower top_k or add experts")
    _positive(e, "model.moe", "expert_ffn_dim", "bias_update_rate")
    _check(e.n_shared_experts >= 0, f"model.moe.n_shared_experts={e.n_shared_experts} must be >= 0")
    _check(e.aux_loss_coef >= 0, f"model.moe.aux_loss_coef={e.aux_loss_coef} must be >= 0")
    _check(e.z_loss_coef >= 0, f"model.moe.z_loss_coef={e.z_loss_coef} must be >= 0")
    _check(e.capacity_factor is None or e.capacity_factor > 0,
           f"model.moe.capacity_factor={e.capacity_factor} must be positive, or null for dropless routing")
    _check(0 <= e.first_dense_layers < m.n_layers, f"model.moe.first_dense_layers={e.first_dense_layers} must lie "
           f"in [0, model.n_layers={m.n_layers}) so that some layer has experts; lower it or set model.moe.n_experts=0")
    _check(e.n_experts * e.expert_ffn_dim * m.dim <= MAX_TENSOR_NUMEL,
           f"model.moe.n_experts × expert_ffn_dim × model.dim = {e.n_experts * e.expert_ffn_dim * m.dim:.3g} elements "
           f"in one stacked expert weight, more than a tensor can hold ({MAX_TENSOR_NUMEL:.3g}); lower one of them")
    # Under cp (and sequence-parallel tp) each rank routes part of every sequence; the routing
    # losses sum their statistics over those ranks, but a capacity is a share of the tokens in
    # order, which no rank sees.
    p = cfg.parallel
    shards = p.cp * (p.tp if p.sequence_parallel else 1)
    _check(shards == 1 or e.capacity_factor is None,
           f"model.moe.capacity_factor={e.capacity_factor} needs every microbatch's tokens on one rank, and "
           f"parallel.cp={p.cp}, tp={p.tp} with sequence_parallel={p.sequence_parallel} split them; set "
           "model.moe.capacity_factor=null (dropless) or parallel.cp=1 and tp=1 (or sequence_parallel=false)")


def _check_expert_parallel(cfg: Config) -> None:
    p, n_experts = cfg.parallel, cfg.model.moe.n_experts
    _check(p.ep == 1 or n_experts > 0, f"parallel.ep={p.ep} splits experts, and this model has none; set "
                                       "parallel.ep=1 or model.moe.n_experts > 0")
    _check(n_experts % p.ep == 0, f"parallel.ep={p.ep} does not divide model.moe.n_experts={n_experts}; "
                                  "pick ep dividing n_experts")
    _check(p.dp == "auto" or (p.dp * p.cp) % p.ep == 0, f"parallel.ep={p.ep} does not divide dp·cp = "
           f"{p.dp}·{p.cp} (ep ranks are carved from the data ranks); pick ep dividing dp·cp")


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the projections angelptm.finetune.lora adapts


def _check_lora(cfg: Config) -> None:
    lora = cfg.finetune.lora
    _check(lora.rank >= 0, f"finetune.lora.rank={lora.rank} must be >= 0 (0: full fine-tuning)")
    _check(lora.alpha > 0, f"finetune.lora.alpha={lora.alpha} must be positive (the adapters scale by alpha / rank)")
    _check(0 <= lora.dropout < 1, f"finetune.lora.dropout={lora.dropout} must lie in [0, 1)")
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    _check(bool(lora.targets) and not unknown, f"finetune.lora.targets={lora.targets} must be a non-empty list of "
                                               f"{', '.join(LORA_TARGETS)}")
    _check(len(set(lora.targets)) == len(lora.targets), f"finetune.lora.targets={lora.targets} names a "
                                                        "projection twice; name each once")
    ffn = sorted(set(lora.targets) & {"w1", "w2", "w3"})
    _check(lora.rank == 0 or cfg.model.moe.n_experts == 0 or not ffn,
           f"finetune.lora.targets {ffn} adapt the feed-forward, and model.moe puts experts there, which take no "
           "adapters yet; target only wq, wk, wv, wo")


def validate(cfg: Config) -> Config:
    """Check ranges and combinations, fill the derived defaults, and return `cfg`."""
    _resolve_model(cfg.model)
    p = cfg.parallel
    _positive(p, "parallel", "tp", "pp", "cp", "ep", "pp_virtual_stages")
    _check(p.dp == "auto" or p.dp > 0, f"parallel.dp={p.dp} must be positive or auto")
    _resolve_moe(cfg)
    _check_expert_parallel(cfg)
    _check_lora(cfg)
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
    if d.sources:
        _check(d.source == "stdlib" and d.path is None,
               "data.sources is a blend that replaces data.source and data.path; drop those two")
        _check_blend(d.sources, "data.sources")
    else:
        _check_source(d.source, d.path, "data.source", "data.path")
    if isinstance(d.valid, list):
        _check(bool(d.valid), "data.valid=[] names no validation data; drop it or list sources as in data.sources")
        _check_blend(d.valid, "data.valid")
    _check(0 <= d.valid_fraction < 1, f"data.valid_fraction={d.valid_fraction} must lie in [0, 1)")
    _check(d.valid is None or d.valid_fraction == 0,
           "data.valid and data.valid_fraction both name validation data; keep one")
    _check(bool(d.tokenizer), "data.tokenizer is empty; set it to byte or to a Hugging Face tokenizer folder")
    _check(d.seed >= 0, f"data.seed={d.seed} must be >= 0")
    t = cfg.train
    _positive(t, "train", "steps", "global_batch", "micro_batch", "seq_len", "log_every")
    _check(t.ckpt_every >= 0, f"train.ckpt_every={t.ckpt_every} must be >= 0 (0: only at the end)")
    _check(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    _check(cfg.parallel.timeout_s > 0, f"parallel.timeout_s={cfg.parallel.timeout_s} must be positive (seconds)")
    _check(t.max_skipped_steps >= 1, f"train.max_skipped_steps={t.max_skipped_steps} must be >= 1")
    _check(t.sample_tokens >= 0, f"train.sample_tokens={t.sample_tokens} must be >= 0")
    _check(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0: no validation)")
    _check(t.eval_batches >= 1, f"train.eval_batches={t.eval_batches} must be >= 1")
    _check(t.eval_every == 0 or d.valid is not None or d.valid_fraction > 0,
           f"train.eval_every={t.eval_every} needs validation data; set data.valid or data.valid_fraction")
    loggers = f"train.loggers=[{', '.join(t.loggers)}]"
    _check("jsonl" in t.loggers, f"{loggers} leaves out jsonl: metrics.jsonl is every run's record (angelptm "
                                 "report reads it); keep it, e.g. [jsonl, tensorboard]")
    _check(len(set(t.loggers)) == len(t.loggers), f"{loggers} names a logger twice; name each once")
    _check(
        t.seq_len <= cfg.model.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
        "raise model.max_seq_len or lower train.seq_len",
    )
    window = cfg.model.sliding_window
    _check(window is None or window >= t.seq_len or cfg.parallel.cp == 1,
           f"model.sliding_window={window} is shorter than train.seq_len={t.seq_len}, and context parallelism "
           f"(parallel.cp={cfg.parallel.cp}) computes full causal attention only; set parallel.cp=1 or "
           f"train.seq_len <= {window}")
    # A row-parallel wo holds a slice of its inputs on each tp rank; its bias would be added tp times.
    _check(not cfg.model.o_bias or cfg.parallel.tp == 1,
           f"model.o_bias=true is not supported with parallel.tp={cfg.parallel.tp}; set parallel.tp=1")
    _check(t.init_from is None or bool(t.init_from), "train.init_from is empty; pass a checkpoint folder or null")
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
