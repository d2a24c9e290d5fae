"""Megatron-LM indexed datasets (.bin + .idx) read in place: every integer dtype code, damage, a training run."""

import struct

import numpy as np
import pytest

from angelptm.config import DataConfig
from angelptm.data import build_dataset, megatron_dataset
from angelptm.data.megatron import DTYPES, MAGIC
from angelptm.errors import UserError

from conftest import one_line, tiny_config

INTEGER_CODES = {1: 255, 2: 127, 3: 32767, 4: 2**31 - 1, 5: 2**40, 8: 65535}  # code -> largest id it holds


def write_megatron(prefix, documents, code, multimodal=False):
    """A pair laid out as Megatron-LM's _IndexWriter writes it; each document a list of sequences."""
    dtype = np.dtype(DTYPES[code])
    sequences = [np.asarray(seq, dtype=dtype) for doc in documents for seq in doc]
    lengths = np.array([len(s) for s in sequences], dtype="<i4")
    pointers = (np.concatenate([[0], np.cumsum(lengths[:-1])]) * dtype.itemsize).astype("<i8")
    doc_index = np.concatenate([[0], np.cumsum([len(doc) for doc in documents])]).astype("<i8")
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            f.write(seq.astype(dtype.newbyteorder("<")).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(struct.pack("<9sQB", MAGIC, 1, code))
        f.write(struct.pack("<QQ", len(sequences), len(doc_index)))
        f.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())
        if multimodal:
            f.write(np.zeros(len(sequences), dtype=np.int8).tobytes())


def corpus(largest):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 100, size=n).tolist() for n in rng.integers(1, 9, size=rng.integers(1, 4))]
            for _ in range(12)]
    docs[3] = [[largest, 0, largest]]  # the widest id the dtype holds
    return docs


@pytest.mark.parametrize("code", sorted(INTEGER_CODES))
def test_every_document_reads_back_in_place(tmp_path, code):
    docs = corpus(INTEGER_CODES[code])
    write_megatron(tmp_path / "c", docs, code, multimodal=code == 4)
    dataset = megatron_dataset(str(tmp_path / "c.bin"))
    assert isinstance(dataset.tokens, np.memmap) and dataset.tokens.dtype == np.dtype(DTYPES[code])
    ends = list(dataset.doc_offsets[1:]) + [len(dataset)]
    assert len(dataset.doc_offsets) == len(docs)
    for doc, start, end in zip(docs, dataset.doc_offsets, ends):
        assert dataset.tokens[start:end].tolist() == [t for seq in doc for t in seq]
    assert dataset.vocab_size == INTEGER_CODES[code] + 1
    write_megatron(tmp_path / "d", docs[:-1] + [[[1, 2]]], code)
    assert megatron_dataset(str(tmp_path / "d")).checksum != dataset.checksum


def damage(prefix, how):
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    if how == "truncated idx":
        idx.write_bytes(idx.read_bytes()[:40])
    elif how == "truncated bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif how == "magic":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    elif how == "float":
        data = bytearray(idx.read_bytes())
        data[17] = 7
        idx.write_bytes(bytes(data))
    elif how == "version":
        idx.write_bytes(idx.read_bytes()[:9] + struct.pack("<Q", 2) + idx.read_bytes()[17:])
    elif how == "empty idx":
        idx.write_bytes(b"")
    else:
        idx.unlink()


@pytest.mark.parametrize("how", ["truncated idx", "truncated bin", "magic", "float", "version", "empty idx", "missing"])
def test_damaged_pairs_are_one_line_errors_naming_the_file(tmp_path, how):
    prefix = tmp_path / "c"
    write_megatron(prefix, corpus(1000), 8)
    damage(prefix, how)
    with pytest.raises(UserError) as e:
        megatron_dataset(str(prefix))
    assert str(prefix) in one_line(str(e.value))


def test_a_short_training_run_on_a_megatron_pair(tmp_path, one_thread, own_process_group):
    from angelptm.train.trainer import Trainer

    rng = np.random.default_rng(1)
    write_megatron(tmp_path / "c", [[rng.integers(0, 259, size=200).tolist()] for _ in range(8)], 8)
    data = {"source": "megatron", "path": str(tmp_path / "c")}
    assert len(build_dataset(DataConfig(**data), 32, 259)) == 1600
    record = Trainer(tiny_config(tmp_path / "run", data=data, train={"steps": 2})).fit()
    assert record["step"] == 2 and np.isfinite(record["loss"])
    assert record["tokens_by_source"] == {str(tmp_path / "c"): 2 * 8 * 32}


def test_the_id_range_is_scanned_on_the_first_open_only(tmp_path, monkeypatch):
    """A terabyte .bin is read end to end once, not at every start; a .bin rewritten since is scanned again."""
    import os

    import angelptm.data.megatron as megatron

    monkeypatch.setenv("ANGELPTM_CACHE", str(tmp_path / "cache"))
    scans = []
    scan = megatron._id_range
    monkeypatch.setattr(megatron, "_id_range", lambda tokens: scans.append(len(tokens)) or scan(tokens))
    write_megatron(tmp_path / "c", [[[5, 7, 300]]], 8)
    assert [megatron_dataset(str(tmp_path / "c")).vocab_size for _ in range(3)] == [301] * 3
    assert scans == [3]
    write_megatron(tmp_path / "c", [[[5, 7, 900]]], 8)  # same size and index: only the contents differ
    os.utime(tmp_path / "c.bin", ns=(1, os.stat(tmp_path / "c.bin").st_mtime_ns + 10**9))
    assert megatron_dataset(str(tmp_path / "c")).vocab_size == 901 and scans == [3, 3]
