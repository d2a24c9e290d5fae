"""LoRA (`finetune.lora`): PEFT's adapters and numbers, frozen base weights with no gradients or
optimizer state at any ZeRO stage (sharded at stage 3), parity under tp, pp, ZeRO-3 and expert
parallelism, exact resume, init_from a base model, merged and PEFT exports, one-line config errors."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from angelptm.config import config_from_dict
from angelptm.distributed.parity import relative_difference
from angelptm.distributed.spawn import run_distributed
from angelptm.distributed.tensor_parallel import ShardSpec
from angelptm.errors import ConfigError, UserError
from angelptm.finetune import lora
from angelptm.models.hf import export_hf, hf_config_from, import_hf, state_to_hf
from angelptm.models.llama import build_llama
from angelptm.train import checkpoint as ckpt
from angelptm.train.trainer import Trainer

from conftest import TINY_MODEL, one_line, run_cli, tiny_sections
from test_hf import randomize  # every parameter random; norm weights near one

ALL_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
LORA = {"rank": 4, "alpha": 8.0, "targets": ALL_TARGETS}
TOKENS = torch.randint(0, TINY_MODEL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
HF_TO_PEFT = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
              "w2": "down_proj", "w3": "up_proj"}


def lora_job(output_dir, lora_section=None, **sections) -> dict:
    raw = tiny_sections(output_dir, **sections)
    raw["finetune"] = {"lora": dict(LORA, **(lora_section or {}))}
    raw["optim"].update(lr=1e-2, warmup_steps=0)
    raw["train"].setdefault("resume", "never")
    return raw


@pytest.fixture
def trainers(one_thread):
    yield lambda raw, *overrides: Trainer(config_from_dict(raw, list(overrides)))
    if dist.is_initialized():
        dist.destroy_process_group()


def losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def lora_model(cfg, seed: int = 0) -> torch.nn.Module:
    """A plain CPU model with random base weights and adapters at their initial values."""
    model = build_llama(cfg.model, "cpu")
    randomize(model, seed)
    lora.apply_lora(model, cfg.finetune.lora)
    for name, param in model.named_parameters():
        if lora.is_adapter(name):
            param.copy_(lora.initial_value(name, tuple(param.shape), cfg.model, cfg.train.seed))
    return model


def hf_base(cfg, model: torch.nn.Module) -> LlamaForCausalLM:
    """transformers' Llama with `model`'s base weights (its adapters left out)."""
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from(cfg.model)))
    base = {k: v for k, v in model.state_dict().items() if not lora.is_adapter(k)}
    hf.load_state_dict(state_to_hf(base, cfg.model))
    return hf.eval()


def model_from_checkpoint(folder: Path) -> torch.nn.Module:
    """Our LoRA model as a checkpoint holds it: its base weights and trained adapters."""
    cfg, model = ckpt.load_model(folder)
    lora.apply_lora(model, cfg.finetune.lora)
    with torch.no_grad():
        for name, tensor in lora.read_adapters(folder).items():
            model.get_parameter(name).copy_(tensor)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Against PEFT


def test_initial_adapters_follow_peft_and_give_its_logits(tmp_path):
    cfg = config_from_dict(lora_job(tmp_path))
    model = lora_model(cfg)
    peft_fresh = get_peft_model(hf_base(cfg, model), PeftLoraConfig(r=4, lora_alpha=8.0, target_modules=list(
        HF_TO_PEFT.values())))
    fresh = dict(peft_fresh.named_parameters())
    for name, param in model.named_parameters():
        if name.endswith(lora.B_SUFFIX):
            assert not param.any()
        elif name.endswith(lora.A_SUFFIX):
            bound = 1 / math.sqrt(param.shape[1])  # PEFT's kaiming_uniform_(a=√5)
            assert param.abs().max() <= bound and param.abs().max() > 0.9 * bound
            layer, part, target = name.split(".")[1], name.split(".")[2], name.split(".")[3]
            hf_part = "self_attn" if part == "attention" else "mlp"
            theirs = fresh[f"base_model.model.model.layers.{layer}.{hf_part}.{HF_TO_PEFT[target]}.lora_A.default.weight"]
            assert theirs.shape == param.shape and theirs.abs().max() <= bound
    # The same adapters (B made non-zero, so that they matter) give PEFT's logits.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(lora.B_SUFFIX):
                param.normal_(0, 0.05, generator=gen)
    ckpt.save_model_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    folder = export_hf(tmp_path / "ckpt", tmp_path / "adapter", adapter=True)
    peft_model = PeftModel.from_pretrained(hf_base(cfg, model), folder).eval()
    with torch.no_grad():
        ours, theirs = model.eval()(TOKENS), peft_model(TOKENS).logits
    assert relative_difference(ours, theirs) < 1e-5
    assert relative_difference(ours, hf_base(cfg, model)(TOKENS).logits) > 1e-3  # the adapters took part


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LoRA run of a few steps on every target."""
    root = tmp_path_factory.mktemp("trained")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = lora_job(root / "run", train={"steps": 3})
        Trainer(config_from_dict(raw)).fit()
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(before)
    return ckpt.resolve_checkpoint(root / "run")


def test_merged_export_equals_peft_merge_and_transformers_logits(tmp_path, trained):
    cfg, base_model = ckpt.load_model(trained)
    ours = model_from_checkpoint(trained)
    assert any(p.any() for n, p in ours.named_parameters() if n.endswith(lora.B_SUFFIX))  # trained adapters
    merged = export_hf(trained, tmp_path / "merged")
    adapter = export_hf(trained, tmp_path / "adapter", adapter=True)
    assert sorted(p.name for p in adapter.iterdir()) == [lora.PEFT_CONFIG, lora.PEFT_WEIGHTS]
    peft_merged = PeftModel.from_pretrained(hf_base(cfg, base_model), adapter).merge_and_unload().state_dict()
    merged_weights = load_file(merged / "model.safetensors")
    assert merged_weights.keys() <= peft_merged.keys()
    for name, weight in merged_weights.items():
        assert relative_difference(weight, peft_merged[name]) < 1e-6, name
    hf = LlamaForCausalLM.from_pretrained(merged).eval()
    _, merged_model = lora.load_merged_model(trained)  # what generate runs
    with torch.no_grad():
        assert relative_difference(hf(TOKENS).logits, ours(TOKENS)) < 1e-5
        assert relative_difference(merged_model(TOKENS), ours(TOKENS)) < 1e-5


def test_cli_exports_a_peft_adapter_folder(tmp_path, trained):
    result = run_cli("export-hf", trained, tmp_path / "adapter", "--adapter")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "adapter" / lora.PEFT_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and sorted(config["target_modules"]) == sorted(
        HF_TO_PEFT.values())
    keys = load_file(tmp_path / "adapter" / lora.PEFT_WEIGHTS).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 7 * 2


def test_adapter_export_of_a_full_fine_tune_is_one_line(tmp_path):
    cfg = config_from_dict(tiny_sections(tmp_path))
    model = build_llama(cfg.model, "cpu")
    ckpt.save_model_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with pytest.raises(UserError) as e:
        export_hf(tmp_path / "ckpt", tmp_path / "out", adapter=True)
    assert "--adapter" in one_line(str(e.value))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Frozen base weights and ZeROCache


