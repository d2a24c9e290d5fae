"""Small Hugging Face tokenizer folders for tests, trained here with `tokenizers` on stdlib text (no download)."""

import json
import sysconfig
from pathlib import Path

from tokenizers import SentencePieceBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<s>", "</s>", "<pad>"]


def stdlib_text(limit: int = 200_000) -> str:
    """About `limit` characters of this Python's standard library, always the same ones."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(chunks)[:limit]


def _train_bpe(text: str, vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return tokenizer


def _train_sentencepiece(text: str, vocab_size: int) -> Tokenizer:
    """A SentencePiece-style BPE: NFKC, Metaspace (▁ for spaces), an unknown token."""
    sp = SentencePieceBPETokenizer(unk_token="<unk>")
    sp.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], vocab_size=vocab_size,
                           special_tokens=["<unk>"] + SPECIALS, show_progress=False)
    return sp._tokenizer


def write_tokenizer(folder: Path, kind: str = "bpe", vocab_size: int = 600, bos_processor: bool = True,
                    config: dict | None = None, added_special_tokens: tuple[str, ...] = ()) -> Path:
    """A tokenizer folder as save_pretrained writes it: tokenizer.json + tokenizer_config.json.

    With `bos_processor` the post-processor puts <s> before every text, as Llama's does;
    `added_special_tokens` (a chat template's markers) follow the trained vocabulary.
    """
    text = stdlib_text()
    tokenizer = _train_bpe(text, vocab_size) if kind == "bpe" else _train_sentencepiece(text, vocab_size)
    tokenizer.add_special_tokens(list(added_special_tokens))
    if bos_processor:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "pad_token": "<pad>", "model_max_length": 64}
    if kind != "bpe":
        settings["unk_token"] = "<unk>"
    settings.update(config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder
