"""`angelptm prepare`: every input type into one token file, bad input refused in one line, bounded memory,
and the whole path a user takes: import-hf -> prepare -> train -> export-hf -> transformers."""

import gc
import gzip
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hf_tokenizer_files import write_tokenizer

from conftest import REPO, cli_command, one_line, run_cli
from angelptm.cli import main
from angelptm.data import TokenFile, load_tokenizer
from angelptm.data import prepare as prepare_module
from angelptm.data import prepare_inputs
from angelptm.errors import UserError

DOCS = [f"def f{i}(x):\n    return x * {i}  # é{'!' * (i % 7)}\n" for i in range(300)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), "bpe")


def jsonl_bytes(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def prepare_cli(capsys, *args) -> tuple[int, str, str]:
    """Exit status, stdout, and stderr less the progress lines ("prepare: ...") of `angelptm prepare ARGS`."""
    code = main(["prepare", *map(str, args)])
    out, err = capsys.readouterr()
    progress = [line for line in err.splitlines() if line.startswith("prepare: ")]
    assert code != 0 or progress, "no progress line"
    return code, out, "\n".join(line for line in err.splitlines() if not line.startswith("prepare: "))


def test_every_input_type_in_order(tmp_path, tok_dir, capsys, monkeypatch):
    inputs = tmp_path / "in"
    (inputs / "b" / "deeper").mkdir(parents=True)
    (inputs / "a.jsonl").write_bytes(jsonl_bytes(DOCS[:100]))
    (inputs / "b" / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS[100:150])))
    (inputs / "b" / "deeper" / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(DOCS[150:200])))
    table = pa.table({"text": DOCS[200:290], "n": list(range(90))})
    pq.write_table(table, inputs / "b" / "e.parquet", row_group_size=20)  # five row groups
    (inputs / "f.txt").write_text("".join(DOCS[290:]))
    (inputs / "notes.md").write_text("not an input type: left out")
    assert pq.ParquetFile(inputs / "b" / "e.parquet").num_row_groups == 5
    code, out, err = prepare_cli(capsys, inputs, "--tokenizer", tok_dir, "--out", tmp_path / "out" / "t",
                                 "--workers", "2")
    assert code == 0, err
    assert "291 documents" in out and "tokens/s" in out
    tok = load_tokenizer(str(tok_dir))
    # Sorted recursively by path: a.jsonl, b/c.jsonl.gz, b/deeper/d.jsonl.zst, b/e.parquet, f.txt.
    expected = tok.encode_documents(DOCS[:290] + ["".join(DOCS[290:])])
    tokens = TokenFile(tmp_path / "out" / "t")
    np.testing.assert_array_equal(tokens.tokens, np.concatenate(expected))
    assert tokens.doc_offsets == list(np.cumsum([0] + [d.size for d in expected[:-1]]))
    assert tokens.tokenizer == tok.name and tokens.vocab_size == tok.vocab_size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.bin", "t.json"]  # the shards are gone
    # One worker, or tasks of a few lines, write the same bytes: order is kept whatever the parallelism.
    assert prepare_cli(capsys, inputs, "--tokenizer", tok_dir, "--out", tmp_path / "one", "--workers", "1")[0] == 0
    assert TokenFile(tmp_path / "one").checksum == tokens.checksum
    monkeypatch.setattr(prepare_module, "TASK_BYTES", 300)
    monkeypatch.setattr(prepare_module, "MIN_TASK_BYTES", 300)
    assert prepare_cli(capsys, inputs, "--tokenizer", tok_dir, "--out", tmp_path / "small", "--workers", "2")[0] == 0
    assert TokenFile(tmp_path / "small").checksum == tokens.checksum


def test_long_text_file_is_read_in_pieces_as_one_document(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_inputs, "PIECE_BYTES", 64)
    text = "".join(DOCS[:40]) + "a line longer than a piece: " + "ü" * 100 + "\n"
    (tmp_path / "long.txt").write_text(text)
    prepare_module.prepare([str(tmp_path / "long.txt")], "byte", str(tmp_path / "out"), workers=1)
    out = TokenFile(tmp_path / "out")
    np.testing.assert_array_equal(out.tokens, load_tokenizer("byte").encode(text))  # BOS once, EOS once
    assert out.doc_offsets == [0]


