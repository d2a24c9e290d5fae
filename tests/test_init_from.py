"""`train.init_from`: a fresh run from a checkpoint's weights (imported or trained) at step 0, with
zero optimizer moments and its own LR schedule; a resume point of the run's own wins over it; a
foreign model or a bad path is refused in one line."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from angelptm.config import config_from_dict, load_config
from angelptm.errors import ConfigError, UserError
from angelptm.models.hf import import_hf
from angelptm.train import checkpoint as ckpt
from angelptm.train.schedule import lr_at
from angelptm.train.trainer import Trainer

from conftest import one_line, tiny_config as tiny

JOB = ["data.source=synthetic", "train.steps=3", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=16",
       "train.log_every=1", "train.ckpt_every=0", "train.sample_tokens=0", "optim.warmup_steps=2"]


@pytest.fixture
def trainers(one_thread):
    """Build Trainers in this process; the process group of one is torn down afterwards."""
    yield Trainer
    if dist.is_initialized():
        dist.destroy_process_group()


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def optimizer_moments(trainer: Trainer) -> list[torch.Tensor]:
    optim = trainer.optimizer.state_dict()["optim"]
    return [shard.flat for kind in ("exp_avg", "exp_avg_sq") for shard in optim[kind].values()]


def is_fresh(trainer: Trainer) -> bool:
    optim = trainer.optimizer.state_dict()["optim"]
    return optim["step"].item() == 0 and all(not m.any() for m in optimizer_moments(trainer))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A tiny random Qwen2 (q/k/v biases, tied embeddings) saved by transformers and imported."""
    root = tmp_path_factory.mktemp("hf")
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=96, vocab_size=300, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    model.save_pretrained(root / "hf")
    return import_hf(root / "hf", root / "imported")


def test_init_from_an_imported_model_starts_at_its_weights(tmp_path, trainers, imported):
    cfg = load_config(imported / "config.yaml", JOB + [f"train.init_from={imported}",
                                                      f"train.output_dir={tmp_path / 'run'}"])
    trainer = trainers(cfg)
    assert trainer.step == 0 and is_fresh(trainer)
    rows = trainer.host_rows(trainer.sampler, 0)  # step 1's microbatches, as the trainer will draw them

    hf = Qwen2ForCausalLM.from_pretrained(imported.parent / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        reference = sum(F.cross_entropy(hf(micro.inputs).logits.flatten(0, 1), micro.targets.flatten())
                        for micro in rows).item() / len(rows)

    trainer.fit()
    first = records(tmp_path / "run")[0]
    assert first["step"] == 1
    assert abs(first["loss"] - reference) < 1e-5, (first["loss"], reference)
    assert first["lr"] == lr_at(0, cfg.optim, cfg.train.steps)  # the run's own schedule, from its start


def trained(tmp_path: Path, trainers) -> Path:
    """A 3-step run's final checkpoint: weights, moments and a step counter of its own."""
    trainer = trainers(tiny(tmp_path / "first", train={"steps": 3}))
    trainer.fit()
    dist.destroy_process_group()
    return tmp_path / "first" / "checkpoints" / "step_3"


def test_init_from_a_training_checkpoint_takes_only_its_weights(tmp_path, trainers):
    source = trained(tmp_path, trainers)
    assert ckpt.read_train_state(source)["step"] == 3
    trainer = trainers(tiny(tmp_path / "second", train={"steps": 3, "init_from": str(source)}))
    assert trainer.step == 0 and is_fresh(trainer)  # the source's moments and step are not carried
    _, source_model = ckpt.load_model(source)
    ours = {name: p.detach() for name, p in trainer.model.named_parameters()}
    for name, value in source_model.named_parameters():
        assert torch.equal(ours[name], value), name

    trainer.fit()
    got = records(tmp_path / "second")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[0]["lr"] == lr_at(0, trainer.cfg.optim, 3)


def test_a_resume_point_in_the_output_dir_wins(tmp_path, trainers):
    source = trained(tmp_path, trainers)
    second = tiny(tmp_path / "second", train={"steps": 2, "init_from": str(source)})
    trainers(second).fit()
    dist.destroy_process_group()
    # The same job restarted with more steps continues its own run instead of starting over.
    again = trainers(tiny(tmp_path / "second", train={"steps": 4, "init_from": str(source)}))
    assert again.step == 2 and not is_fresh(again)


def test_init_from_another_model_is_refused_naming_the_key(tmp_path, trainers):
    source = trained(tmp_path, trainers)
    with pytest.raises(UserError) as excinfo:
        trainers(tiny(tmp_path / "other", model={"n_layers": 3}, train={"init_from": str(source)}))
    message = one_line(str(excinfo.value))
    assert "model.n_layers=2" in message and "train.init_from" in message
    assert not (tmp_path / "other").exists()


def test_init_from_a_missing_folder_is_refused(tmp_path, trainers):
    with pytest.raises(UserError) as excinfo:
        trainers(tiny(tmp_path / "run", train={"init_from": str(tmp_path / "nowhere")}))
    message = one_line(str(excinfo.value))
    assert "train.init_from" in message and "nowhere" in message
    assert not (tmp_path / "run").exists()


def test_empty_init_from_is_a_config_error():
    with pytest.raises(ConfigError, match="train.init_from"):
        config_from_dict({"train": {"init_from": ""}})