def page_report(optimizer) -> dict:
    """What ZeROCache's pages hold on this rank: trainable and frozen parameter names, element counts
    (whole pages and this rank's own ranges), whether any frozen page has gradient or state buffers,
    and the optimizer-state bytes."""
    trainable = [b for b in optimizer._buffers if not b.page.frozen]
    frozen = [b for b in optimizer._buffers if b.page.frozen]
    return {
        "trainable": sorted(slot.name for b in trainable for slot in b.page.slots),
        "frozen": sorted(slot.name for b in frozen for slot in b.page.slots),
        "trainable_own": sum(b.own_numel for b in trainable),
        "frozen_numel": sum(b.page.numel for b in frozen), "frozen_own": sum(b.own_numel for b in frozen),
        "frozen_buffers": any(t is not None for b in frozen for t in (b.grad_full, b.grad_shard, b.slab)),
        "optimizer_bytes": optimizer.memory_ledger()["device"]["optimizer"],
    }


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_frozen_weights_get_no_gradient_or_optimizer_pages(tmp_path, trainers, stage):
    full = trainers(lora_job(tmp_path / "full", train={"steps": 1}, zero={"stage": stage}), "finetune.lora.rank=0")
    full_optimizer = full.optimizer.memory_ledger()["device"]["optimizer"]
    dist.destroy_process_group()
    trainer = trainers(lora_job(tmp_path / "lora", train={"steps": 2}, zero={"stage": stage}))
    model = trainer.model
    adapters = {n: p for n, p in model.named_parameters() if lora.is_adapter(n)}
    with trainer.optimizer.gathered_parameters():  # stage 3: parameters exist only when gathered
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapters}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in adapters)
    trainer.fit()
    pages = page_report(trainer.optimizer)
    assert pages["trainable"] == sorted(adapters) and pages["frozen"] == sorted(initial)
    assert not pages["frozen_buffers"]  # frozen pages: parameters alone, no gradient buckets, no moments
    assert pages["optimizer_bytes"] == 2 * 4 * pages["trainable_own"]  # exp_avg + exp_avg_sq of the adapters
    assert pages["trainable_own"] < 2 * sum(p.numel() for p in adapters.values())
    assert pages["optimizer_bytes"] < full_optimizer / 10
    assert all(p.grad is None for p in model.parameters())
    with trainer.optimizer.gathered_parameters():
        for name, value in initial.items():
            assert torch.equal(model.get_parameter(name).detach(), value), name  # the base never moves
        assert all(p.any() for n, p in adapters.items() if n.endswith(lora.B_SUFFIX))  # the adapters trained


def test_every_zero_stage_and_recomputation_give_the_same_run(tmp_path, trainers):
    """Stage 3 gathers the frozen pages for forward, for backward through the frozen weights (the
    head, and each block after its adapters' gradients are in) and for recomputation; two
    microbatches, offloaded state and a tied head change nothing either."""
    runs = {}
    for stage, extra in [(0, []), (1, []), (2, ["train.activation_checkpointing=full"]),
                         (3, ["train.activation_checkpointing=full"]),
                         (3, ["zero.offload_params=cpu", "zero.offload_optimizer=cpu"])]:
        out = tmp_path / f"{stage}{len(runs)}"
        trainers(lora_job(out, train={"steps": 3, "micro_batch": 4}, model={"tie_embeddings": True}),
                 f"zero.stage={stage}", *extra).fit()
        dist.destroy_process_group()
        runs[out.name] = losses(out)
    first = next(iter(runs.values()))
    assert all(run == first for run in runs.values()), runs


# ---------------------------------------------------------------------------------------------
# Layouts: tp (adapters split like their base) and dp with ZeRO-3


PARITY_JOB = lora_job("unused", train={"steps": 5, "global_batch": 4, "micro_batch": 2, "seq_len": 16},
                      model={"n_kv_heads": 1})  # one kv head: at tp 2 both ranks hold it (partial gradients)
# Adapters on the attention of an MoE model: the frozen experts stay in expert pages, split over ep.
MOE_PARITY_JOB = lora_job("unused", {"targets": ["wq", "wk", "wv", "wo"]}, train=PARITY_JOB["train"],
                          model={"moe": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32}})


