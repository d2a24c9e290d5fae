"""Inputs that crashed, hung or were accepted silently: each now exits 2 with one line naming the
key and the fix and writes nothing, or warns; the memory preflight's verdicts and advice; and
ZeROCache at any zero.prefetch_pages (a window past the last page used to crash with accumulation)."""

import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from angelptm.config import config_from_dict, load_config
from angelptm.errors import ConfigError, UserError
from angelptm.train import preflight
from angelptm.train.preflight import check_run

from conftest import one_line, start_cli, tiny_config, tiny_sections

# name -> (--set overrides, texts the one error line must contain); {tmp} is the test's folder.
REFUSED = {
    "dim-overflows-a-tensor": (["model.dim=1e12"], ["model.dim=1000000000000", "lower model.dim"]),
    "vocab-does-not-fit": (["model.vocab_size=1e11"], ["GiB", "RAM", "lower model.vocab_size"]),
    "layers-do-not-fit": (["model.n_layers=10000000"], ["GiB", "RAM", "lower model.n_layers"]),
    "too-many-microbatches": (["train.global_batch=1099511627776"], ["train.global_batch", "microbatches"]),
    "microbatch-does-not-fit": (["train.global_batch=1099511627776", "train.micro_batch=1099511627776"],
                                ["activations", "lower train.micro_batch"]),
    "sample-index-overflows": (["train.steps=1099511627776", "train.global_batch=1099511627776",
                                "train.micro_batch=1099511627776"], ["train.steps × train.global_batch"]),
    "page-below-one-shard": (["zero.page_mb=1e-9"], ["zero.page_mb", "at least 0.00390625"]),
    "nvme-parent-missing": (["zero.offload_optimizer=nvme", "zero.nvme_dir={tmp}/missing/nvme"],
                            ["zero.nvme_dir", "parent folder {tmp}/missing does not exist"]),
    "amax-history-absurd": (["precision.fp8.enabled=true", "precision.fp8.recipe=delayed",
                             "precision.fp8.amax_history=10000000000"], ["precision.fp8.amax_history"]),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every refused input, and one run that only warns, launched at once (each pays torch's import)."""
    procs = {}
    for name, (overrides, _) in REFUSED.items():
        tmp = tmp_path_factory.mktemp(name)
        sets = [arg for o in overrides for arg in ("--set", o.format(tmp=tmp))]
        procs[name] = (start_cli("train", "--set", f"train.output_dir={tmp}/out", *sets), tmp)
    tmp = tmp_path_factory.mktemp("warns")
    sets = [f"--set={k}.{key}={v}" for k, section in tiny_sections(tmp / "out", train={"steps": 2}).items()
            for key, v in section.items()]
    procs["warns"] = (start_cli("train", *sets, "--set=zero.nvme_dir=/tmp"), tmp)
    results = {}
    for name, (proc, tmp) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stderr, tmp)
    return results


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_one_line_and_nothing_written(cli_results, name):
    returncode, stderr, tmp = cli_results[name]
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("angelptm: error: ")
    for text in REFUSED[name][1]:
        assert text.format(tmp=tmp) in lines[0], lines[0]
    assert not (tmp / "out").exists(), "a refused run wrote to its output folder"
    assert not (tmp / "missing").exists(), "a refused run created the NVMe folder's parent"


def test_warmup_longer_than_the_run_and_an_unused_nvme_dir_warn(cli_results):
    returncode, stderr, tmp = cli_results["warns"]
    assert returncode == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, stderr[-3000:]
    assert "optim.warmup_steps=5 exceeds train.steps=2" in warnings[0]
    assert "zero.nvme_dir=/tmp is unused" in warnings[1]
    assert (tmp / "out" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Config values and the preflight, in process


def test_integers_in_scientific_notation_are_read_exactly():
    assert config_from_dict({}, ["train.steps=1e3", "train.global_batch=8e0"]).train.steps == 1000
    with pytest.raises(ConfigError, match="train.steps='1.5e0' must be an integer"):
        config_from_dict({}, ["train.steps=1.5e0"])
    with pytest.raises(ConfigError, match="train.steps='1e99999999' must be an integer"):
        config_from_dict({}, ["train.steps=1e99999999"])  # not a 100-million-digit int


def test_preflight_passes_the_demo_and_the_tiny_model(tmp_path):
    assert check_run(load_config()) == []
    assert check_run(tiny_config(tmp_path / "out", optim={"warmup_steps": 2})) == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model,train,knob", [
    ({"n_layers": 4000}, {}, "lower model.n_layers=4000 or model.dim=64"),
    ({"vocab_size": 10_000_000}, {}, "lower model.vocab_size=10000000 or model.dim=64"),
    ({"dim": 16384, "n_heads": 128, "n_kv_heads": 128, "ffn_dim": 128}, {}, "lower model.dim=16384"),
    ({"ffn_dim": 1_000_000}, {}, "lower model.ffn_dim=1000000 or model.dim=64"),
    ({}, {"micro_batch": 100_000, "global_batch": 100_000}, "lower train.micro_batch=100000"),
])
def test_preflight_names_what_to_lower(tmp_path, monkeypatch, model, train, knob):
    monkeypatch.setattr(preflight, "host_memory_bytes", lambda: 2**30)
    cfg = tiny_config(tmp_path, model=model, train=train)
    with pytest.raises(ConfigError) as e:
        check_run(cfg)
    message = one_line(str(e.value))
    assert "the planner estimates" in message and "1 GiB of RAM" in message
    assert knob in message, message


