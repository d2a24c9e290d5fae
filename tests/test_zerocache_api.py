"""The ZeROCacheOptimizer API in one process: config, LR schedulers, bad input, bf16 master weights."""

import pytest
import torch
import torch.distributed as dist

from angelptm.errors import UserError
from angelptm.zerocache import ZeROCacheOptimizer
from conftest import one_line, tiny_config
from test_zerocache_support import HYPER, SMALL_PAGES, batches, loss_of, tiny_model


@pytest.fixture
def group_of_one(one_thread):
    """The optimizer joins (or makes) a process group of one; tear it down after the test."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_from_config_schedulers_and_metrics(group_of_one, tmp_path):
    cfg = tiny_config(tmp_path, zero={"stage": 2, "offload_optimizer": "cpu", "page_mb": SMALL_PAGES})
    model = tiny_model()
    opt = ZeROCacheOptimizer.from_config(model, None, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    for rows in batches(3, 4):
        loss_of(model, rows).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([cfg.optim.lr / 4] * 2)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    assert set(opt.memory_metrics()) == {"mem_device_gb", "mem_host_gb", "mem_nvme_gb"}
    assert opt.memory_metrics()["mem_host_gb"] > 0  # the optimizer state lives there
    assert all(p.grad is None for p in model.parameters())  # gradients live in the pages


@pytest.mark.parametrize("layout, key", [
    (dict(stage=4), "zero.stage"),
    (dict(stage=2, offload_params="cpu"), "zero.offload_params"),
    (dict(stage=3, offload_params="nvme"), "zero.offload_params"),
    (dict(offload_optimizer="nvme"), "zero.nvme_dir"),
    (dict(offload_optimizer="disk"), "zero.offload_optimizer"),
    (dict(page_mb=0), "zero.page_mb"),
])
def test_bad_layouts_are_one_line_user_errors(group_of_one, layout, key):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UserError) as error:
        ZeROCacheOptimizer(model, None, **layout)
    assert key in one_line(str(error.value))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("stage, offload", [(0, "none"), (3, "cpu")])
def test_bf16_parameters_keep_an_fp32_master(group_of_one, stage, offload):
    """bf16 parameters: the update runs on an fp32 master copy, exactly as torch's fused AdamW on
    fp32 masters of the same bf16 gradients would, and the parameters are its bf16 rounding."""
    model = tiny_model(torch.bfloat16)
    reference = tiny_model(torch.bfloat16)
    masters = [p.detach().float().requires_grad_() for p in reference.parameters()]
    groups = [{"params": [m for m in masters if m.ndim >= 2]},
              {"params": [m for m in masters if m.ndim < 2], "weight_decay": 0.0}]
    reference_opt = torch.optim.AdamW(groups, **HYPER, fused=True)
    opt = ZeROCacheOptimizer(model, None, **HYPER, stage=stage, page_mb=SMALL_PAGES, offload_optimizer=offload)
    for rows in batches(4, 4):
        loss_of(model, rows).backward()
        opt.step()
        opt.zero_grad()
        loss_of(reference, rows).backward()
        for master, p in zip(masters, reference.parameters()):
            master.grad = p.grad.float()
            p.grad = None
        reference_opt.step()
        with torch.no_grad():
            for master, p in zip(masters, reference.parameters()):
                p.copy_(master)
    with opt.gathered_parameters():
        for (name, p), expected in zip(model.named_parameters(), reference.parameters()):
            assert p.dtype == torch.bfloat16
            assert torch.equal(p, expected), name