def test_the_garbage_collector_is_left_as_the_caller_had_it(tmp_path):
    # prepare freezes the heap it starts with (no full collection walks it, no worker copies it) and
    # unfreezes it after, on success and on error, but never undoes a freeze of the caller's.
    (tmp_path / "a.txt").write_text(DOCS[0])
    prepare_module.prepare([str(tmp_path / "a.txt")], "byte", str(tmp_path / "out"), workers=2)
    with pytest.raises(UserError):
        prepare_module.prepare([str(tmp_path / "missing.txt")], "byte", str(tmp_path / "out"), workers=1)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        prepare_module.prepare([str(tmp_path / "a.txt")], "byte", str(tmp_path / "out"), workers=1)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def whole_read_pieces(data: bytes, piece: int) -> list[tuple[int, int]]:
    """Where a .txt file's pieces begin and end, read as a reader holding the whole window would cut them."""
    pieces, start, window_end = [], 0, piece
    while start < len(data):
        if window_end >= len(data):
            pieces.append((start, len(data)))
            break
        window = data[start:window_end]
        end = start + (window.rfind(b"\n") + 1 or prepare_inputs._utf8_boundary(window))
        pieces.append((start, end))
        start, window_end = end, window_end + piece
    return pieces


def test_text_pieces_are_cut_where_a_whole_read_cuts_them(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_inputs, "PIECE_BYTES", 37)
    monkeypatch.setattr(prepare_inputs, "SCAN_BYTES", 5)  # the backward search for a line break crosses reads
    data = ("".join(DOCS[:30]) + "ü" * 40 + "\n" + "x" * 100 + "漢字" * 30).encode() + b"\x80" * 50 + b"\n\n"
    (tmp_path / "t.txt").write_bytes(data)
    pieces = [task.pieces[0][1:3] for task in prepare_inputs._txt_pieces(tmp_path / "t.txt", 0)]
    assert pieces == whole_read_pieces(data, 37) and len(pieces) > 30


def test_tasks_shrink_as_the_input_runs_out_and_cover_it(tmp_path, monkeypatch):
    # Guided scheduling: big tasks first (few shards), small ones last, so the workers end together.
    monkeypatch.setattr(prepare_module, "TASK_BYTES", 8000)
    monkeypatch.setattr(prepare_module, "MIN_TASK_BYTES", 500)
    data = jsonl_bytes(DOCS * 5)
    (tmp_path / "in.jsonl").write_bytes(data)
    size = prepare_module.guided_task_bytes(len(data), workers=2)
    planned = list(prepare_inputs.tasks([tmp_path / "in.jsonl"], "text", False, size))
    ends = [t.end for t in planned]
    assert [(t.start, t.end) for t in planned] == list(zip([0] + ends[:-1], ends)) and ends[-1] == len(data)
    assert [t.index for t in planned] == list(range(len(planned)))
    longest_line = max(map(len, data.splitlines(keepends=True)))
    for task in planned[:-1]:  # each task is its size, rounded up to a whole line
        assert size(task.start) <= task.end - task.start < size(task.start) + longest_line
        assert data[task.end - 1:task.end] == b"\n"
    lengths = [t.end - t.start for t in planned]
    assert lengths[0] >= 8000 and max(lengths[-5:]) < 500 + longest_line
    # .txt files share a task up to its size; one file larger than that is a task of its own.
    for i, n in enumerate([300, 300, 2000, 300, 300, 300]):
        (tmp_path / f"{i}.txt").write_text("x" * (n - 1) + "\n")
    files = sorted(tmp_path.glob("*.txt"))
    grouped = list(prepare_inputs.tasks(files, "text", False, lambda done: 700))
    assert [[os.path.basename(piece[0]) for piece in t.pieces] for t in grouped] == [
        ["0.txt", "1.txt"], ["2.txt"], ["3.txt", "4.txt"], ["5.txt"]]


@pytest.mark.parametrize("suffix, compress", [("", bytes), (".gz", gzip.compress)])
def test_a_bad_line_far_into_the_file_is_numbered_in_it(tmp_path, tok_dir, capsys, monkeypatch, suffix, compress):
    monkeypatch.setattr(prepare_module, "TASK_BYTES", 500)  # many tasks: the line number adds their lines up
    monkeypatch.setattr(prepare_module, "MIN_TASK_BYTES", 500)
    lines = jsonl_bytes(DOCS).splitlines(keepends=True)
    bad = tmp_path / f"bad.jsonl{suffix}"
    bad.write_bytes(compress(b"".join(lines[:250] + [b"\n", b'{"text": 7}\n'] + lines[250:])))
    for workers in ("1", "2"):
        code, _, err = prepare_cli(capsys, bad, "--tokenizer", tok_dir, "--out", tmp_path / "o" / "t", "--workers",
                                   workers)
        assert code == 2 and f"{bad}: line 252 has text of type int" in one_line(err), err
        assert not list((tmp_path / "o").iterdir())
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": DOCS[:100] + [None] + DOCS[100:120]}), path, row_group_size=7)
    code, _, err = prepare_cli(capsys, path, "--tokenizer", tok_dir, "--out", tmp_path / "o" / "t", "--workers", "2")
    assert code == 2 and f"{path}: row 101 has text=None" in one_line(err), err


