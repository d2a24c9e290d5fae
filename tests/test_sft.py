"""SFT data: chat-template ids equal transformers' apply_chat_template, the loss mask covers exactly the
trained (assistant) tokens, and `prepare --sft` writes both from jsonl and parquet, bad rows refused in one line."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hf_tokenizer_files import write_tokenizer
from transformers import AutoTokenizer

from conftest import one_line
from angelptm.cli import main
from angelptm.data import TokenFile, load_tokenizer
from angelptm.data.builder import mask_path
from angelptm.data.prepare import prepare
from angelptm.data.sft import SFTRenderer
from angelptm.errors import UserError

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Exercises what transformers' environment adds: generation blocks, namespace, dict, loop controls, tojson
# with options, strftime_now and raise_exception.
CUSTOM = """{{ bos_token }}{% set ns = namespace(turns=0) %}{% set meta = dict(year=strftime_now('%Y')) %}
{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message.role) }}{% endif %}
    {% if message.role == 'system' %}### System {{ meta | tojson(indent=1) }}: {{ message.content }}
{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if message.role == 'assistant' %}### Bot {{ ns.turns }}:
{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}

    {% else %}### Human {{ ns.turns }}:
{{ message.content }}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}### Bot {{ ns.turns + 1 }}:
{% endif %}"""

TEMPLATES = {
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2.5": (QWEN25, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "custom": (CUSTOM, {"bos_token": "<s>", "eos_token": "</s>"}),
}
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
                  "<|im_end|>", "<|endoftext|>"]
CHATS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "system", "content": "Answer briefly.\n"},
     {"role": "user", "content": "def f(x):\n    return x  # héllo 世界"},
     {"role": "assistant", "content": " It returns x 🙂\n\n"},
     {"role": "user", "content": "and f(2)?"},
     {"role": "assistant", "content": "2."},
     {"role": "user", "content": "thanks"},
     {"role": "assistant", "content": "You're welcome."}],
]
TOOL_CHAT = [{"role": "user", "content": "weather in Paris?"},
             {"role": "assistant", "content": "",
              "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "{\"celsius\": 21}"},
             {"role": "assistant", "content": "21 °C, sunny."}]


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory):
    """A small byte-level BPE trained here, with the special tokens of the templates added."""
    return write_tokenizer(tmp_path_factory.mktemp("base"), "bpe", bos_processor=False,
                           added_special_tokens=SPECIAL_TOKENS)


def template_folder(base, where, template, config):
    """`base`'s tokenizer with `template` as its chat template, in tokenizer_config.json."""
    where.mkdir()
    shutil.copy(base / "tokenizer.json", where / "tokenizer.json")
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.update(config, chat_template=template, model_max_length=100_000)
    (where / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    return where


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def chat_folder(request, base_tokenizer, tmp_path_factory):
    """A tokenizer folder with one of TEMPLATES, in a folder named after it."""
    template, config = TEMPLATES[request.param]
    return template_folder(base_tokenizer, tmp_path_factory.mktemp("chat") / request.param, template, config)


def chats_for(folder):
    return CHATS + ([TOOL_CHAT] if folder.name == "qwen2.5" else [])


def test_chat_template_ids_equal_transformers(chat_folder):
    renderer, theirs = SFTRenderer(load_tokenizer(str(chat_folder))), AutoTokenizer.from_pretrained(chat_folder)
    assert renderer.template_source is not None
    for chat in chats_for(chat_folder):
        ids, mask = renderer.render({"messages": chat})
        assert ids.tolist() == list(theirs.apply_chat_template(chat, tokenize=True, return_dict=False))
        assert mask.shape == ids.shape and set(np.unique(mask)) <= {0, 1}


def masked_runs(ids, mask):
    """The runs of consecutive masked ids."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [ids[a:b].tolist() for a, b in zip(edges[::2], edges[1::2])]


def test_mask_covers_exactly_each_assistant_turn_and_its_end_token(chat_folder):
    renderer, theirs = SFTRenderer(load_tokenizer(str(chat_folder))), AutoTokenizer.from_pretrained(chat_folder)
    end = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "custom": "</s>"}[chat_folder.name]
    for chat in CHATS:
        ids, mask = renderer.render({"messages": chat})
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        if chat_folder.name == "llama3":  # its template trims each message
            replies = [r.strip() for r in replies]
        runs = [theirs.decode(run, skip_special_tokens=False) for run in masked_runs(ids, mask)]
        assert runs == [reply + end for reply in replies]  # no header, no role, no line break after the end token
        if chat_folder.name == "custom":  # its {% generation %} blocks give transformers' own assistant mask
            out = theirs.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            assert mask.tolist() == out["assistant_masks"]


def test_prompt_completion_is_one_user_and_one_assistant_turn(chat_folder):
    renderer = SFTRenderer(load_tokenizer(str(chat_folder)))
    as_messages = renderer.render({"messages": CHATS[0]})
    as_pair = renderer.render({"prompt": CHATS[0][0]["content"], "completion": CHATS[0][1]["content"]})
    assert all(np.array_equal(a, b) for a, b in zip(as_messages, as_pair))
    # Lists of messages: the same rendering, and only the completion's messages are trained.
    listed = renderer.render({"prompt": CHATS[1][:6], "completion": CHATS[1][6:]})
    whole = renderer.render({"messages": CHATS[1]})
    assert np.array_equal(listed[0], whole[0])
    assert masked_runs(*listed) == masked_runs(*whole)[-1:]


@pytest.mark.parametrize("spec", ["byte", "hf"])
def test_plain_template_without_a_chat_template(spec, base_tokenizer):
    tokenizer = load_tokenizer("byte" if spec == "byte" else str(base_tokenizer))
    renderer = SFTRenderer(tokenizer)
    assert renderer.template_source is None
    ids, mask = renderer.render({"prompt": "Q: 2+2=", "completion": " 4"})
    head = tokenizer.encode_documents([""], [True], [False])[0].tolist()
    prompt = tokenizer.encode("Q: 2+2=", bos=False, eos=False)
    if spec == "hf":  # encode(eos=False) still ends with EOS, the document end; the prompt has none
        prompt = prompt[:-1]
    assert ids.tolist()[:len(head) + len(prompt)] == head + prompt and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[mask == 1]) == " 4" and mask[-1] == 1 and mask[:len(head) + len(prompt)].sum() == 0
    ids, mask = renderer.render({"messages": CHATS[1]})
    text = tokenizer.decode(ids)
    assert text.startswith("system: Answer briefly.\n\nuser: def f(x)") and "assistant: 2.user: thanks\n" in text
    assert tokenizer.decode(ids[mask == 1]) == "".join(m["content"] for m in CHATS[1] if m["role"] == "assistant")


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": "hi"}, "not a non-empty list"),
    ({"messages": [{"content": "hi"}]}, "without a string role"),
    ({"text": "hi"}, "neither messages"),
    (["hi"], "not an object"),
])
def test_bad_rows_say_what_is_wrong(record, reason):
    with pytest.raises(ValueError, match=reason):
        SFTRenderer(load_tokenizer("byte")).render(record)


def test_a_template_whose_prefixes_differ_is_refused_in_one_line(base_tokenizer, tmp_path):
    counting = "{{ messages | length }} turns\n{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    folder = template_folder(base_tokenizer, tmp_path / "t", counting, {})
    with pytest.raises(UserError) as error:
        SFTRenderer(load_tokenizer(str(folder))).render({"messages": CHATS[0]})
    assert "other than the start of the whole one" in one_line(str(error.value))


def write_rows(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_prepare_sft_writes_each_sample_and_its_mask(suffix, chat_folder, tmp_path, capsys):
    rows = [{"messages": chat} for chat in CHATS] * 3
    write_rows(tmp_path / f"chats{suffix}", rows)
    code = main(["prepare", str(tmp_path / f"chats{suffix}"), "--tokenizer", str(chat_folder), "--out",
                 str(tmp_path / "sft"), "--sft", "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 0
    renderer = SFTRenderer(load_tokenizer(str(chat_folder)))
    samples = [renderer.render(row) for row in rows]
    data = TokenFile(tmp_path / "sft")
    assert np.array_equal(data.tokens, np.concatenate([ids for ids, _ in samples]))
    assert np.array_equal(data.loss_mask, np.concatenate([mask for _, mask in samples]))
    assert data.doc_offsets == np.cumsum([0] + [len(ids) for ids, _ in samples[:-1]]).tolist()  # a sample per document
    loss = sum(int(mask.sum()) for _, mask in samples)
    assert f"{len(rows)} samples, {len(data)} tokens, {loss} loss tokens" in out
    assert data.pad_id == load_tokenizer(str(chat_folder)).pad_id


def test_prepare_sft_names_the_bad_line_or_row_and_skips_it_when_asked(tmp_path, capsys):
    good = {"prompt": "a", "completion": "b"}
    (tmp_path / "chats.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "a"}) + "\n")
    write_rows(tmp_path / "chats.parquet", [good, {"prompt": "a", "completion": None}])
    for name, where in (("chats.jsonl", "line 3"), ("chats.parquet", "row 2")):
        out = tmp_path / f"out-{where}"
        with pytest.raises(UserError) as error:
            prepare([str(tmp_path / name)], "byte", str(out), workers=1, sft=True)
        assert f"{tmp_path / name}: {where} has neither messages" in one_line(str(error.value))
        assert not list(tmp_path.glob(f"out-{where}*"))  # nothing written
        summary = prepare([str(tmp_path / name)], "byte", str(out), workers=1, sft=True, skip_bad=True)
        assert "1 samples" in summary and "skipped 1 bad" in summary
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is not a .jsonl"):  # an SFT sample is a row, not a file
        prepare([str(tmp_path / "notes.txt")], "byte", str(tmp_path / "out"), sft=True)
    write_rows(tmp_path / "texts.parquet", [{"text": "x"}])
    with pytest.raises(UserError, match="neither a messages column nor prompt and completion"):
        prepare([str(tmp_path / "texts.parquet")], "byte", str(tmp_path / "out"), sft=True)


def test_a_template_refusal_names_the_line(base_tokenizer, tmp_path):
    folder = template_folder(base_tokenizer, tmp_path / "t", CUSTOM, {"bos_token": "<s>", "eos_token": "</s>"})
    write_rows(tmp_path / "chats.jsonl", [{"messages": CHATS[0]}, {"messages": CHATS[0] + [
        {"role": "critic", "content": "meh"}]}])
    with pytest.raises(UserError) as error:
        prepare([str(tmp_path / "chats.jsonl")], str(folder), str(tmp_path / "out"), workers=1, sft=True)
    assert "chats.jsonl: line 2 is refused by the chat template (unknown role critic)" in one_line(str(error.value))


def test_a_damaged_mask_is_refused_on_open(tmp_path):
    write_rows(tmp_path / "chats.jsonl", [{"prompt": "a", "completion": "b"}])
    prepare([str(tmp_path / "chats.jsonl")], "byte", str(tmp_path / "sft"), workers=1, sft=True)
    mask = mask_path(tmp_path / "sft")
    mask.write_bytes(bytes(len(mask.read_bytes())))
    with pytest.raises(UserError, match="does not match the checksum"):
        TokenFile(tmp_path / "sft")
    mask.unlink()
    with pytest.raises(UserError, match="is missing"):
        TokenFile(tmp_path / "sft")


@pytest.mark.parametrize("where", ["chat_template.jinja", "named"])
def test_the_template_is_found_where_transformers_finds_it(where, base_tokenizer, tmp_path):
    folder = template_folder(base_tokenizer, tmp_path / "t", None, TEMPLATES["llama3"][1])
    if where == "named":  # several templates: the one named default is the chat template
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = [{"name": "tool_use", "template": QWEN25}, {"name": "default", "template": LLAMA3}]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (folder / where).write_text(LLAMA3)
    tokenizer = load_tokenizer(str(folder))
    ids, _ = SFTRenderer(tokenizer).render({"messages": CHATS[1]})
    theirs = AutoTokenizer.from_pretrained(folder)
    assert ids.tolist() == list(theirs.apply_chat_template(CHATS[1], tokenize=True, return_dict=False))
    if where == "chat_template.jinja":  # kept with the weights by import-hf, written back by export-hf
        assert folder / where in tokenizer.files()


def test_a_token_across_a_turn_boundary_is_trained_as_transformers_marks_it(base_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    glued = ("{% for m in messages %}{% if m.role == 'assistant' %} re{% generation %}{{ m.content }}{% endgeneration %}"
             "{% else %}q: {{ m.content }}{% endif %}\n{% endfor %}"
             "{% if add_generation_prompt %} re{% endif %}")  # the reply "turn x" joins its header into " return"
    folder = template_folder(base_tokenizer, tmp_path / "t", glued, {})
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "turn x"}]
    ids, mask = SFTRenderer(load_tokenizer(str(folder))).render({"messages": chat})
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids.tolist() == theirs["input_ids"] and mask.tolist() == theirs["assistant_masks"]
    glued_token = AutoTokenizer.from_pretrained(folder).convert_ids_to_tokens(int(ids[mask.argmax()]))
    assert glued_token.startswith("Ġre"), glued_token  # the header's " re" and the reply's "turn" in one token
