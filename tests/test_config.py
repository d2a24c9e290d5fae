"""Config: defaults, YAML files, `--set` overrides with type coercion, one-line errors, save/load round trip."""

import dataclasses

import pytest

from angelptm.config import Config, config_from_dict, load_config, parse_override, save_config, validate
from angelptm.errors import ConfigError, UserError

from conftest import REPO, one_line


def config_error(*, raw=None, overrides=(), path=None) -> str:
    """The one-line ConfigError message that loading this input gives."""
    with pytest.raises(ConfigError) as excinfo:
        if path is not None:
            load_config(path, list(overrides))
        else:
            config_from_dict(raw or {}, list(overrides))
    return one_line(str(excinfo.value))


# ---------------------------------------------------------------------------------------------
# Defaults and files


def test_defaults_load_validate_and_match_the_demo_preset():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert validate(Config()) == cfg
    assert cfg.train.global_batch % cfg.train.micro_batch == 0
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    assert cfg.model.n_heads % cfg.model.n_kv_heads == 0
    # configs/demo.yaml spells out the embedded defaults.
    assert load_config(REPO / "configs" / "demo.yaml") == cfg


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == load_config()


def test_yaml_file_sets_nested_keys_and_coerces_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  dim: 128\n  n_heads: 4\n  n_kv_heads: null\n  ffn_dim: null\n"
        "optim:\n  lr: 1e-3\n  betas: [0.8, 0.99]\n"
        "precision:\n  fp8:\n    enabled: true\n    recipe: rowwise\n"
        "train:\n  steps: 50\n  output_dir: /tmp/somewhere\n"
    )
    cfg = load_config(path)
    assert cfg.model.dim == 128 and cfg.model.n_heads == 4
    assert cfg.model.n_kv_heads == 4  # null: one kv head per query head
    assert cfg.model.ffn_dim == 384  # null: 8/3 · dim rounded up to a multiple of 64
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.optim.betas == [0.8, 0.99]
    assert cfg.precision.fp8.enabled is True and cfg.precision.fp8.recipe == "rowwise"
    assert cfg.train.steps == 50 and cfg.train.output_dir == "/tmp/somewhere"
    assert cfg.train.micro_batch == Config().train.micro_batch  # untouched keys keep their defaults


def test_overrides_win_over_the_file_and_later_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 50\n  seed: 3\n")
    cfg = load_config(path, ["train.steps=7", "train.steps=9"])
    assert (cfg.train.steps, cfg.train.seed) == (9, 3)


# ---------------------------------------------------------------------------------------------
# --set overrides and type coercion


@pytest.mark.parametrize(
    "override, read, expected",
    [
        ("train.steps=100", lambda c: c.train.steps, 100),
        ("optim.lr=1e-3", lambda c: c.optim.lr, 1e-3),
        ("optim.lr=0.0005", lambda c: c.optim.lr, 5e-4),
        ("optim.lr=1", lambda c: c.optim.lr, 1.0),
        ("optim.min_lr=0", lambda c: c.optim.min_lr, 0.0),
        ("model.tie_embeddings=true", lambda c: c.model.tie_embeddings, True),
        ("model.tie_embeddings=False", lambda c: c.model.tie_embeddings, False),
        ("train.deterministic=yes", lambda c: c.train.deterministic, True),  # YAML 1.1 boolean
        ("optim.betas=[0.8, 0.9]", lambda c: c.optim.betas, [0.8, 0.9]),
        ("precision.fp8.skip=[output]", lambda c: c.precision.fp8.skip, ["output"]),
        ("precision.fp8.skip=[]", lambda c: c.precision.fp8.skip, []),
        ("precision.fp8.enabled=true", lambda c: c.precision.fp8.enabled, True),
        ("optim.grad_clip=null", lambda c: c.optim.grad_clip, None),
        ("zero.device_budget_gb=2", lambda c: c.zero.device_budget_gb, 2.0),
        ("parallel.dp=2", lambda c: c.parallel.dp, 2),
        ("parallel.dp=auto", lambda c: c.parallel.dp, "auto"),
        ("train.output_dir=123", lambda c: c.train.output_dir, "123"),
        ("train.sample_prompt=a=b", lambda c: c.train.sample_prompt, "a=b"),
        ("train.resume=/some/run/checkpoints/step_4", lambda c: c.train.resume, "/some/run/checkpoints/step_4"),
        ("model.n_kv_heads=null", lambda c: c.model.n_kv_heads, Config().model.n_heads),
    ],
)
def test_override_is_coerced_to_the_key_type(override, read, expected):
    value = read(load_config(overrides=[override]))
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["2024-01-01", "007", "1_000", "yes"])
def test_string_key_keeps_the_override_text_verbatim(text):
    assert load_config(overrides=[f"train.output_dir={text}"]).train.output_dir == text