def test_an_interrupted_prepare_leaves_nothing_behind(tmp_path, tok_dir, monkeypatch):
    (tmp_path / "in.jsonl").write_bytes(jsonl_bytes(DOCS * 4))
    monkeypatch.setattr(prepare_module, "TASK_BYTES", 2000)
    monkeypatch.setattr(prepare_module, "MIN_TASK_BYTES", 2000)
    calls = []

    def interrupt(*args):  # Ctrl-C while the workers hold tasks in flight and shards are on disk
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module.Progress, "update", lambda self, *args: interrupt(*args))
    with pytest.raises(KeyboardInterrupt):
        prepare_module.prepare([str(tmp_path / "in.jsonl")], str(tok_dir), str(tmp_path / "o" / "t"), workers=2)
    assert not list((tmp_path / "o").iterdir()) and not multiprocessing.active_children()


def test_corrupt_line_is_named_and_nothing_is_written(tmp_path, tok_dir, capsys):
    lines = jsonl_bytes(DOCS[:5]).splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines[:3] + [b'{"text": "cut off\n', b'["a list"]\n', b'{"title": "no text"}\n']
                             + lines[3:]))
    out = tmp_path / "out"
    code, _, err = prepare_cli(capsys, bad, "--tokenizer", tok_dir, "--out", out / "t")
    assert code == 2 and f"{bad}: line 4 is not valid JSON" in one_line(err) and "--skip-bad" in err
    assert not out.exists() or not list(out.iterdir())
    code, summary, err = prepare_cli(capsys, bad, "--tokenizer", tok_dir, "--out", out / "t", "--skip-bad")
    assert code == 0 and "5 documents" in summary and "skipped 3 bad" in summary
    assert len(TokenFile(out / "t").doc_offsets) == 5


def test_parquet_without_the_field_or_with_nulls(tmp_path, tok_dir, capsys):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"content": ["a", None, "c"]}), path)
    code, _, err = prepare_cli(capsys, path, "--tokenizer", tok_dir, "--out", tmp_path / "t")
    assert code == 2 and "no column 'text'" in one_line(err) and "--field" in err
    code, _, err = prepare_cli(capsys, path, "--tokenizer", tok_dir, "--out", tmp_path / "t", "--field", "content")
    assert code == 2 and "row 2" in one_line(err)
    code, summary, _ = prepare_cli(capsys, path, "--tokenizer", tok_dir, "--out", tmp_path / "t", "--field",
                                   "content", "--skip-bad")
    assert code == 0 and "2 documents" in summary and "skipped 1" in summary


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_input_is_one_line_and_writes_nothing(tmp_path, tok_dir, capsys, content):
    (tmp_path / "empty.jsonl").write_bytes(content)
    code, _, err = prepare_cli(capsys, tmp_path / "empty.jsonl", "--tokenizer", tok_dir, "--out", tmp_path / "o" / "t")
    assert code == 2 and "holds no documents" in one_line(err)
    assert not list((tmp_path / "o").iterdir())


def test_bad_arguments_are_one_line(tmp_path, tok_dir, capsys):
    (tmp_path / "x.csv").write_text("a,b\n")
    for args, expected in [([tmp_path / "nope.jsonl"], "does not exist"), ([tmp_path / "x.csv"], "is not a"),
                           ([tmp_path], "no .txt"), ([tmp_path / "x.csv", "--tokenizer", tmp_path], "--tokenizer=")]:
        if "--tokenizer" not in args:
            args = args + ["--tokenizer", tok_dir]
        code, _, err = prepare_cli(capsys, *args, "--out", tmp_path / "t")
        assert code == 2 and expected in one_line(err), err


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, threading
    from angelptm.data.prepare import prepare
    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    before, peak, done = resident_mb(), [0.0], threading.Event()
    def watch():  # the peak of this run alone (ru_maxrss would include the imports' passing peak)
        while not done.wait(0.002):
            peak[0] = max(peak[0], resident_mb())
    watcher = threading.Thread(target=watch)
    watcher.start()
    for path in sys.argv[1:-1]:
        prepare([path], "byte", sys.argv[-1] + path.rsplit("/", 1)[-1], workers=1)
    done.set()
    watcher.join()
    print(json.dumps({"before": before, "peak": peak[0]}))
