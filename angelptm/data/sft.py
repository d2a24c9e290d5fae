"""SFT samples: chat rows rendered into token ids and a loss mask, with the tokenizer's own chat template.

A row is `{"messages": [{role, content}, ...]}` (multi-turn; the assistant messages are trained) or
`{"prompt": ..., "completion": ...}`: two strings (one user turn, one trained assistant turn) or two
lists of messages (the completion's messages are trained).

A Hugging Face tokenizer whose files hold a chat template (chat_template.jinja, else `chat_template`
in tokenizer_config.json) renders the conversation as transformers' `apply_chat_template` does: the
same sandboxed jinja2 environment (trim_blocks, lstrip_blocks, loopcontrols, `{% generation %}`,
`raise_exception`, `strftime_now`, transformers' `tojson`, `dict`, `namespace`), the special tokens
as variables, and the text tokenized without added special tokens, so the ids are equal.
A trained message's tokens are those whose text lies between the rendering of the conversation up
to it (with the generation prompt) and through it, both of which must begin the whole one (else the
template cannot be trained on, said in one line); a token holding characters of both sides of a
boundary is trained, as in transformers' assistant mask. The span keeps the turn's end token (<|eot_id|>, <|im_end|>) and leaves out the template's
whitespace after it, which the model never generates.

A tokenizer without a chat template renders PLAIN: BOS, then each message as "role: content" ("\\n"
after an untrained one, EOS after a trained one); prompt/completion strings are joined as they are,
BOS + prompt + completion + EOS.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Optional

import numpy as np

from angelptm.data.tokenizers import HFTokenizer, Tokenizer, _read_json
from angelptm.errors import UserError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers reads the first, copies the others
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class Conversation:
    """The messages of one row, which of them take the loss, and whether PLAIN shows their roles."""

    messages: list[dict]
    trained: list[int]
    roles_shown: bool = True


def _messages(value: Any, key: str) -> list[dict]:
    """Messages as transformers hands them to a template: keys whose value is null dropped, reasoning aliased."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"has {key} that is not a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"has {key}[{i}] without a string role (a message is {{\"role\": ..., \"content\": ...}})")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def conversation(record: Any) -> Conversation:
    """The conversation of one row; ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"is a JSON {type(record).__name__}, not an object")
    if record.get("messages") is not None:
        messages = _messages(record["messages"], "messages")
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not trained:
            raise ValueError("has no assistant message, so nothing to train on")
        return Conversation(messages, trained)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                            [1], roles_shown=False)
    if isinstance(prompt, list) and isinstance(completion, list):
        before, after = _messages(prompt, "prompt"), _messages(completion, "completion")
        return Conversation(before + after, list(range(len(before), len(before) + len(after))))
    raise ValueError("has neither messages (a list of {role, content}) nor prompt and completion "
                     "(two strings, or two lists of messages)")


def chat_template_source(tokenizer: Tokenizer) -> Optional[str]:
    """The tokenizer's own chat template (None: it has none), found where transformers looks for it."""
    if not isinstance(tokenizer, HFTokenizer):
        return None
    folder = tokenizer.path.parent
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = _read_json(folder / "tokenizer_config.json", "--tokenizer").get("chat_template")
    if isinstance(template, list):  # named templates: transformers renders the one named "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"--tokenizer {folder}: tokenizer_config.json has chat templates named "
                            f"{', '.join(map(str, named))} but none named default; name the one to train with default")
        template = named["default"]
    return template if isinstance(template, str) else None


def special_token_strings(tokenizer: HFTokenizer) -> dict[str, str]:
    """bos_token, eos_token, ... as transformers' `special_tokens_map` gives them to a template."""
    folder = tokenizer.path.parent
    config = _read_json(folder / "tokenizer_config.json", "--tokenizer")
    specials = _read_json(folder / "special_tokens_map.json", "--tokenizer")
    found = {}
    for name in SPECIAL_TOKEN_NAMES:
        for source in (config, specials):
            token = source.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                found[name] = token
                break
    return found