def test_parse_override_splits_the_dotted_key_and_reads_the_value_as_yaml():
    def split(text):
        path, value = parse_override(text)
        return path, value.parsed

    assert split("precision.fp8.amax_history=32") == (["precision", "fp8", "amax_history"], 32)
    assert split("optim.betas=[0.9, 0.95]") == (["optim", "betas"], [0.9, 0.95])
    assert split("zero.nvme_dir=") == (["zero", "nvme_dir"], None)
    assert parse_override("train.output_dir=2024-01-01")[1].text == "2024-01-01"


def test_override_into_an_empty_yaml_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  # dim: 64\ntrain:\n  steps: 5\n")  # every key of model: commented out
    assert load_config(path, ["model.dim=128"]).model.dim == 128


def test_override_does_not_modify_the_callers_dict():
    raw = {"train": {"steps": 5}}
    config_from_dict(raw, ["train.steps=6", "model.dim=128"])
    assert raw == {"train": {"steps": 5}}


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the dotted key and the fix


def test_config_error_is_a_user_error_with_exit_status_2():
    assert issubclass(ConfigError, UserError) and ConfigError.exit_code == 2


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("modle.dim=64", ["modle", "did you mean model?"]),
        ("model.dimm=64", ["model.dimm", "did you mean model.dim?"]),
        ("precision.fp8.enabeld=true", ["precision.fp8.enabeld", "did you mean precision.fp8.enabled?"]),
        ("train.xyzzy=1", ["train.xyzzy", "known keys", "steps"]),  # nothing close: list what exists
    ],
)
def test_unknown_key_names_it_and_suggests_the_closest(override, must_contain):
    message = config_error(overrides=[override])
    for text in must_contain:
        assert text in message


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optim:\n  weight_decy: 0.1\n")
    message = config_error(path=path)
    assert "optim.weight_decy" in message and "did you mean optim.weight_decay?" in message


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("train.steps=many", ["train.steps", "integer"]),
        ("train.steps=1.5", ["train.steps", "integer"]),
        ("train.steps=true", ["train.steps", "integer"]),
        ("optim.lr=fast", ["optim.lr", "number"]),
        ("optim.lr=true", ["optim.lr", "number"]),
        ("model.tie_embeddings=maybe", ["model.tie_embeddings", "true or false"]),
        ("optim.betas=0.9", ["optim.betas", "list"]),
        ("optim.betas=[0.9, high]", ["optim.betas[1]", "number"]),
        ("data.source=wikipedia", ["data.source", "stdlib", "synthetic"]),
        ("train.activation_checkpointing=ful", ["train.activation_checkpointing", "did you mean full?"]),
        ("parallel.dp=two", ["parallel.dp", "integer", "auto"]),
        ("train.steps=[1, 2]", ["train.steps", "integer"]),
        ("model=64", ["model", "mapping"]),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(override, must_contain):
    message = config_error(overrides=[override])
    for text in must_contain:
        assert text in message, message


