"""The `angelptm` command in a subprocess: train then generate end to end, bad input that exits 2 with
one line and writes nothing, and a Hugging Face import/export round trip."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, start_cli, tiny_sections

BAD_INPUTS = {
    "missing-config": (["{tmp}/nope.yaml"], ["nope.yaml", "does not exist"]),
    "malformed-yaml": (["{tmp}/broken.yaml"], ["broken.yaml", "YAML", "line"]),
    "unknown-key": (["{tmp}/run.yaml", "--set", "model.dimm=64"], ["model.dimm", "did you mean model.dim?"]),
    "wrong-type": (["{tmp}/run.yaml", "--set", "train.steps=many"], ["train.steps", "integer"]),
    "data-path-missing": (["{tmp}/run.yaml", "--set", "data.source=text", "--set", "data.path=/nope"],
                          ["data.path=/nope", "does not exist"]),
}


def check_refused(result: subprocess.CompletedProcess, must_contain=()) -> str:
    """Exit status 2, exactly one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for text in must_contain:
        assert text in lines[0], lines[0]
    return lines[0]


def write_config(path: Path, output_dir: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_sections(output_dir, **sections)))
    return path


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    config = write_config(tmp / "run.yaml", out, train={"steps": 12, "ckpt_every": 6, "sample_tokens": 8})
    result = run_cli("train", config)
    return out, result


@pytest.mark.slow
def test_train_writes_metrics_checkpoints_and_prints_a_sample(trained_run):
    out, result = trained_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_12", "step_6"]
    assert "--- sample from" in result.stdout


def test_generate_greedy_is_deterministic(trained_run):
    out, _ = trained_run
    args = ["--prompt", "the ", "--max-new-tokens", "16", "--temperature", "0"]
    first = run_cli("generate", out, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("generate", out / "checkpoints" / "step_12", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    header, text = first.stdout.split("\n", 1)
    assert "step_12" in header  # a run folder means its newest checkpoint
    assert text.startswith("the ") and len(text.rstrip("\n")) > len("the ")
    assert second.stdout == first.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, nothing written


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """Every bad invocation, launched at once (they spend their time importing torch)."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "broken.yaml").write_text("model:\n  dim: 64\n  n_heads: [4\ntrain:\n  steps: 3\n")
    write_config(tmp / "run.yaml", tmp / "unused")  # each case sets its own train.output_dir
    results = {}
    for name, (args, _) in BAD_INPUTS.items():
        out = tmp / f"out_{name}"
        argv = [a.format(tmp=tmp) for a in args] + ["--set", f"train.output_dir={out}"]
        results[name] = (start_cli("train", *argv), out)
    finished = {}
    for name, (proc, out) in results.items():
        stdout, stderr = proc.communicate(timeout=300)
        finished[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return finished


@pytest.mark.slow  # the first case waits for all of them
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(bad_input_results, case):
    result, out = bad_input_results[case]
    check_refused(result, BAD_INPUTS[case][1])
    assert not out.exists()


def test_resume_from_a_corrupt_checkpoint_exits_2(trained_run, tmp_path):
    out, _ = trained_run
    step = tmp_path / "step_12"
    shutil.copytree(out / "checkpoints" / "step_12", step)
    shard = sorted((step / "state").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    new_out = tmp_path / "new_run"
    config = write_config(tmp_path / "run.yaml", new_out)
    result = run_cli("train", config, "--set", f"train.resume={step}")
    check_refused(result, [str(step), "corrupt"])
    assert not new_out.exists()


def test_generate_from_a_missing_checkpoint_exits_2(tmp_path):
    check_refused(run_cli("generate", tmp_path / "nope", "--prompt", "x"), ["nope", "does not exist"])


def test_generate_from_a_run_without_checkpoints_says_so(tmp_path, capsys):
    from angelptm.cli import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    line = check_refused(subprocess.CompletedProcess([], 2, "", capsys.readouterr().err))
    assert "no checkpoint" in line.lower() and "delete" not in line


# ---------------------------------------------------------------------------------------------
# Hugging Face round trip


@pytest.mark.slow
def test_import_hf_then_export_hf_gives_back_the_same_model(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=259, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    imported = run_cli("import-hf", tmp_path / "hf", tmp_path / "ckpt")
    assert imported.returncode == 0, imported.stderr[-3000:]
    exported = run_cli("export-hf", tmp_path / "ckpt", tmp_path / "hf2")
    assert exported.returncode == 0, exported.stderr[-3000:]

    source, back = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert back.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(back[name], tensor), name
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings"):
        assert getattr(LlamaConfig.from_pretrained(tmp_path / "hf2"), key) == getattr(config, key), key