def compile_chat_template(source: str, now: datetime) -> Callable[..., str]:
    """`render(messages, add_generation_prompt)` of a template in transformers' jinja2 environment;
    `strftime_now` reads `now`, so every rendering of one sample sees the same date."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("rendering a chat template needs jinja2; pip install angelptm[data]") from None

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers also records where it is)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        """`dict(...)` without the attributes of the type itself, as transformers exposes it."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names, as transformers' does."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=now.strftime, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the tokenizer's chat template does not compile ({e}); fix its chat_template") from None

    def render(messages: list[dict], add_generation_prompt: bool, **variables) -> str:
        try:
            return template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except (jinja2.exceptions.TemplateError, TypeError) as e:  # raise_exception, or a message it cannot read
            raise ValueError(f"is refused by the chat template ({e})") from None

    return render


class SFTRenderer:
    """Rows to (ids int64, loss mask uint8) with `tokenizer`'s chat template, or PLAIN where it has none."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.template_source = chat_template_source(tokenizer)
        if self.template_source is not None:
            self._render = functools.partial(compile_chat_template(self.template_source, datetime.now()),
                                             **special_token_strings(tokenizer))
            self._backend = tokenizer._tokenizer  # the Rust tokenizer: its encodings carry character offsets
            self._special_ids = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
            self._where = f"the chat template of --tokenizer {tokenizer.path.parent}"
        digest = hashlib.sha256((self.template_source or "plain").encode()).hexdigest()[:16]
        self.identity = {"sft": "plain" if self.template_source is None else f"chat-template-{digest}"}

    def render(self, record: Any) -> tuple[np.ndarray, np.ndarray]:
        """The sample of one row: its ids and, per id, 1 where it is a trained (assistant) token.
        ValueError for a row that cannot be a sample, UserError for a template that cannot be trained on."""
        conv = conversation(record)
        if self.template_source is None:
            return self._render_plain(conv)
        return self._render_template(conv)

    def _render_template(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        whole = self._render(conv.messages, False)
        encoding = self._backend.encode(whole, add_special_tokens=False)  # as transformers tokenizes a chat
        ids = np.asarray(encoding.ids, dtype=np.int64)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(ids.size, dtype=np.uint8)
        for i in conv.trained:
            prompt = self._render(conv.messages[:i], conv.messages[i]["role"] == "assistant")
            through = self._render(conv.messages[:i + 1], False)
            if not (whole.startswith(through) and through.startswith(prompt)):
                raise UserError(f"{self._where} renders the conversation up to message {i} other than the start "
                                "of the whole one, so that message's tokens cannot be told apart; train with a "
                                "template whose rendering of a conversation begins with that of its first turns")
            lo, hi = len(prompt), len(through)
            # Every token holding a character of the message is trained, as transformers' assistant mask
            # marks them: one that also holds the header's last characters (" re" + "turn" merged into
            # " return") included.
            inside = np.flatnonzero((starts < hi) & (ends > lo))
            special = [j for j in inside if int(ids[j]) in self._special_ids]
            if special and not whole[ends[special[-1]]:hi].strip():  # the turn's end token, then whitespace
                inside = inside[inside <= special[-1]]
            mask[inside] = 1
        return ids, mask

    def _render_plain(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        pieces: list[tuple[str, bool]] = []  # (text, trained)
        for i, message in enumerate(conv.messages):
            content = message.get("content")
            if not isinstance(content, str):
                raise ValueError(f"has message {i} without string content (the tokenizer has no chat template, "
                                 "so messages are rendered as plain text)")
            trained = i in conv.trained
            if conv.roles_shown:
                pieces.append((f"{message['role']}: ", False))
            pieces.append((content, trained))
            if conv.roles_shown and not trained:
                pieces.append(("\n", False))
        tok = self.tokenizer
        head = tok.encode_documents([""], [True], [False])[0]  # BOS as the tokenizer begins a document
        encoded = tok.encode_documents([text for text, _ in pieces], [False] * len(pieces), [False] * len(pieces))
        eos = [] if tok.eos_id is None else [tok.eos_id]
        ids, mask = [np.asarray(head, dtype=np.int64)], [np.zeros(len(head), dtype=np.uint8)]
        for (_, trained), piece in zip(pieces, encoded):
            piece = np.concatenate([piece, eos]) if trained else piece
            ids.append(np.asarray(piece, dtype=np.int64))
            mask.append(np.full(len(piece), int(trained), dtype=np.uint8))
        return np.concatenate(ids), np.concatenate(mask)