@pytest.mark.parametrize(
    "overrides, must_contain",
    [
        (["train.steps=0"], ["train.steps=0", "positive"]),
        (["optim.lr=-0.1"], ["optim.lr", "positive"]),
        (["optim.lr=.nan"], ["optim.lr"]),
        (["optim.lr=1e-3", "optim.min_lr=1e-2"], ["optim.min_lr", "optim.lr"]),
        (["optim.betas=[0.9, 1.0]"], ["optim.betas", "[0, 1)"]),
        (["optim.betas=[0.9]"], ["optim.betas", "two"]),
        (["optim.weight_decay=-1"], ["optim.weight_decay", ">= 0"]),
        (["optim.warmup_steps=-1"], ["optim.warmup_steps", ">= 0"]),
        (["zero.stage=4"], ["zero.stage", "0, 1, 2 or 3"]),
        (["zero.offload_params=cpu"], ["zero.offload_params", "zero.stage=3"]),
        (["zero.offload_optimizer=nvme"], ["zero.nvme_dir"]),
        (["train.keep_checkpoints=0"], ["train.keep_checkpoints", ">= 1"]),
        (["train.ckpt_every=-1"], ["train.ckpt_every", ">= 0"]),
        (["train.seq_len=512"], ["train.seq_len", "model.max_seq_len"]),
        (["model.dim=100"], ["model.dim", "model.n_heads"]),
        (["model.n_kv_heads=3"], ["model.n_kv_heads", "n_heads"]),
        (["model.n_kv_heads=0"], ["model.n_kv_heads", "positive"]),
        (["model.dim=24", "model.n_heads=8"], ["rotary", "even"]),
        (["parallel.tp=0"], ["parallel.tp", "positive"]),
        (["parallel.dp=0"], ["parallel.dp", "auto"]),
        (["data.source=text"], ["data.source=text", "data.path"]),
        (["data.path=corpus.txt"], ["data.path=corpus.txt", "data.source"]),
    ],
)
def test_out_of_range_value_names_the_key(overrides, must_contain):
    message = config_error(overrides=overrides)
    for text in must_contain:
        assert text in message, message


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.eps=.inf", "zero.page_mb=.inf"])
def test_infinite_value_is_refused(override):
    message = config_error(overrides=[override])
    assert override.split("=")[0] in message


def test_global_batch_must_be_a_multiple_of_micro_batch():
    message = config_error(overrides=["train.global_batch=10", "train.micro_batch=4"])
    assert "train.global_batch=10" in message and "train.micro_batch" in message
    assert "multiple of 4" in message


def test_grad_accum_steps_divides_global_batch_over_micro_batch_and_dp():
    cfg = load_config(overrides=["train.global_batch=16", "train.micro_batch=2"])
    assert cfg.grad_accum_steps(1) == 8
    assert cfg.grad_accum_steps(2) == 4
    assert cfg.grad_accum_steps(8) == 1
    with pytest.raises(ConfigError) as excinfo:
        cfg.grad_accum_steps(3)  # 16 sequences do not split over 3 ranks × 2
    message = one_line(str(excinfo.value))
    assert "train.global_batch=16" in message and "multiple of 6" in message


def test_malformed_yaml_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  dim: 64\n n_heads: 4\ntrain:\n  steps: 3\n")  # line 3 is mis-indented
    message = config_error(path=path)
    assert str(path) in message and "YAML" in message and "line 3" in message


def test_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    # YAML parsers keep the last copy silently: an edit to the first would change nothing.
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  steps: 5\n  seq_len: 64\n  steps: 6\n")
    message = config_error(path=path)
    assert str(path) in message and "'steps' given twice (line 4)" in message
    path.write_text("model:\n  dim: 64\ntrain:\n  steps: 5\nmodel:\n  n_layers: 2\n")
    assert "'model' given twice (line 5)" in config_error(path=path)
    # The same key in two sections, and a merged key overridden, are no repeats.
    path.write_text("data:\n  seed: 1\ntrain:\n  <<: {seed: 1, steps: 5, seq_len: 64}\n  steps: 6\n")
    cfg = load_config(path)
    assert (cfg.data.seed, cfg.train.seed, cfg.train.steps, cfg.train.seq_len) == (1, 1, 6, 64)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- train\n")
    assert "mapping" in config_error(path=path)


def test_binary_config_file_is_refused(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    assert str(path) in config_error(path=path)


def test_missing_config_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path=path)
    assert str(path) in message and "does not exist" in message


def test_override_without_equals_sign_shows_the_form():
    message = config_error(overrides=["train.steps"])
    assert "train.steps" in message and "--set section.key=value" in message


# ---------------------------------------------------------------------------------------------
# Saving


def test_save_config_round_trips(tmp_path):
    cfg = load_config(overrides=[
        "model.dim=128", "model.n_kv_heads=null", "model.tie_embeddings=true", "optim.lr=1e-3",
        "optim.betas=[0.85, 0.999]", "optim.grad_clip=null", "precision.fp8.skip=[output]",
        "zero.stage=3", "zero.offload_params=cpu", "parallel.dp=2", "train.output_dir=null/1e-3",
        "train.resume=never",
    ])
    # Strings that YAML would read as other types must come back as the same strings.
    cfg.train.sample_prompt = "yes"
    cfg.data.source, cfg.data.path = "text", "2024-01-01"
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
