"""SFT end to end, from the config alone: `prepare --sft` data trained with data.format=sft (padded or
packed) gives the single process's losses in every layout, tp × cp and pp × cp on four ranks
included; and a Hugging Face model imported, fine-tuned on chat data and exported is loaded by
transformers, whose loss on an SFT sample (labels on the assistant tokens) equals ours."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from angelptm.cli import main
from angelptm.data import TokenFile
from angelptm.data.packing import SFTSampler
from angelptm.data.prepare import prepare
from angelptm.data.rows import IGNORE
from angelptm.distributed.parity import TINY_JOB, compare, run_layout, run_layouts
from angelptm.train.checkpoint import load_model

from hf_tokenizer_files import stdlib_text, write_tokenizer
from test_sft import QWEN25, SPECIAL_TOKENS, template_folder

TOLERANCE = 1e-4  # the project's layout parity rule


def chats(count: int, seed: int = 0) -> list[list[dict]]:
    """Multi-turn chats of long-tailed lengths cut from stdlib text (some longer than a row)."""
    rng, text = np.random.default_rng(seed), stdlib_text(100_000)
    out = []
    for _ in range(count):
        turns = []
        for _ in range(int(rng.integers(1, 3))):
            for role in ("user", "assistant"):
                start, length = int(rng.integers(0, len(text) - 200)), int(min(rng.pareto(1.5) * 6 + 2, 150))
                turns.append({"role": role, "content": text[start:start + length]})
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def byte_sft(tmp_path_factory):
    """A `prepare --sft` token file of 64 chats in the byte tokenizer's plain template."""
    folder = tmp_path_factory.mktemp("sft")
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats(64)))
    prepare([str(folder / "chats.jsonl")], "byte", str(folder / "tokens"), workers=1, sft=True)
    return folder / "tokens"


def sft_job(path, pack: bool) -> dict:
    data = {"source": "tokens", "path": str(path), "format": "sft", "pack": pack, "overlong": "truncate"}
    return {**TINY_JOB, "data": data, "optim": {"warmup_steps": 2},
            "train": {**TINY_JOB["train"], "steps": 6, "seq_len": 64}}


def test_packed_sft_matches_the_single_process_in_every_layout(byte_sft):
    job = sft_job(byte_sft, pack=True)
    reference = run_layout(job=job)
    layouts = [{"dp": 2}, {"tp": 2}, {"pp": 2}, {"cp": 2}, {"cp": 2, "cp_mode": "ulysses"}]
    for layout, result in zip(layouts, run_layouts(layouts, world_size=2, job=job)):
        loss_diff, weight_diff = compare(result, reference)
        assert loss_diff < TOLERANCE and weight_diff < TOLERANCE, (layout, loss_diff, weight_diff)
    assert reference.losses[-1] < reference.losses[0]


@pytest.mark.slow
def test_packed_sft_matches_the_single_process_on_four_ranks(byte_sft):
    job = sft_job(byte_sft, pack=True)
    reference = run_layout(job=job)
    layouts = [{"tp": 2, "cp": 2}, {"pp": 2, "cp": 2}, {"pp": 2, "cp": 2, "cp_mode": "ulysses"}]
    for layout, result in zip(layouts, run_layouts(layouts, world_size=4, job=job)):
        loss_diff, weight_diff = compare(result, reference)
        print(layout, f"loss {loss_diff:.1e} weights {weight_diff:.1e}")
        assert loss_diff < TOLERANCE and weight_diff < TOLERANCE, (layout, loss_diff, weight_diff)


def test_padded_sft_matches_the_single_process_under_dp_and_accumulation(byte_sft):
    """Padded rows hold very different numbers of loss tokens: the loss is their mean over the global batch."""
    job = sft_job(byte_sft, pack=False)
    reference = run_layout(job=job)
    accumulated = run_layout(job=job, overrides=["train.micro_batch=1"])
    dp2 = run_layout({"dp": 2}, world_size=2, job=job, overrides=["train.micro_batch=1"])
    for result in (accumulated, dp2):
        loss_diff, weight_diff = compare(result, reference)
        assert loss_diff < TOLERANCE and weight_diff < TOLERANCE, (loss_diff, weight_diff)


def test_import_sft_export_and_transformers_computes_the_same_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = write_tokenizer(tmp_path / "base", "bpe", bos_processor=False, added_special_tokens=SPECIAL_TOKENS)
    hf_dir = template_folder(base, tmp_path / "hf", QWEN25,
                             {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=640, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(hf_dir)
    assert main(["import-hf", str(hf_dir), str(tmp_path / "imported")]) == 0
    rows = chats(32, seed=1)
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in rows))
    assert main(["prepare", str(tmp_path / "chats.jsonl"), "--tokenizer", str(tmp_path / "imported" / "tokenizer"),
                 "--out", str(tmp_path / "tokens"), "--sft", "--workers", "1"]) == 0
    run = tmp_path / "run"
    settings = ["data.source=tokens", f"data.path={tmp_path / 'tokens'}", "data.format=sft", "data.pack=true",
                f"train.init_from={tmp_path / 'imported'}", f"train.output_dir={run}", "train.steps=3",
                "train.seq_len=96", "train.global_batch=4", "train.micro_batch=2", "train.sample_tokens=0",
                "optim.warmup_steps=0", "optim.lr=1e-2"]
    assert main(["train", str(tmp_path / "imported" / "config.yaml"), *sum((["--set", s] for s in settings), [])]) == 0
    assert main(["export-hf", str(run), str(tmp_path / "out")]) == 0

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    their_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    data = TokenFile(tmp_path / "tokens")
    sample = SFTSampler(data, 96, 1, seed=0).microbatch(0, 0, 1)
    length = int((sample.targets[0] != IGNORE).nonzero()[-1]) + 1  # the sample without its padding
    ids = sample.inputs[0, :length].tolist() + [int(sample.targets[0, length - 1])]
    matches = [c for c in rows
               if their_tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"][:length + 1] == ids]
    assert matches, "the sample's ids are no chat rendered by transformers' apply_chat_template"
    _, ours = load_model(run)
    with torch.no_grad():
        our_loss = F.cross_entropy(ours(sample.inputs[:, :length])[0], sample.targets[0, :length],
                                   ignore_index=IGNORE)
        labels = torch.tensor([[IGNORE] + sample.targets[0, :length].tolist()])
        their_loss = theirs(torch.tensor([ids]), labels=labels).loss
        generated = theirs.generate(torch.tensor([ids[:8]]), max_new_tokens=4, do_sample=False)
    assert abs(our_loss.item() - their_loss.item()) < 1e-5 * their_loss.item()
    assert generated[0, :8].tolist() == ids[:8] and generated.shape[1] > 8  # it continues (or ends the turn)
