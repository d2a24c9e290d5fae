"""Hugging Face interop: imported and exported models compute transformers' logits, and bad input is refused.

Models are built from a LlamaConfig with random weights; nothing is downloaded. Every weight,
norms included, is random so that a swapped or misnamed tensor changes the logits.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from angelptm.config import config_from_dict
from angelptm.errors import UserError
from angelptm.models.hf import config_from_hf, export_hf, hf_config_from, import_hf
from angelptm.models.llama import build_llama
from angelptm.train.checkpoint import load_model, save_model_checkpoint

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=259, max_seq_len=128,
            rope_theta=5000.0, norm_eps=1e-5)
TOKENS = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter; norm weights near one so activations stay in range."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        param.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)


def save_hf_model(folder: Path, tie: bool, dtype: torch.dtype = torch.float32) -> Path:
    config = LlamaConfig(
        hidden_size=TINY["dim"], num_hidden_layers=TINY["n_layers"], num_attention_heads=TINY["n_heads"],
        num_key_value_heads=TINY["n_kv_heads"], intermediate_size=TINY["ffn_dim"], vocab_size=TINY["vocab_size"],
        max_position_embeddings=TINY["max_seq_len"], rope_theta=TINY["rope_theta"], rms_norm_eps=TINY["norm_eps"],
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config)
    randomize(model, seed=1)
    model.to(dtype).save_pretrained(folder)
    return folder


def transformers_logits(folder: Path) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(TOKENS).logits


def save_angelptm_model(folder: Path, tie: bool) -> torch.nn.Module:
    cfg = config_from_dict({"model": dict(TINY, tie_embeddings=tie), "train": {"seq_len": 64}})
    model = build_llama(cfg.model, "cpu")
    randomize(model, seed=2)
    save_model_checkpoint(folder, cfg, model.state_dict())
    return model


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("hf") / "model", tie=False)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_imported_model_matches_transformers(tmp_path, tie):
    hf_dir = save_hf_model(tmp_path / "hf", tie)
    import_hf(hf_dir, tmp_path / "ckpt")
    cfg, model = load_model(tmp_path / "ckpt")
    assert (cfg.model.n_kv_heads, cfg.model.rope_theta, cfg.model.tie_embeddings) == (2, 5000.0, tie)
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    with torch.no_grad():
        ours = model(TOKENS)
    assert relative_error(ours, transformers_logits(hf_dir)) < 1e-5


@pytest.mark.parametrize(
    "tie, max_shard_bytes", [(False, None), (True, None), (False, 40_000)], ids=["untied", "tied", "sharded"]
)
def test_exported_model_matches_angelptm(tmp_path, tie, max_shard_bytes):
    model = save_angelptm_model(tmp_path / "ckpt", tie)
    limit = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", **limit)
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_bytes is not None)
    assert sharded != (out / "model.safetensors").is_file()
    with torch.no_grad():
        ours = model(TOKENS)
    assert relative_error(transformers_logits(out), ours) < 1e-5


def test_a_trained_tied_model_exports(tmp_path, one_thread, own_process_group):
    """A trainer's checkpoint stores a tied head once, under the embedding's name: export-hf still writes it."""
    from conftest import tiny_config

    from angelptm.train.trainer import Trainer

    cfg = tiny_config(tmp_path / "run", model={"tie_embeddings": True}, train={"steps": 1})
    Trainer(cfg).fit()
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    _, model = load_model(tmp_path / "run")
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(out).eval()(TOKENS).logits
        assert relative_error(theirs, model(TOKENS)) < 1e-5


def test_sharded_export_imports_back_exactly(tmp_path):
    model = save_angelptm_model(tmp_path / "ckpt", tie=False)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=40_000)
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    import_hf(tmp_path / "hf", tmp_path / "back")
    _, back = load_model(tmp_path / "back")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bfloat16_weights_stay_bfloat16(tmp_path):
    hf_dir = save_hf_model(tmp_path / "hf", tie=True, dtype=torch.bfloat16)
    import_hf(hf_dir, tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    source, exported = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name


def test_config_round_trip():
    cfg = config_from_dict({"model": dict(TINY, tie_embeddings=True), "train": {"seq_len": 64}}).model
    assert config_from_hf(hf_config_from(cfg)) == cfg


def test_transformers_5_rope_parameters_are_read(hf_model):
    raw = json.loads((hf_model / "config.json").read_text())
    assert "rope_parameters" in raw  # the form transformers 5 writes
    assert config_from_hf(raw).rope_theta == 5000.0
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"} | {"rope_theta": 123.0}
    assert config_from_hf(legacy).rope_theta == 123.0


def edit_config(**changes):
    def edit(folder: Path) -> None:
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(raw | changes))
    return edit


def drop_tensor(folder: Path) -> None:
    path = folder / "model.safetensors"
    weights = load_file(path)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path)


def add_bias_tensor(folder: Path) -> None:
    path = folder / "model.safetensors"
    weights = load_file(path) | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    save_file(weights, path)


BAD_HF_FOLDERS = {
    "missing folder": (lambda folder: shutil.rmtree(folder), "does not exist"),
    "no config.json": (lambda folder: (folder / "config.json").unlink(), "config.json"),
    "unreadable config.json": (lambda folder: (folder / "config.json").write_text("{"), "not readable JSON"),
    "rope_scaling": (edit_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    "scaled rope_parameters": (
        edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_type=llama3"
    ),
    "attention_bias": (edit_config(attention_bias=True), "attention_bias"),
    "mlp_bias": (edit_config(mlp_bias=True), "mlp_bias"),
    "other architecture": (edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type=gpt2"),
    "weights of another head_dim": (edit_config(head_dim=32), "q_proj.weight has shape"),
    "missing tensor": (drop_tensor, "model.layers.1.mlp.up_proj.weight"),
    "extra tensor": (add_bias_tensor, "q_proj.bias"),
    "no safetensors": (lambda folder: (folder / "model.safetensors").unlink(), "safetensors"),
    "truncated safetensors": (
        lambda folder: (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:999]),
        "safetensors",
    ),
}


@pytest.mark.parametrize("case", list(BAD_HF_FOLDERS))
def test_bad_hf_folder_is_refused_and_writes_nothing(tmp_path, hf_model, case):
    spoil, expected = BAD_HF_FOLDERS[case]
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_model, hf_dir)
    spoil(hf_dir)
    with pytest.raises(UserError) as excinfo:
        import_hf(hf_dir, tmp_path / "out")
    message = str(excinfo.value)
    assert "\n" not in message and expected in message
    assert sorted(p.name for p in tmp_path.iterdir()) == (["hf"] if hf_dir.exists() else [])


def test_import_refuses_a_non_empty_output_folder(tmp_path, hf_model):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        import_hf(hf_model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_export_refuses_bad_checkpoints_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export_hf(tmp_path / "nowhere", tmp_path / "out")
    save_angelptm_model(tmp_path / "ckpt", tie=False)
    shard = next((tmp_path / "ckpt" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(UserError, match="corrupt") as excinfo:
        export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert "\n" not in str(excinfo.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_exported_safetensors_declare_pytorch(tmp_path):
    save_angelptm_model(tmp_path / "ckpt", tie=False)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
