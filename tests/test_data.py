"""Data pipeline: tokenizer, token files and their cache, the four sources, and the stateless sampler."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from angelptm.config import DataConfig
from angelptm.data import (
    ByteTokenizer, TokenDataset, TokenFile, TokenSampler, build_dataset, build_token_file, synthetic_dataset,
)
from angelptm.data.sources import STDLIB_SKIP_DIRS, stdlib_files
from angelptm.errors import UserError

TOK = ByteTokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ANGELPTM_CACHE", str(folder))
    return folder


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Tokenizer


TEXTS = ["", "hello world", "naïve café — 日本語 🚀 e\u0301\n\t\0", "\U0010ffff" * 3]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_any_text(text):
    ids = TOK.encode(text)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids) == text
    assert TOK.encode(text, bos=False, eos=False) == ids[1:-1]


def test_tokenizer_decode_skips_specials_and_replaces_invalid_utf8():
    ids = [TOK.bos_id, 0xFF, ord("h"), ord("i"), TOK.pad_id, 0xC3, TOK.eos_id]
    assert TOK.decode(ids) == "\ufffdhi\ufffd"
    assert TOK.decode(torch.tensor(ids)) == TOK.decode(np.array(ids)) == "\ufffdhi\ufffd"


# ---------------------------------------------------------------------------------------------
# Token files


def write_corpus(root: Path) -> dict[str, bytes]:
    docs = {
        "b.txt": "second 日本\n".encode(), "a/c.txt": b"first", "a/d/e.py": b"def f():\n    pass\n", "z.txt": b"",
    }
    for name, data in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / ".hidden").write_bytes(b"skipped")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_bytes(b"skipped")
    return docs


ORDER = ["a/c.txt", "a/d/e.py", "b.txt", "z.txt"]  # sorted by path; hidden entries skipped


def encode_corpus(docs: dict[str, bytes]) -> np.ndarray:
    return np.concatenate([TOK.encode_bytes(docs[name]) for name in ORDER])


def test_build_token_file_round_trip(tmp_path):
    docs = write_corpus(tmp_path / "src")
    built = build_token_file(tmp_path / "src", tmp_path / "out" / "corpus", TOK)
    opened = TokenFile(tmp_path / "out" / "corpus")
    expected = encode_corpus(docs)
    for ds in (built, opened):
        assert ds.tokens.dtype == np.uint16
        np.testing.assert_array_equal(ds.tokens, expected)
        assert ds.doc_offsets == [0, 7, 27, 43]
        assert [TOK.decode(ds.tokens[a:b]) for a, b in zip(ds.doc_offsets, ds.doc_offsets[1:] + [len(ds)])] == [
            docs[name].decode() for name in ORDER]
    index = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 259
    assert index["num_tokens"] == len(expected) and index["num_docs"] == 4
    assert (tmp_path / "out" / "corpus.bin").stat().st_size == 2 * len(expected)
    assert built.checksum == opened.checksum == index["checksum"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus.bin", "corpus.json"]  # no temp left


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    class WideByteTokenizer(ByteTokenizer):
        vocab_size = 70_000

    (tmp_path / "doc.txt").write_text("wide")
    ds = build_token_file(tmp_path / "doc.txt", tmp_path / "wide", WideByteTokenizer())
    assert ds.tokens.dtype == np.uint32 and (tmp_path / "wide.bin").stat().st_size == 4 * 6
    np.testing.assert_array_equal(TokenFile(tmp_path / "wide").tokens, TOK.encode("wide"))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped": lambda prefix: flip_byte(prefix.with_name("t.bin")),
    "truncated": lambda prefix: os.truncate(prefix.with_name("t.bin"), 10),
    "missing_bin": lambda prefix: prefix.with_name("t.bin").unlink(),
    "missing_index": lambda prefix: prefix.with_name("t.json").unlink(),
    "garbage_index": lambda prefix: prefix.with_name("t.json").write_text("{not json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_token_file_rejects_damage_with_a_fix(tmp_path, damage):
    (tmp_path / "doc.txt").write_text("some text to tokenize " * 10)
    build_token_file(tmp_path / "doc.txt", tmp_path / "t", TOK)
    DAMAGE[damage](tmp_path / "t")
    with pytest.raises(UserError) as excinfo:
        TokenFile(tmp_path / "t")
    assert "rebuild it with angelptm.data.build_token_file" in one_line_error(excinfo)


def cached_bin(cache: Path) -> Path:
    (found,) = cache.glob("text-*/tokens.bin")
    return found


@pytest.mark.parametrize("damage", ["flipped", "truncated", "stale", "intact"])
def test_text_cache_rebuilds_only_when_damaged_or_stale(tmp_path, cache, damage):
    docs = write_corpus(tmp_path / "src")
    cfg = DataConfig(source="text", path=str(tmp_path / "src"))
    first = build_dataset(cfg, seq_len=8, vocab_size=259)
    np.testing.assert_array_equal(first.tokens, encode_corpus(docs))
    before = cached_bin(cache).stat()
    if damage == "flipped":
        flip_byte(cached_bin(cache))
    elif damage == "truncated":
        os.truncate(cached_bin(cache), 6)
    elif damage == "stale":
        docs["b.txt"] += b"more"
        (tmp_path / "src" / "b.txt").write_bytes(docs["b.txt"])
    second = build_dataset(cfg, seq_len=8, vocab_size=259)
    np.testing.assert_array_equal(second.tokens, encode_corpus(docs))
    after = cached_bin(cache).stat()
    rebuilt = (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)
    assert rebuilt == (damage != "intact")


def test_tokens_source_reads_a_prebuilt_file_by_prefix_or_bin(tmp_path):
    write_corpus(tmp_path / "src")
    built = build_token_file(tmp_path / "src", tmp_path / "corpus", TOK)
    for path in (tmp_path / "corpus", tmp_path / "corpus.bin"):
        ds = build_dataset(DataConfig(source="tokens", path=str(path)), seq_len=8, vocab_size=259)
        assert ds.checksum == built.checksum


# ---------------------------------------------------------------------------------------------
# Sources and build_dataset


def test_stdlib_corpus_builds_once_then_comes_from_the_cache(cache):
    first = build_dataset(DataConfig(source="stdlib"), seq_len=256, vocab_size=259)
    files = stdlib_files()
    assert len(first.doc_offsets) == len(files) and len(first) == sum(f.stat().st_size + 2 for f in files)
    assert 1e6 < len(first) < 30e6
    assert TOK.decode(first.tokens[: first.doc_offsets[1]]) == files[0].read_bytes().decode("utf-8")
    (bin_path,) = cache.glob("stdlib-*/tokens.bin")
    before = bin_path.stat()
    second = build_dataset(DataConfig(source="stdlib"), seq_len=256, vocab_size=259)
    after = bin_path.stat()
    assert second.checksum == first.checksum
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_stdlib_cap_keeps_a_deterministic_prefix_of_the_sorted_files():
    everything = stdlib_files()
    capped = stdlib_files(cap_bytes=300_000)
    assert 0 < len(capped) < len(everything) and capped == everything[: len(capped)]
    assert sum(f.stat().st_size for f in capped) <= 300_000
    assert sum(f.stat().st_size for f in everything[: len(capped) + 1]) > 300_000
    assert all(f.suffix == ".py" and not STDLIB_SKIP_DIRS & set(f.parts) for f in everything)


def test_synthetic_data_is_deterministic_and_learnable():
    a, b, other = synthetic_dataset(3), synthetic_dataset(3), synthetic_dataset(4)
    assert a.checksum == b.checksum != other.checksum
    np.testing.assert_array_equal(a.tokens, b.tokens)
    tokens = a.tokens.astype(np.int64)
    assert tokens.max() < 259
    # Entropy of the next token given the two before it: low, where a uniform choice over the 27
    # symbols in use would give ln 27 ~ 3.3 nats. A model can learn it, so the loss can fall.
    context = tokens[:-2] * 259 + tokens[1:-1]
    _, joint = np.unique(context * 259 + tokens[2:], return_counts=True)
    _, marginal = np.unique(context, return_counts=True)
    n = len(context)
    conditional_entropy = -(joint / n * np.log(joint / n)).sum() + (marginal / n * np.log(marginal / n)).sum()
    assert conditional_entropy < 1.2


@pytest.mark.parametrize("vocab_size", [1, 2, 16, 200])
def test_synthetic_data_draws_from_a_small_vocabulary(vocab_size):
    """A model with fewer ids than the byte tokenizer gets synthetic ids in [0, vocab_size), the same
    words over fewer symbols; the byte vocabulary and larger keep byte text."""
    dataset = build_dataset(DataConfig(source="synthetic", seed=3), seq_len=8, vocab_size=vocab_size)
    tokens = dataset.tokens.astype(np.int64)
    assert dataset.vocab_size == vocab_size and 0 <= tokens.min() and tokens.max() < vocab_size
    assert len(np.unique(tokens)) == min(vocab_size, 27)
    words = synthetic_dataset(3).tokens
    np.testing.assert_array_equal(tokens == 0, (words == ord(" ")) if vocab_size > 1 else True)
    large = build_dataset(DataConfig(source="synthetic", seed=3), seq_len=8, vocab_size=32_000)
    assert large.tokenizer == "byte" and large.checksum == synthetic_dataset(3).checksum


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_missing_path_names_the_field(tmp_path, source):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as excinfo:
        build_dataset(DataConfig(source=source, path=str(missing)), seq_len=8, vocab_size=259)
    assert one_line_error(excinfo).startswith(f"data.path={missing} does not exist; ")


def test_vocabulary_and_sequence_length_are_checked(tmp_path, cache):
    with pytest.raises(UserError) as excinfo:
        build_dataset(DataConfig(source="stdlib"), seq_len=8, vocab_size=200)
    assert "model.vocab_size=200" in one_line_error(excinfo) and "model.vocab_size=259" in str(excinfo.value)
    (tmp_path / "tiny.txt").write_text("short")
    with pytest.raises(UserError) as excinfo:
        build_dataset(DataConfig(source="text", path=str(tmp_path / "tiny.txt")), seq_len=64, vocab_size=259)
    assert "train.seq_len" in one_line_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Sampler


def counting_dataset(num_tokens: int) -> TokenDataset:
    """Token i is i, so a row shows which window it came from."""
    tokens = np.arange(num_tokens, dtype=np.uint32)
    return TokenDataset(tokens, num_tokens, "counting", f"counting-{num_tokens}", name=f"counting({num_tokens})")


def test_sampler_rows_are_seeded_windows_of_the_stream():
    sampler = TokenSampler(synthetic_dataset(0), seq_len=32, global_batch=8, seed=5)
    batch = sampler.batch(3)
    assert batch.shape == (8, 33) and batch.dtype == torch.int64
    torch.testing.assert_close(batch, TokenSampler(synthetic_dataset(0), 32, 8, seed=5).batch(3), rtol=0, atol=0)
    assert not torch.equal(batch, TokenSampler(synthetic_dataset(0), 32, 8, seed=6).batch(3))
    assert not torch.equal(batch, sampler.batch(4))
    rows = TokenSampler(counting_dataset(1000), seq_len=16, global_batch=8, seed=0).batch(2)
    assert (rows[:, 0] % 16 == 0).all()
    assert torch.equal(rows, rows[:, :1] + torch.arange(17))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_split_of_the_global_batch_reads_the_same_rows(seed):
    rng = np.random.default_rng(seed)
    reference = TokenSampler(counting_dataset(5000), seq_len=16, global_batch=12, seed=seed)
    for step in (0, 7, 40):  # step 40 spans an epoch boundary (312 windows)
        cuts = sorted(set(rng.integers(1, 12, size=rng.integers(1, 6)).tolist()) | {0, 12})
        fresh = TokenSampler(counting_dataset(5000), seq_len=16, global_batch=12, seed=seed)
        slices = [fresh.rows(step, a, b - a) for a, b in zip(cuts, cuts[1:])][::-1]  # asked in any order
        assert torch.equal(torch.cat(slices[::-1]), reference.batch(step))


def test_every_epoch_sees_every_window_once():
    sampler = TokenSampler(counting_dataset(10 * 8 + 1), seq_len=8, global_batch=3, seed=0)  # 10 windows
    assert sampler.num_windows == 10
    starts = torch.cat([sampler.batch(step)[:, 0] for step in range(10)]) // 8  # 30 samples: 3 epochs
    epochs = starts.reshape(3, 10)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1])


def test_resume_continues_identically_and_checks_the_data():
    sampler = TokenSampler(synthetic_dataset(0), seq_len=32, global_batch=4, seed=1)
    state = json.loads(json.dumps(sampler.state_dict(next_step=7)))
    resumed = TokenSampler(synthetic_dataset(0), seq_len=32, global_batch=4, seed=1)
    step = resumed.load_state_dict(state)
    assert step == 7
    for s in range(step, step + 3):
        assert torch.equal(resumed.batch(s), sampler.batch(s))

    mismatches = [
        (TokenSampler(synthetic_dataset(1), 32, 4, seed=1), "other data"),
        (TokenSampler(synthetic_dataset(0), 32, 4, seed=2), "data.seed=1"),
        (TokenSampler(synthetic_dataset(0), 16, 4, seed=1), "train.seq_len=32"),
        (TokenSampler(synthetic_dataset(0), 32, 8, seed=1), "train.global_batch=4"),
    ]
    for other, fix in mismatches:
        with pytest.raises(UserError) as excinfo:
            other.load_state_dict(state)
        assert fix in one_line_error(excinfo) and "train.resume=never" in str(excinfo.value)