def _train_layouts(job: dict, settings: list[list[str]], root: str) -> list[dict]:
    """Train each layout in turn; this rank's `page_report` of each."""
    pages = []
    for i, overrides in enumerate(settings):
        trainer = Trainer(config_from_dict(job, overrides + [f"train.output_dir={root}/{i}"]))
        trainer.fit()
        pages.append(page_report(trainer.optimizer))
    dist.destroy_process_group()
    return pages


def train_layouts(layouts: list[list[str]], world: int, root: Path,
                  job: dict = PARITY_JOB) -> list[tuple[list[float], dict, list]]:
    """(losses, full adapters of the last checkpoint, each rank's pages) of each layout, on `world` processes."""
    per_rank = run_distributed(_train_layouts, world, job, layouts, str(root), init_group=False)
    return [(losses(root / str(i)), lora.read_adapters(ckpt.resolve_checkpoint(root / str(i))),
             [rank_pages[i] for rank_pages in per_rank]) for i in range(len(layouts))]


@pytest.mark.slow
def test_tp2_and_zero3_dp2_match_the_single_process(tmp_path):
    (reference, reference_adapters, _), = train_layouts([[]], 1, tmp_path / "one")
    runs = train_layouts([["parallel.tp=2"], ["parallel.dp=2", "zero.stage=3"], ["parallel.pp=2"]], 2,
                         tmp_path / "two")
    for (run_losses, adapters, _), layout in zip(runs, ("tp2", "dp2 zero3", "pp2")):
        loss_diff = max(abs(a - b) / b for a, b in zip(run_losses, reference))
        weight_diff = max(relative_difference(adapters[n], ref) for n, ref in reference_adapters.items())
        print(f"{layout}: max rel loss diff {loss_diff:.2e}, max rel adapter diff {weight_diff:.2e}")
        assert len(run_losses) == 5 and adapters.keys() == reference_adapters.keys()
        assert loss_diff < 1e-5 and weight_diff < 1e-5, (layout, loss_diff, weight_diff)
    assert reference[-1] < reference[0]
    # ZeRO-3 over dp 2: each rank holds half of the frozen pages (gathered for compute), and
    # gradients and moments for half of the adapter pages alone.
    for pages in runs[1][2]:
        assert pages["trainable"] == sorted(reference_adapters) and pages["frozen"]
        assert pages["frozen_own"] * 2 == pages["frozen_numel"] and not pages["frozen_buffers"]
        assert pages["optimizer_bytes"] == 2 * 4 * pages["trainable_own"]


@pytest.mark.slow
def test_moe_with_expert_parallelism_and_zero3_matches_the_single_process(tmp_path):
    (reference, reference_adapters, _), = train_layouts([[]], 1, tmp_path / "one", MOE_PARITY_JOB)
    (run_losses, adapters, _), = train_layouts([["parallel.dp=2", "parallel.ep=2", "zero.stage=3"]], 2,
                                               tmp_path / "two", MOE_PARITY_JOB)
    loss_diff = max(abs(a - b) / b for a, b in zip(run_losses, reference))
    weight_diff = max(relative_difference(adapters[n], ref) for n, ref in reference_adapters.items())
    print(f"moe dp2 ep2 zero3: max rel loss diff {loss_diff:.2e}, max rel adapter diff {weight_diff:.2e}")
    assert loss_diff < 1e-5 and weight_diff < 1e-5


# ---------------------------------------------------------------------------------------------
# Dropout: one mask per tp group, the single process's under tp, recomputed as drawn


DROPOUT_JOB = lora_job("unused", {"dropout": 0.25}, train=PARITY_JOB["train"], model=PARITY_JOB["model"])


def _train_recording_masks(job: dict, settings: list[list[str]], root: str) -> list[dict]:
    """Train each layout in turn; per layout, the keep-masks each adapter dropout drew on this rank,
    one per training forward, in order."""
    masks = []
    for i, overrides in enumerate(settings):
        trainer = Trainer(config_from_dict(job, overrides + [f"train.output_dir={root}/{i}"]))
        drawn = {}

        def record(module, args, out, name):
            drawn.setdefault(name, []).append(out != 0)

        for name, module in trainer.model.named_modules():
            if isinstance(module, lora.AdapterDropout):
                module.register_forward_hook(functools.partial(record, name=name))
        trainer.fit()
        masks.append(drawn)
    dist.destroy_process_group()
    return masks


