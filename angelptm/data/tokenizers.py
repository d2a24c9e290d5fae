"""Tokenizers by name: `byte` (built in) or a Hugging Face tokenizer folder or tokenizer.json, loaded with `tokenizers`.

A Hugging Face tokenizer's special tokens come from the files beside its tokenizer.json:
tokenizer_config.json (bos_token, eos_token, pad_token, add_bos_token, added_tokens_decoder), then
special_tokens_map.json, then generation_config.json (bos_token_id, eos_token_id, pad_token_id).
Ids match transformers' `AutoTokenizer`: a text is encoded without special tokens and then gets the
prefix and suffix the tokenizer's post-processor adds (e.g. Llama's BOS). A document, as written to
a token file, also ends with EOS (the document separator) and starts with BOS when
tokenizer_config.json says `add_bos_token` and the post-processor does not already add it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from angelptm.data.tokenizer import ByteTokenizer
from angelptm.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
# What import-hf keeps with the weights and export-hf writes back (those present).
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "chat_template.jinja")
# Names a bare tokenizer.json (no config beside it) uses for its special tokens, most common first.
_KNOWN_NAMES = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
    "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>"),
}

Tokenizer = Union[ByteTokenizer, "HFTokenizer"]


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the special-token convention of its files, ByteTokenizer's interface."""

    def __init__(self, tokenizer_json: Path, key: str = "data.tokenizer"):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = tokenizer_json
        try:
            raw = tokenizer_json.read_bytes()
            self._tokenizer = RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # OSError, bad UTF-8, and the plain Exception tokenizers raises on bad JSON
            raise UserError(f"{key}={tokenizer_json} is not a readable tokenizer.json ({type(e).__name__}); "
                            "pass a Hugging Face tokenizer folder or its tokenizer.json") from None
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        folder = tokenizer_json.parent
        config = _read_json(folder / "tokenizer_config.json", key)
        specials = _read_json(folder / "special_tokens_map.json", key)
        generation = _read_json(folder / "generation_config.json", key)
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        # Added tokens may leave gaps in the ids; the model must hold the largest one.
        self.vocab_size = max(self._tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self._prefix, self._suffix = self._post_processor_affixes()
        added = {str(v.get("content")): int(k) for k, v in (config.get("added_tokens_decoder") or {}).items()
                 if isinstance(v, dict)}
        ids = {}
        for role in ("bos", "eos", "pad"):
            ids[role] = self._special_id(role, config, specials, generation, added, vocab)
        self.bos_id: Optional[int] = ids["bos"]
        self.eos_id: Optional[int] = ids["eos"]
        self.pad_id: Optional[int] = ids["pad"] if ids["pad"] is not None else ids["eos"]
        # BOS the post-processor does not add but tokenizer_config.json asks for (never twice).
        self._extra_bos = ([self.bos_id] if config.get("add_bos_token") and self.bos_id is not None
                           and self.bos_id not in self._prefix else [])
        identity = hashlib.sha256(raw)
        identity.update(json.dumps([self._prefix, self._suffix, self._extra_bos, self.eos_id, self.pad_id]).encode())
        self.name = "hf-" + identity.hexdigest()[:16]

    def _post_processor_affixes(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a single text (found on a probe text)."""
        body = self._tokenizer.encode("a", add_special_tokens=False).ids
        full = self._tokenizer.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(body) + 1):
            if body and full[start:start + len(body)] == body:
                return full[:start], full[start + len(body):]
        return full, []

    def _special_id(self, role: str, config: dict, specials: dict, generation: dict, added: dict,
                    vocab: dict) -> Optional[int]:
        for source in (config, specials):
            token = source.get(f"{role}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                found = vocab.get(token, added.get(token))
                if found is not None:
                    return int(found)
        value = generation.get(f"{role}_token_id")
        if isinstance(value, list):  # e.g. an instruct model's several stop ids: the first is the document end
            value = value[0] if value else None
        if isinstance(value, int):
            return value
        if role == "bos" and self._prefix:
            return self._prefix[0]
        return next((vocab[name] for name in _KNOWN_NAMES[role] if name in vocab), None)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Ids of `text`: with `bos` as the tokenizer begins a text, with `eos` as it ends one, then EOS."""
        return self.encode_documents([text], [bos], [eos])[0].tolist()

    def encode_bytes(self, data: bytes, bos: bool = True, eos: bool = True) -> np.ndarray:
        """Ids of UTF-8 text (bytes that are not valid UTF-8 become U+FFFD)."""
        return self.encode_documents([data], [bos], [eos])[0]

    def encode_documents(self, texts: Sequence[Union[str, bytes]], starts: Optional[Sequence[bool]] = None,
                         ends: Optional[Sequence[bool]] = None) -> list[np.ndarray]:
        """Each text's ids (int64) as a document: begun as the tokenizer begins one, ended by EOS.

        A text that continues a document (`starts[i]` false) gets no prefix, one that a later text
        continues (`ends[i]` false) no suffix and no EOS. One batch call into the Rust tokenizer.
        """
        texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in texts]
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        head = np.asarray(self._extra_bos + self._prefix, dtype=np.int64)
        tail = list(self._suffix)
        if self.eos_id is not None and (not tail or tail[-1] != self.eos_id):
            tail.append(self.eos_id)
        tail = np.asarray(tail, dtype=np.int64)
        out = []
        for i, encoding in enumerate(encodings):
            parts = [np.asarray(encoding.ids, dtype=np.int64)]
            if starts is None or starts[i]:
                parts.insert(0, head)
            if ends is None or ends[i]:
                parts.append(tail)
            out.append(np.concatenate(parts))
        return out

    def decode(self, ids: Union[Sequence[int], np.ndarray, torch.Tensor]) -> str:
        """Text of `ids`, special tokens skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._tokenizer.decode(ids[(ids >= 0) & (ids < self.vocab_size)].tolist(), skip_special_tokens=True)

    def files(self) -> list[Path]:
        """The tokenizer's files that exist (tokenizer.json first)."""
        return [p for p in (self.path.parent / name for name in TOKENIZER_FILES) if p.is_file()]


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """The files that let `AutoTokenizer.from_pretrained` load `tokenizer` (name -> contents): its own,
    plus a tokenizer_config.json naming its special tokens where it had none. Empty for bytes."""
    if not isinstance(tokenizer, HFTokenizer):
        return {}
    files = {path.name: path.read_bytes() for path in tokenizer.files()}
    if "tokenizer_config.json" not in files:
        token = lambda i: None if i is None else tokenizer._tokenizer.id_to_token(i)  # noqa: E731
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(tokenizer.bos_id),
                  "eos_token": token(tokenizer.eos_id), "pad_token": token(tokenizer.pad_id)}
        files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
    return files


def _read_json(path: Path, key: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{key}: {path} is not readable JSON ({type(e).__name__}); restore it") from None
    return value if isinstance(value, dict) else {}


def tokenizer_json_path(spec: str, key: str = "data.tokenizer") -> Path:
    """The tokenizer.json that `spec` (a folder holding one, or the file itself) names."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_JSON
    if not path.is_file():
        raise UserError(f"{key}={spec} is neither byte nor a Hugging Face tokenizer folder (with {TOKENIZER_JSON}) "
                        f"or a {TOKENIZER_JSON} file; pass one of those")
    return path


def load_tokenizer(spec: str, key: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer `spec` names: `byte`, a Hugging Face tokenizer folder, or a tokenizer.json path."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(tokenizer_json_path(spec, key), key)
