"""Byte-level tokenizer: the UTF-8 bytes of a text are its tokens, plus BOS, EOS and PAD.

No vocabulary file and no unknown tokens: every text encodes, every id sequence decodes, and
decode(encode(text)) == text for any text.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch


class ByteTokenizer:
    """Ids 0..255 are bytes; 256, 257 and 258 are BOS, EOS and PAD."""

    name = "byte"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode_bytes(self, data: bytes, bos: bool = True, eos: bool = True) -> np.ndarray:
        """Token ids (uint16) of raw bytes, BOS first and EOS last; one numpy copy, no Python loop."""
        body = np.frombuffer(data, dtype=np.uint8)
        ids = np.empty(int(bos) + body.size + int(eos), dtype=np.uint16)
        ids[int(bos) : int(bos) + body.size] = body
        if bos:
            ids[0] = self.bos_id
        if eos:
            ids[-1] = self.eos_id
        return ids

    def encode_documents(self, texts: Sequence[Union[str, bytes]], starts: Optional[Sequence[bool]] = None,
                         ends: Optional[Sequence[bool]] = None) -> list[np.ndarray]:
        """Each text's ids as a document, BOS first and EOS last; a text that continues a document
        (`starts[i]` false) gets no BOS, one a later text continues (`ends[i]` false) no EOS."""
        return [self.encode_bytes(t if isinstance(t, bytes) else t.encode("utf-8", "surrogatepass"),
                                  starts is None or starts[i], ends is None or ends[i]) for i, t in enumerate(texts)]

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        # surrogatepass: a str holding a lone surrogate (as argv can on Linux) still encodes.
        return self.encode_bytes(text.encode("utf-8", "surrogatepass"), bos, eos).tolist()

    def decode(self, ids: Union[Sequence[int], np.ndarray, torch.Tensor]) -> str:
        """Text of `ids`; special ids are skipped and bytes that are not valid UTF-8 become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", "replace")