def grad_norms(output_dir) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_dropout_masks_are_full_width_slices_and_recomputed_alike(tmp_path, trainers):
    whole, halves = lora.AdapterDropout(0.5), [lora.AdapterDropout(0.5, ShardSpec((4, 8), dim=1, start=r * 4, length=4))
                                               for r in (0, 1)]
    x = torch.ones(3, 8)
    lora.seed_dropout(seed=0, tp=1)
    full = whole(x)
    sliced = []
    for half in halves:  # each tp rank's default generator seeded alike
        lora.seed_dropout(seed=0, tp=2)
        sliced.append(half(x[:, :4]))
    assert torch.equal(torch.cat(sliced, dim=1), full) and 0 < (full == 0).sum() < full.numel()
    assert torch.equal(whole.eval()(x), x)
    # Recomputation (torch.utils.checkpoint replays the default generator) drops what the forward
    # dropped, at every ZeRO stage; and the dropout takes part.
    runs = {}
    for name, overrides in [("plain", []), ("full", ["train.activation_checkpointing=full"]),
                            ("zero3", ["zero.stage=3", "train.activation_checkpointing=full"]),
                            ("off", ["finetune.lora.dropout=0"])]:
        trainers(dict(DROPOUT_JOB, train=dict(DROPOUT_JOB["train"], steps=3, output_dir=str(tmp_path / name))),
                 *overrides).fit()
        dist.destroy_process_group()
        runs[name] = losses(tmp_path / name)
    assert runs["plain"] == runs["full"] == runs["zero3"], runs
    assert runs["plain"][1:] != runs["off"][1:]


