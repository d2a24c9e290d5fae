"""SFT and packed samplers: any split of the global batch reads the same rows, resume is exact, a packing
plan holds every sample once per epoch, and positions, doc ids and targets stay inside each document."""

import json

import numpy as np
import pytest
import torch

from conftest import one_line
from angelptm.config import BlendSourceConfig, DataConfig
from angelptm.data import (ByteTokenizer, PackedSFTSampler, PackedTextSampler, SFTSampler, TokenFile, TokenSampler,
                           build_datasets, build_sampler, build_token_file)
from angelptm.data.packing import first_fit
from angelptm.data.prepare import prepare
from angelptm.data.rows import IGNORE
from angelptm.errors import UserError

SEQ, BATCH = 48, 8


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of long-tailed lengths, a few longer than SEQ + 1 tokens, some multi-turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        reply = "".join(rng.choice(list("abcdefgh "), size=int(rng.pareto(1.5) * 6) + 1))
        if i % 3:
            rows.append({"prompt": f"q{i}?", "completion": reply})
        else:
            rows.append({"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": reply},
                                      {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]})
    return rows


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    (folder / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(120)))
    prepare([str(folder / "chats.jsonl")], "byte", str(folder / "sft"), workers=1, sft=True)
    return folder / "sft"


def sft_sampler(prefix, pack: bool, overlong: str = "truncate", seed: int = 3, **cfg):
    data_cfg = DataConfig(source="tokens", path=str(prefix), format="sft", pack=pack, overlong=overlong, seed=seed,
                          **cfg)
    train, _ = build_datasets(data_cfg, SEQ, 259)
    return build_sampler(train, SEQ, BATCH, seed, data_cfg=data_cfg)


def text_dataset(tmp_path, docs=("alpha beta gamma\n" * 3, "x", "delta epsilon\n" * 5, "zeta eta theta\n" * 9)):
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    return build_token_file(sorted(tmp_path.glob("*.txt")), tmp_path / "tokens", ByteTokenizer())


def text_packed(dataset, seed=0):
    return build_sampler(dataset, 16, BATCH, seed, data_cfg=DataConfig(pack=True))


def same_rows(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in
               zip((a.inputs, a.targets, a.positions, a.doc_ids), (b.inputs, b.targets, b.positions, b.doc_ids)))


def cat(parts):
    return [None if parts[0][i] is None else torch.cat([p[i] for p in parts]) for i in range(4)]


@pytest.mark.parametrize("kind", ["sft", "sft-packed", "text-packed"])
def test_any_split_of_the_global_batch_reads_the_same_rows(kind, sft_prefix, tmp_path):
    sampler = text_packed(text_dataset(tmp_path)) if kind == "text-packed" else sft_sampler(sft_prefix, kind != "sft")
    for step in (0, 1, 9, 40):  # 40 steps: several epochs of every sampler here
        whole = sampler.microbatch(step, 0, BATCH)
        for split in ([4, 4], [1] * 8, [3, 5]):
            starts = np.cumsum([0] + split[:-1])
            parts = [sampler.microbatch(step, int(s), c) for s, c in zip(starts, split)]
            glued = cat([(p.inputs, p.targets, p.positions, p.doc_ids) for p in parts])
            assert same_rows(whole, type(whole)(*glued))
        assert whole.loss_tokens() > 0


@pytest.mark.parametrize("kind", ["sft", "sft-packed", "text-packed"])
def test_resume_reads_the_rows_the_run_would_have_read(kind, sft_prefix, tmp_path):
    dataset = text_dataset(tmp_path) if kind == "text-packed" else None
    make = (lambda: text_packed(dataset)) if dataset is not None else (lambda: sft_sampler(sft_prefix, kind != "sft"))
    first = make()
    expected = [first.microbatch(step, 0, BATCH) for step in range(30)]
    state = json.loads(json.dumps(first.state_dict(17)))
    resumed = make()
    step = resumed.load_state_dict(state)
    assert step == 17 and all(same_rows(resumed.microbatch(s, 0, BATCH), expected[s]) for s in range(17, 30))
    # The same data read another way: packed <-> unpacked.
    if dataset is None:
        reader, saved = sft_sampler(sft_prefix, pack=kind == "sft"), state
    else:
        reader, saved = resumed, TokenSampler(dataset, 16, BATCH, 0).state_dict(17)
    with pytest.raises(UserError) as error:
        reader.load_state_dict(saved)
    assert "set data.format, data.pack and data.overlong as the checkpoint had them" in one_line(str(error.value))