def test_preflight_counts_every_rank_on_the_host(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, model={"n_layers": 100})  # ~80 MB per rank
    monkeypatch.setattr(preflight, "host_memory_bytes", lambda: 2**30)
    check_run(cfg)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    with pytest.raises(ConfigError, match="× 64 ranks on this host"):
        check_run(cfg)


def test_preflight_holds_the_device_tier_against_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_on_gpu", lambda cfg: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=2**29))
    # 44M parameters: 16 bytes each (0.66 GiB) with AdamW on the GPU, 8 with it offloaded to the host.
    sections = dict(model={"n_layers": 1200}, train={"micro_batch": 1, "seq_len": 8})
    with pytest.raises(ConfigError) as e:
        check_run(tiny_config(tmp_path, **sections))
    message = one_line(str(e.value))
    assert "0.5 GiB of GPU 0" in message and "zero.offload_optimizer=cpu" in message, message
    check_run(tiny_config(tmp_path, **sections, zero={"offload_optimizer": "cpu"}))


def test_nvme_file_makes_one_folder_at_most(tmp_path):
    from angelptm.zerocache.tiers import NvmeFile

    with pytest.raises(UserError, match=f"parent folder {tmp_path}/missing does not exist"):
        NvmeFile(str(tmp_path / "missing" / "nvme"), 4096)
    assert not (tmp_path / "missing").exists()
    NvmeFile(str(tmp_path / "nvme"), 4096).close()
    assert (tmp_path / "nvme").is_dir()


# ---------------------------------------------------------------------------------------------
# ZeROCache: a prefetch window past the last page


def _fit(cfg) -> list[dict]:
    import json

    from angelptm.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg).fit()
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
    lines = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in ("step", "loss", "grad_norm")} for line in lines]


@pytest.mark.parametrize("stage", [2, 3])
def test_any_prefetch_window_trains_like_the_default(tmp_path, stage):
    """With gradient accumulation, a reduction window (max(2, prefetch_pages)) holding every page
    left each page's previous reduction in flight when the next backward reduced it again:
    `'NoneType' object has no attribute 'wait'` at prefetch_pages >= 7 here (the trainer's 7 pages)."""
    runs = {}
    for prefetch in (2, 8, 20) if stage == 3 else (2, 8):
        runs[prefetch] = _fit(tiny_config(tmp_path / f"p{prefetch}", train={"steps": 3, "micro_batch": 2},
                                          zero={"stage": stage, "prefetch_pages": prefetch}))
    assert [r["step"] for r in runs[2]] == [1, 2, 3]
    for prefetch, records in runs.items():
        assert records == runs[2], prefetch  # the same sums in the same order: bit for bit


def test_planner_and_placement_clamp_the_window_to_the_pages():
    from angelptm.models.llama import build_llama
    from angelptm.planning.layout import layout_from_config
    from angelptm.planning.model import ANGELPTM, model_shape
    from angelptm.planning.zero import zero_bytes
    from angelptm.zerocache.pages import build_pages, find_units
    from angelptm.zerocache.placement import plan_placement

    fixed = {}
    for prefetch in (4, 5, 20, 1000):
        cfg = tiny_config("unused", zero={"stage": 3, "prefetch_pages": prefetch})
        model = build_llama(cfg.model, device="meta")
        units = find_units(model)
        pages = build_pages(model, units, cfg.zero.page_mb, 1)
        placement = plan_placement(pages, units, 3, 1, offload_optimizer="none", offload_params="none",
                                   device_budget_gb=None, prefetch_pages=prefetch, max_in_flight=max(2, prefetch))
        lay, _ = layout_from_config(cfg, 1)
        z = zero_bytes(model_shape(cfg.model), lay, cfg, ANGELPTM, cfg.model.n_layers, "first")
        assert z.params_device + z.grads + z.in_flight == placement.fixed_device_bytes
        fixed[prefetch] = placement.fixed_device_bytes
    assert len(pages) == 5 and fixed[4] < fixed[5] == fixed[20] == fixed[1000]