@pytest.mark.slow
def test_dropout_under_tp2_matches_the_single_process_and_dp_ranks_draw_apart(tmp_path):
    """A tp pair draws the single process's masks, bit for bit, at every forward (column-parallel
    inputs whole on both ranks, row-parallel ones each rank's slice of the columns), and so trains
    as it does; a dp pair draws masks of its own."""
    single, = run_distributed(_train_recording_masks, 1, DROPOUT_JOB, [[]], str(tmp_path / "one"), init_group=False)[0]
    tp_ranks, dp_ranks = zip(*run_distributed(_train_recording_masks, 2, DROPOUT_JOB,
                                              [["parallel.tp=2"], ["parallel.dp=2"]], str(tmp_path / "two"),
                                              init_group=False))
    assert single.keys() == tp_ranks[0].keys() == tp_ranks[1].keys() and len(single) == 2 * len(ALL_TARGETS)
    for name, masks in single.items():
        assert len(masks) == 5 * 2 == len(tp_ranks[0][name])  # steps × microbatches
        for drawn, on_0, on_1 in zip(masks, tp_ranks[0][name], tp_ranks[1][name]):
            if name.endswith(("wo.lora_dropout", "w2.lora_dropout")):
                assert torch.equal(torch.cat([on_0, on_1], dim=-1), drawn), name
            else:
                assert torch.equal(on_0, drawn) and torch.equal(on_1, drawn), name
        assert not torch.equal(dp_ranks[0][name][0], dp_ranks[1][name][0]), name
    reference, run = tmp_path / "one" / "0", tmp_path / "two" / "0"
    loss_diff = max(abs(a - b) / b for a, b in zip(losses(run), losses(reference)))
    norm_diff = max(abs(a - b) / b for a, b in zip(grad_norms(run), grad_norms(reference)))
    reference_adapters = lora.read_adapters(ckpt.resolve_checkpoint(reference))
    adapters = lora.read_adapters(ckpt.resolve_checkpoint(run))
    weight_diff = max(relative_difference(adapters[n], ref) for n, ref in reference_adapters.items())
    print(f"tp2 dropout 0.25: max rel loss diff {loss_diff:.2e}, grad norm diff {norm_diff:.2e}, "
          f"adapter diff {weight_diff:.2e}")
    assert loss_diff < 1e-5 and norm_diff < 1e-5
    # AdamW's first step moves an element by lr · g / (|g| + eps): where this draw leaves a gradient
    # element near eps (1e-8), the layouts' rounding of it moves that element by up to ~5e-4 of lr
    # 1e-2 (a relative 3e-3 of its adapter after one step); the losses and gradients above hold the
    # computation itself to 1e-5.
    assert weight_diff < 1e-2


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_resume_continues_exactly(tmp_path, trainers):
    """Dropout on: the checkpoint's generator state gives the resumed run the masks the whole run drew."""
    dropout = {"dropout": 0.1}
    whole = trainers(lora_job(tmp_path / "whole", dropout, train={"steps": 4}))
    whole.fit()
    whole_adapters = lora.read_adapters(ckpt.resolve_checkpoint(tmp_path / "whole"))
    dist.destroy_process_group()
    trainers(lora_job(tmp_path / "cut", dropout, train={"steps": 4})).fit(until=2)
    dist.destroy_process_group()
    resumed = trainers(lora_job(tmp_path / "cut", dropout, train={"steps": 4, "resume": "auto"}))
    assert resumed.step == 2
    resumed.fit()
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    cut_adapters = lora.read_adapters(ckpt.resolve_checkpoint(tmp_path / "cut"))
    assert all(torch.equal(cut_adapters[n], t) for n, t in whole_adapters.items())


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers and imported: the base to fine-tune."""
    root = tmp_path_factory.mktemp("hf")
    m = TINY_MODEL
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=m["dim"], num_hidden_layers=m["n_layers"],
                                      num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
                                      intermediate_size=m["ffn_dim"], vocab_size=m["vocab_size"],
                                      max_position_embeddings=m["max_seq_len"]))
    hf.save_pretrained(root / "hf")
    return import_hf(root / "hf", root / "imported")


def test_init_from_a_base_model_loads_it_and_starts_fresh_adapters(tmp_path, trainers, imported):
    _, base = ckpt.load_model(imported)
    raw = lora_job(tmp_path / "run", train={"steps": 2, "init_from": str(imported)})
    raw["model"] = ckpt.checkpoint_config(imported).to_dict()["model"]
    trainer = trainers(raw)
    assert trainer.step == 0
    params = dict(trainer.model.named_parameters())
    for name, value in base.named_parameters():
        assert torch.equal(params[name].detach(), value.detach()), name
    for name, param in params.items():
        if lora.is_adapter(name):
            fresh = lora.initial_value(name, tuple(param.shape), trainer.cfg.model, trainer.cfg.train.seed)
            assert torch.equal(param.detach(), fresh), name
    trainer.fit()
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("lora_section, key", [
    ({"rank": -1}, "finetune.lora.rank"),
    ({"alpha": 0}, "finetune.lora.alpha"),
    ({"dropout": 1.0}, "finetune.lora.dropout"),
    ({"dropout": -0.1}, "finetune.lora.dropout"),
    ({"targets": []}, "finetune.lora.targets"),
    ({"targets": ["wq", "q_proj"]}, "finetune.lora.targets"),
    ({"targets": ["wq", "wq"]}, "finetune.lora.targets"),
])
def test_bad_lora_values_are_one_line_errors(tmp_path, lora_section, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(lora_job(tmp_path, lora_section))
    assert one_line(str(e.value)).startswith(key)


def test_lora_on_moe_experts_is_refused(tmp_path):
    raw = lora_job(tmp_path, {"targets": ["wq", "w1"]}, model={"moe": {"n_experts": 4}})
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert "model.moe" in one_line(str(e.value))