def test_pack_plan_holds_every_sample_once_per_epoch(sft_prefix):
    sampler = sft_sampler(sft_prefix, pack=True)
    samples = sampler.samples
    for epoch in (0, 1):
        plan = sampler.plan(epoch)
        members = np.concatenate(plan)
        assert sorted(members.tolist()) == list(range(len(samples.starts)))
        assert max(int((samples.lengths[row] - 1).sum()) for row in plan) <= SEQ
        # first-fit packs tightly: within 10% of the fewest rows that could hold these tokens
        assert len(plan) <= 1.1 * np.ceil((samples.lengths - 1).sum() / SEQ)
    assert [r for r in sampler.plan(0)] != [r for r in sampler.plan(1)]  # each epoch its own shuffle
    assert first_fit(np.array([3, 3, 2, 4]), np.arange(4), 6, window=1) == [[0, 1], [2, 3]]
    assert first_fit(np.array([5, 3, 1, 3]), np.arange(4), 6, window=2) == [[0, 2], [1, 3]]


def test_packed_rows_hold_the_unpacked_samples_exactly(sft_prefix):
    """Each document of a packed row is one sample's inputs and targets, as the unpacked sampler gives them;
    positions restart at each, doc ids step, the padding is its own document and takes no loss."""
    packed, unpacked = sft_sampler(sft_prefix, pack=True), sft_sampler(sft_prefix, pack=False)
    n = len(packed.samples.starts)
    reference = []
    for step in range(0, (n + BATCH - 1) // BATCH):  # epoch 0 of the unpacked sampler: every sample once
        rows = unpacked.microbatch(step, 0, BATCH)
        for inputs, targets in zip(rows.inputs, rows.targets):
            length = int((targets != IGNORE).nonzero().max()) + 1
            reference.append((tuple(inputs[:length].tolist()), tuple(targets[:length].tolist())))
    reference = reference[:n]
    found, loss_tokens = [], 0
    for number in range(len(packed.plan(0))):  # the rows of epoch 0, one at a time
        rows = packed.microbatch(number // BATCH, number % BATCH, 1)
        loss_tokens += rows.loss_tokens()
        doc_ids, positions = rows.doc_ids[0], rows.positions[0]
        assert bool((doc_ids[1:] >= doc_ids[:-1]).all()) and int(doc_ids[0]) == 0
        for doc in doc_ids.unique().tolist():
            where = (doc_ids == doc).nonzero().flatten()
            assert torch.equal(positions[where], torch.arange(len(where)))  # restart at each document
            inputs, targets = rows.inputs[0, where], rows.targets[0, where]
            if doc == int(doc_ids[-1]) and int(where[-1]) == SEQ - 1 and (targets == IGNORE).all():
                assert (inputs == packed.pad_id).all()  # the tail padding
                continue
            length = int((targets != IGNORE).nonzero().max()) + 1
            found.append((tuple(inputs[:length].tolist()), tuple(targets[:length].tolist())))
    assert sorted(found) == sorted(reference)
    assert loss_tokens == int(packed.samples.loss.sum())  # no trained token lost or added by packing
    assert packed.tokens_by_source(1) == {packed.dataset.name: packed.microbatch(0, 0, BATCH).loss_tokens()}


def test_unpacked_rows_pad_with_the_pad_id_and_train_only_assistant_tokens(sft_prefix):
    sampler = sft_sampler(sft_prefix, pack=False)
    rows = sampler.microbatch(0, 0, BATCH)
    assert rows.positions is None and rows.doc_ids is None and rows.inputs.shape == (BATCH, SEQ)
    tokenizer = ByteTokenizer()
    for inputs, targets in zip(rows.inputs, rows.targets):
        trained = targets[targets != IGNORE]
        assert "q" not in tokenizer.decode(trained) and ": " not in tokenizer.decode(trained)  # no prompt, no role
        end = int((inputs != tokenizer.pad_id).nonzero().max()) + 1
        assert (inputs[end:] == tokenizer.pad_id).all() and (targets[end:] == IGNORE).all()
        if end < SEQ:  # a whole sample: its reply's end is trained
            assert int(targets[end - 1]) == tokenizer.eos_id
    assert sampler.tokens_by_source(1) == {sampler.dataset.name: rows.loss_tokens()}


def test_overlong_samples_are_truncated_or_dropped_and_counted(sft_prefix):
    data = TokenFile(sft_prefix)
    lengths = np.diff(np.append(np.asarray(data.doc_offsets), len(data)))
    overlong = int((lengths > SEQ + 1).sum())
    assert overlong > 0
    truncated, dropped = sft_sampler(sft_prefix, True, "truncate"), sft_sampler(sft_prefix, True, "drop")
    assert truncated.overlong == dropped.overlong == overlong
    assert truncated.samples.lengths.max() == SEQ + 1 and dropped.samples.lengths.max() <= SEQ + 1
    assert len(dropped.samples.starts) == len(lengths) - overlong - dropped.samples.without_loss
    assert len(truncated.samples.starts) == len(lengths) - truncated.samples.without_loss
    assert f"{overlong:,} of {len(lengths):,} samples truncated to their first" in one_line(truncated.note())
    assert "dropped" in one_line(dropped.note()) and f"{overlong:,} of" in dropped.note()
    with pytest.raises(UserError, match="no sample of .* fits train.seq_len=2"):  # every sample is longer
        SFTSampler(data, 2, BATCH, 0, overlong="drop")


def test_packed_text_restarts_at_each_document_and_never_predicts_across(tmp_path):
    dataset = text_dataset(tmp_path)
    sampler, plain = text_packed(dataset), TokenSampler(dataset, 16, BATCH, 0)
    assert isinstance(sampler, PackedTextSampler)
    starts = set(dataset.doc_offsets)
    crossings = 0
    for step in range(4):
        rows, windows = sampler.microbatch(step, 0, BATCH), plain.rows(step, 0, BATCH)
        assert torch.equal(rows.inputs, windows[:, :-1])  # the same windows as without packing
        begins = sampler.window_starts(np.arange(step * BATCH, (step + 1) * BATCH))
        for row, begin in enumerate(begins.tolist()):
            doc_ids, positions, targets = rows.doc_ids[row], rows.positions[row], rows.targets[row]
            assert int(doc_ids[0]) == 0 and int(positions[0]) == 0
            for j in range(16):
                token = begin + j
                if token in starts:  # a document begins here: position 0, a new doc id
                    assert int(positions[j]) == 0 and (j == 0 or int(doc_ids[j]) == int(doc_ids[j - 1]) + 1)
                elif j:
                    assert int(positions[j]) == int(positions[j - 1]) + 1 and int(doc_ids[j]) == int(doc_ids[j - 1])
                if token + 1 in starts:  # the last token of a document predicts nothing
                    assert int(targets[j]) == IGNORE and int(rows.inputs[row, j]) == ByteTokenizer.eos_id
                    crossings += 1
                else:
                    assert int(targets[j]) == int(windows[row, j + 1])
    assert crossings > 0


def test_the_config_picks_the_sampler_and_refuses_what_cannot_work(sft_prefix, tmp_path):
    assert type(sft_sampler(sft_prefix, pack=False)) is SFTSampler
    assert type(sft_sampler(sft_prefix, pack=True)) is PackedSFTSampler
    dataset = text_dataset(tmp_path)
    assert type(build_sampler(dataset, 16, BATCH, 0)) is TokenSampler  # the existing signature, unchanged
    with pytest.raises(UserError) as error:  # text data has no mask to train SFT on
        build_datasets(DataConfig(source="tokens", path=str(tmp_path / "tokens"), format="sft"), 16, 259)
    assert "needs a token file written by `angelptm prepare --sft`" in one_line(str(error.value))
    blend = DataConfig(sources=[BlendSourceConfig(path=str(tmp_path / "tokens"))] * 2, pack=True)
    train, _ = build_datasets(blend, 16, 259)
    with pytest.raises(UserError) as error:
        build_sampler(train, 16, BATCH, 0, data_cfg=blend)
    assert "not a blend" in one_line(str(error.value))


def test_held_out_sft_samples_keep_their_masks(sft_prefix):
    data_cfg = DataConfig(source="tokens", path=str(sft_prefix), format="sft", valid_fraction=0.25)
    train, valid = build_datasets(data_cfg, SEQ, 259)
    whole, _ = build_datasets(DataConfig(source="tokens", path=str(sft_prefix), format="sft"), SEQ, 259)
    assert len(train.doc_offsets) + len(valid.doc_offsets) == len(whole.doc_offsets)
    total = int(np.asarray(whole.loss_mask).sum())
    parts = [int(np.asarray(d.loss_mask[np.arange(len(d))]).sum()) for d in (train, valid)]
    assert sum(parts) == total and min(parts) > 0
    for part in (train, valid):
        rows = build_sampler(part, SEQ, BATCH, 0, data_cfg=data_cfg).microbatch(0, 0, BATCH)
        assert rows.loss_tokens() > 0


@pytest.mark.parametrize("kind", ["sft", "sft-packed", "text-packed"])
def test_tokens_by_source_counts_the_targets_that_took_a_loss(kind, sft_prefix, tmp_path):
    sampler = text_packed(text_dataset(tmp_path)) if kind == "text-packed" else sft_sampler(sft_prefix, kind != "sft")
    trained = 0
    for step in range(21):  # past the end of an epoch for each: the count carries over epochs
        assert sampler.tokens_by_source(step) == {sampler.dataset.name: trained}
        trained += sampler.microbatch(step, 0, BATCH).loss_tokens()
