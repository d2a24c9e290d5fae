"""Hugging Face tokenizers: the same ids and special tokens as transformers' AutoTokenizer, and as the data source."""

import json
import os

import numpy as np
import pytest
from hf_tokenizer_files import stdlib_text, write_tokenizer
from transformers import AutoTokenizer

from conftest import one_line
from angelptm.config import DataConfig
from angelptm.data import build_dataset, load_tokenizer
from angelptm.errors import UserError

TEXTS = [
    "def foo(x):\n    return x + 1  # héllo 世界\n",
    "  leading spaces\n\n\nand blank lines\t\ttabs",
    "class A(object):\n    pass\n" * 20,
    "ünïcödé ✓ — émoji 🙂 and <s> written out",
    "x",
]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def folder(request, tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def test_ids_and_special_tokens_equal_transformers(folder):
    ours, theirs = load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.vocab_size == len(theirs)
    for text in TEXTS + [stdlib_text(5000)]:
        expected = theirs(text)["input_ids"]
        assert expected[0] == ours.bos_id  # the post-processor's BOS, added once
        assert ours.encode(text, bos=True, eos=False) == expected
        assert ours.encode(text, bos=False, eos=False) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True)
    # A document, as a token file holds it: the tokenizer's encoding, then EOS; one batch call for all.
    documents = ours.encode_documents(TEXTS)
    assert [d.tolist() for d in documents] == [theirs(t)["input_ids"] + [ours.eos_id] for t in TEXTS]


def test_tokenizer_json_path_reads_the_files_beside_it(folder):
    assert load_tokenizer(str(folder / "tokenizer.json")).name == load_tokenizer(str(folder)).name


@pytest.mark.parametrize("bos_processor", [True, False])
def test_add_bos_token_never_doubles_the_bos(tmp_path, bos_processor):
    folder = write_tokenizer(tmp_path / "t", "bpe", bos_processor=bos_processor,
                             config={"add_bos_token": True, "add_eos_token": False})
    tok = load_tokenizer(str(folder))
    ids = tok.encode_documents(["hello world"])[0].tolist()
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id and ids[-1] == tok.eos_id
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1


def test_special_ids_fall_back_to_generation_config(tmp_path):
    folder = write_tokenizer(tmp_path / "t", "bpe", bos_processor=False, config={"bos_token": None, "eos_token": None,
                                                                                  "pad_token": None})
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    tok = load_tokenizer(str(folder))
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.pad_id == 2  # <pad>: a well-known name in the vocabulary
    assert tok.encode_documents(["a b"])[0].tolist()[-1] == 1  # documents end with the first stop id


def test_document_pieces_get_bos_and_eos_once(folder):
    tok = load_tokenizer(str(folder))
    first, middle, last = tok.encode_documents(["ab\n", "cd\n", "ef"], [True, False, False], [False, False, True])
    assert first[0] == tok.bos_id and tok.eos_id not in first and tok.bos_id not in middle
    assert tok.eos_id not in middle and last[-1] == tok.eos_id and tok.bos_id not in last


@pytest.mark.parametrize("make", ["missing", "folder_without_json", "garbage"])
def test_bad_tokenizer_is_one_line_naming_the_key(tmp_path, make):
    path = tmp_path / "tok"
    if make == "folder_without_json":
        path.mkdir()
    elif make == "garbage":
        path.mkdir()
        (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        build_dataset(DataConfig(source="synthetic", tokenizer=str(path)), 32, 1000)
    assert one_line(str(e.value)).startswith("data.tokenizer=")


def test_text_source_is_tokenized_with_the_configured_tokenizer(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("ANGELPTM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {"a.txt": stdlib_text(3000), "b.txt": "x = 1\n" * 100}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    tok = load_tokenizer(str(folder))
    cfg = DataConfig(source="text", path=str(corpus), tokenizer=str(folder))
    dataset = build_dataset(cfg, 32, 1024)
    expected = np.concatenate(tok.encode_documents([texts["a.txt"], texts["b.txt"]]))
    np.testing.assert_array_equal(dataset.tokens, expected)
    assert dataset.tokenizer == tok.name
    byte_dataset = build_dataset(DataConfig(source="text", path=str(corpus)), 32, 1024)
    assert byte_dataset.name != dataset.name and len(byte_dataset) > len(dataset)  # its own cache
    with pytest.raises(UserError) as e:
        build_dataset(cfg, 32, tok.vocab_size - 1)
    assert f"set model.vocab_size={tok.vocab_size}" in one_line(str(e.value))


def test_token_file_from_another_tokenizer_is_refused(tmp_path, folder):
    """A token file keeps the name of the tokenizer that made it; training it under another
    data.tokenizer (the byte default included) would decode every sample as the wrong words."""
    from angelptm.data.prepare import prepare

    (tmp_path / "doc.txt").write_text(stdlib_text(3000))
    prepare([str(tmp_path / "doc.txt")], str(folder), str(tmp_path / "tokens"), workers=1,
            progress_stream=open(os.devnull, "w"))
    same = build_dataset(DataConfig(source="tokens", path=str(tmp_path / "tokens"), tokenizer=str(folder)), 32, 1024)
    assert same.tokenizer == load_tokenizer(str(folder)).name
    with pytest.raises(UserError) as e:
        build_dataset(DataConfig(source="tokens", path=str(tmp_path / "tokens")), 32, 1024)
    line = one_line(str(e.value))
    assert "was tokenized with another tokenizer" in line and "data.tokenizer=byte" in line
