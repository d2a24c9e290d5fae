"""Validation: held-out documents stay out of training, and the validation loss is the same under every layout."""

import json
import math

import numpy as np
import pytest

from angelptm.config import DataConfig, config_from_dict
from angelptm.data import ByteTokenizer, build_datasets, build_sampler, build_token_file
from angelptm.distributed.parity import TINY_JOB, run_layout, run_layouts
from angelptm.errors import ConfigError, UserError

from conftest import one_line, tiny_config

DOCS = 40


@pytest.fixture
def lettered(tmp_path):
    """A token file of 40 documents, document i made of byte 65 + i alone (between BOS and EOS)."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(DOCS):
        (folder / f"{i:02d}.txt").write_bytes(bytes([65 + i]) * (50 + 7 * i))
    build_token_file(folder, tmp_path / "lettered", ByteTokenizer())
    return str(tmp_path / "lettered")


def letters(rows) -> set:
    return set(np.unique(rows.numpy())) - {ByteTokenizer.bos_id, ByteTokenizer.eos_id}


def test_held_out_documents_never_appear_in_training_windows(lettered):
    cfg = DataConfig(source="tokens", path=lettered, valid_fraction=0.25)
    train, valid = build_datasets(cfg, 16, 259)
    sampler, valid_sampler = build_sampler(train, 16, 8, seed=0), build_sampler(valid, 16, 8, seed=0)
    epoch = (len(train) - 1) // 16 // 8 + 1
    seen = set().union(*(letters(sampler.batch(step)) for step in range(2 * epoch)))
    held = set().union(*(letters(valid_sampler.batch(step)) for step in range(8)))
    assert len(held) == 10 and len(seen) == DOCS - 10 and not seen & held
    # The split depends on the documents alone: another seed trains in another order on the same split.
    other = build_sampler(build_datasets(DataConfig(source="tokens", path=lettered, valid_fraction=0.25, seed=5),
                                         16, 259)[1], 16, 8, seed=5)
    assert set().union(*(letters(other.batch(step)) for step in range(8))) == held


def test_val_loss_is_the_same_under_every_layout(lettered):
    job = json.loads(json.dumps(TINY_JOB))
    job["data"] = {"source": "tokens", "path": lettered, "valid_fraction": 0.25}
    job["train"].update(steps=2, eval_every=1, eval_batches=2)
    reference = run_layout(job=job)
    layouts = [{"dp": 2}, {"tp": 2}, {"pp": 2}, {"pp": 2, "pp_schedule": "interleaved", "pp_virtual_stages": 2},
               {"pp": 2, "pp_schedule": "zero_bubble"}, {"cp": 2}]
    assert len(reference.val_losses) == 2 and all(math.isfinite(v) for v in reference.val_losses)
    for layout, run in zip(layouts, run_layouts(layouts, 2, job)):
        for ours, ref in zip(run.val_losses, reference.val_losses, strict=True):
            assert abs(ours - ref) / ref < 1e-6, layout


def test_val_loss_and_ppl_are_logged_at_the_eval_steps(tmp_path, lettered, one_thread, capsys, own_process_group):
    from angelptm.train.trainer import Trainer

    data = {"source": "synthetic", "valid": lettered}
    Trainer(tiny_config(tmp_path / "run", data=data, train={"steps": 4, "eval_every": 2, "eval_batches": 1})).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"])) for r in evaluated)
    assert "val loss" in capsys.readouterr().err


@pytest.mark.parametrize("data, train, key", [
    ({"valid_fraction": 1.0}, {}, "data.valid_fraction"),
    ({"valid_fraction": -0.1}, {}, "data.valid_fraction"),
    ({"valid": "x", "valid_fraction": 0.1}, {}, "data.valid"),
    ({}, {"eval_every": 5}, "train.eval_every"),
    ({"valid": "x"}, {"eval_batches": 0}, "train.eval_batches"),
    ({"valid": []}, {}, "data.valid"),
])
def test_bad_validation_settings_are_one_line_errors(data, train, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": data, "train": train})
    assert key in one_line(str(e.value))


def test_validation_data_that_cannot_be_used_is_refused(tmp_path, lettered):
    with pytest.raises(UserError) as e:
        build_datasets(DataConfig(source="synthetic", valid_fraction=0.1), 16, 259)  # one document
    assert "data.valid_fraction" in one_line(str(e.value))
    with pytest.raises(UserError) as e:
        build_datasets(DataConfig(source="synthetic", valid=str(tmp_path / "nowhere")), 16, 259)
    assert "data.valid=" in one_line(str(e.value))