""")


def test_inputs_larger_than_the_memory_budget_stream_through(tmp_path):
    budget_mb, size_mb = 24, 64
    line = json.dumps({"text": "x = [1, 2, 3]  # a line of code\n" * 2000}) + "\n"  # ~70 KB per document
    with open(tmp_path / "big.jsonl", "w") as f:
        f.write(line * (size_mb * 2**20 // len(line) + 1))
    with open(tmp_path / "big.txt", "w") as f:  # one document of 64 MB
        for _ in range(size_mb):
            f.write(("y = 'text'\n" * (2**20 // 11 + 1))[: 2**20])
    argv, env = cli_command()
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big.jsonl"), str(tmp_path / "big.txt"),
                            str(tmp_path / "out-")], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert probe.returncode == 0, probe.stderr
    peaks = json.loads(probe.stdout.splitlines()[-1])
    assert peaks["peak"] - peaks["before"] < budget_mb, peaks
    assert TokenFile(tmp_path / "out-big.txt").doc_offsets == [0]


def test_import_prepare_train_export_round_trip(tmp_path, tok_dir, capsys):
    """A Hugging Face Llama with its own tokenizer: imported, trained on prepared data, exported, loaded back
    by transformers, which continues a prompt exactly as `angelptm generate` does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tok_dir))
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=640, max_position_embeddings=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id)).save_pretrained(hf_dir)  # vocabulary padded past the tokenizer's 600 ids
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(hf_dir)
    assert main(["import-hf", str(hf_dir), str(tmp_path / "imported")]) == 0
    (tmp_path / "corpus.jsonl").write_bytes(jsonl_bytes(DOCS))
    assert prepare_cli(capsys, tmp_path / "corpus.jsonl", "--tokenizer", tmp_path / "imported" / "tokenizer",
                       "--out", tmp_path / "data" / "tokens", "--workers", "2")[0] == 0
    run = tmp_path / "run"
    trained = run_cli("train", tmp_path / "imported" / "config.yaml", "--set", f"train.resume={tmp_path / 'imported'}",
                      "--set", "data.source=tokens", "--set", f"data.path={tmp_path / 'data' / 'tokens'}",
                      "--set", f"train.output_dir={run}", "--set", "train.steps=3", "--set", "train.seq_len=32",
                      "--set", "train.global_batch=4", "--set", "train.micro_batch=4", "--set", "train.sample_tokens=0",
                      "--set", "train.log_every=1", "--set", "optim.warmup_steps=0", "--set", "optim.lr=1e-2")
    assert trained.returncode == 0, trained.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 3
    assert main(["export-hf", str(run / "checkpoints" / "step_3"), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    prompt = DOCS[7][:12]
    assert theirs(prompt)["input_ids"] == tok.encode(prompt, bos=True, eos=False)
    with torch.no_grad():
        ids = model.generate(**theirs(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False,
                             eos_token_id=None)
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    ours = capsys.readouterr().out.split("---\n", 1)[1].rstrip("\n")
    assert ours == theirs.decode(ids[0], skip_special_tokens=True)


def test_an_imported_checkpoint_keeps_its_tokenizer_when_moved(tmp_path, tok_dir, capsys, monkeypatch):
    """import-hf names the tokenizer copy by the output path as given; a moved checkpoint reads its own copy."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tok_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=640, max_position_embeddings=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id)).save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp_path / "hf")
    (tmp_path / "place").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["import-hf", "hf", "place/imported"]) == 0
    assert "tokenizer: place/imported/tokenizer\n" in (tmp_path / "place" / "imported" / "config.yaml").read_text()
    os.rename(tmp_path / "place", tmp_path / "moved")
    assert main(["export-hf", str(tmp_path / "moved" / "imported"), str(tmp_path / "out")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("def f")["input_ids"] == tok.encode("def f", bos=True, eos=False)
    assert main(["generate", str(tmp_path / "moved" / "imported"), "--prompt", "def f", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress),
                                              (".zst", lambda data: zstandard.ZstdCompressor().compress(data))])
def test_truncated_compressed_file_is_one_line(tmp_path, tok_dir, capsys, suffix, compress):
    packed = compress(jsonl_bytes(DOCS * 20))
    cut = tmp_path / f"cut.jsonl{suffix}"
    cut.write_bytes(packed[: len(packed) // 2])
    code, _, err = prepare_cli(capsys, cut, "--tokenizer", tok_dir, "--out", tmp_path / "o" / "t")
    assert code == 2 and "is truncated or corrupt" in one_line(err)
    assert not list((tmp_path / "o").iterdir())
