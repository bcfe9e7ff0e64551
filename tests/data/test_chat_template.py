"""Chat templates render exactly as `transformers` does, mark the assistant answers, and are sandboxed.

Every comparison loads a real `transformers` tokenizer from a directory written here (a byte-level
`tokenizer.json` and a `tokenizer_config.json` holding the template): nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
from pathlib import Path

import pytest

from viaduct.config import ConfigError
from viaduct.data.sft.chat import ChatTemplate, ChatTemplateError
from viaduct.data.tokenizers import build_tokenizer
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.training.config.tokenizer import TokenizerConfig

transformers = pytest.importorskip("transformers")

# Meta-Llama-3-8B-Instruct's template, as published.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 3.2's template (tools as JSON in the first user message, today's date, single tool calls).
LLAMA32 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501 - the published text, long lines included

# Qwen2.5-Instruct's template: ChatML, a default system prompt, tools and tool calls in tojson.
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
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
"""  # noqa: E501 - the published text, long lines included

# Llama 2 chat: strict user/assistant alternation through raise_exception, no generation prompt.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# ChatML whose answers are marked with {% generation %} (as SmolLM3 / TRL templates do).
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIAL += ["<|im_start|>", "<|im_end|>", "<s>", "</s>"]
TOKENS = {
    LLAMA3: {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    LLAMA32: {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    QWEN25: {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
    LLAMA2: {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": {"__type": "AddedToken", "content": "<s>"},
    },
    CHATML_GENERATION: {"eos_token": "<|im_end|>"},
}

SYSTEM = {"role": "system", "content": "You are terse."}
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? Answer in a sentence."},
    {"role": "assistant", "content": "It is 6, ünïcode and all."},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,  # dropped before rendering, as transformers does
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 C."},
]


def _byte_level_tokenizer_json(path: Path) -> None:
    """A tokenizer.json with one token per byte plus the special tokens: offsets are characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path))


def _hf_dir(path: Path, template: object = None, *, jinja: str | None = None, **tokens: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _byte_level_tokenizer_json(path / "tokenizer.json")
    config: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return path


def _hf_cfg(path: Path | str, **kw: object) -> TokenizerConfig:
    return TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(path), **kw)  # type: ignore[arg-type]


def _transformers(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _answers(template: ChatTemplate, messages, **kw) -> list[str]:
    pieces = template.segments(messages, **kw)
    assert "".join(text for text, _ in pieces) == template.render(messages, **kw)
    assert all(text for text, _ in pieces)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(pieces))  # adjacent pieces alternate
    return [text for text, answer in pieces if answer]


# ---------------------------------------------------------------------- rendering


CASES = {
    "llama3": (LLAMA3, None),
    "llama32": (LLAMA32, None),
    "llama32-tools": (LLAMA32, [WEATHER]),
    "qwen25": (QWEN25, None),
    "qwen25-tools": (QWEN25, [WEATHER]),
    "llama2": (LLAMA2, None),
    "generation": (CHATML_GENERATION, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_render_matches_transformers(tmp_path, name):
    text, tools = CASES[name]
    path = _hf_dir(tmp_path / name, text, **TOKENS[text])
    ours = ChatTemplate.from_config(_hf_cfg(path))
    assert ours is not None and ours.source == str(path / "tokenizer_config.json")
    hf = _transformers(path)
    conversations = [CHAT[:1], CHAT[:2], CHAT, [SYSTEM, *CHAT[:1]], [SYSTEM, *CHAT]]
    if tools is not None or name.startswith("qwen"):
        conversations += [TOOL_CHAT, TOOL_CHAT[:3]]
    n = 0
    for messages in conversations:
        for add in (False, True):
            expected = hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add, tools=tools
            )
            assert ours.render(messages, add_generation_prompt=add, tools=tools) == expected
            n += 1
    assert n == len(conversations) * 2


def test_special_tokens_come_from_the_directory_as_transformers_reads_them(tmp_path):
    template = "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ image_token }}|"
    path = _hf_dir(
        tmp_path / "t",
        template,
        bos_token={"__type": "AddedToken", "content": "<s>", "lstrip": False},
        eos_token="</s>",
        pad_token=None,
        image_token="<|im_start|>",  # a model-specific token: transformers passes it too
    )
    (path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<|eot_id|>"}))
    ours = ChatTemplate.from_config(_hf_cfg(path))
    assert ours is not None
    assert ours.special_tokens == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<|eot_id|>",
        "image_token": "<|im_start|>",
    }
    expected = _transformers(path).apply_chat_template(CHAT, tokenize=False)
    assert ours.render(CHAT) == expected == "<s>|</s>|<|eot_id|>||<|im_start|>|"
    # from_pretrained keyword arguments override the files, for transformers and here alike.
    kw = {"eos_token": "<|end_of_text|>"}
    over = ChatTemplate.from_config(_hf_cfg(path, hf_tokenizer_kwargs=kw))
    assert over is not None and over.special_tokens["eos_token"] == "<|end_of_text|>"
    assert over.render(CHAT) == transformers.AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, **kw
    ).apply_chat_template(CHAT, tokenize=False)


def test_message_data_is_handed_over_as_transformers_does(tmp_path):
    from transformers.utils import chat_template_utils

    if not hasattr(chat_template_utils, "_alias_reasoning_fields"):
        pytest.skip("this transformers predates the plain-data hand-over and reasoning aliases")
    # None values are dropped, reasoning is aliased, non-JSON objects become placeholders.
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.content }}|{{ m.thinking }}|{{ m.reasoning_content }}|"
        "{{ m.extra }}|{{ 'name' in m }};{% endfor %}"
    )
    path = _hf_dir(tmp_path / "t", template)
    messages = [
        {"role": "user", "content": "q", "name": None, "extra": object()},
        {"role": "assistant", "content": "a", "reasoning": "because", "extra": (1, 2.5, True)},
    ]
    ours = ChatTemplate.from_config(_hf_cfg(path))
    assert ours is not None
    assert ours.render(messages) == _transformers(path).apply_chat_template(messages, tokenize=False)
    assert messages[0]["name"] is None and "thinking" not in messages[1]  # the caller's data is untouched


def test_template_file_variants(tmp_path):
    # chat_template.jinja wins over tokenizer_config.json (as in transformers).
    path = _hf_dir(tmp_path / "jinja", "IGNORED", jinja=QWEN25, eos_token="<|im_end|>")
    ours = ChatTemplate.from_config(_hf_cfg(path))
    assert ours is not None and ours.source == str(path / "chat_template.jinja") and ours.text == QWEN25
    assert ours.render(CHAT, add_generation_prompt=True) == _transformers(path).apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    # A list of named templates: "default" is the one used.
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": LLAMA3}]
    path = _hf_dir(tmp_path / "named", named, bos_token="<|begin_of_text|>")
    ours = ChatTemplate.from_config(_hf_cfg(path / "tokenizer.json"))  # the file inside the directory
    assert ours is not None and ours.text == LLAMA3 and "tokenizer_config.json" in ours.source
    assert ours.render(CHAT) == _transformers(path).apply_chat_template(CHAT, tokenize=False)
    # tokenizer.chat_template wins over the directory's; its special tokens still come from there.
    ours = ChatTemplate.from_config(_hf_cfg(path, chat_template="{{ bos_token }}{{ messages[0].content }}"))
    assert ours is not None and ours.source == "tokenizer.chat_template"
    assert ours.render(CHAT) == "<|begin_of_text|>What is 2+2?"


def test_no_template_is_none_and_bad_files_are_errors(tmp_path):
    assert ChatTemplate.from_config(_hf_cfg(_hf_dir(tmp_path / "none"))) is None
    assert ChatTemplate.from_config(_hf_cfg("org/not-downloaded")) is None
    assert ChatTemplate.from_config(TokenizerConfig(tokenizer_type="ByteLevelTokenizer")) is None
    given = ChatTemplate.from_config(
        TokenizerConfig(tokenizer_type="ByteLevelTokenizer", chat_template=LLAMA3)
    )
    assert given is not None and given.special_tokens == {}

    path = _hf_dir(tmp_path / "nodefault", [{"name": "a", "template": "x"}, {"name": "b", "template": "y"}])
    with pytest.raises(ChatTemplateError, match="none is named 'default'") as exc:
        ChatTemplate.from_config(_hf_cfg(path))
    assert str(path / "tokenizer_config.json") in exc.value.problems[0].path
    path = _hf_dir(tmp_path / "wrongtype", 42)
    with pytest.raises(ChatTemplateError, match="must be a string or a list"):
        ChatTemplate.from_config(_hf_cfg(path))
    path = _hf_dir(tmp_path / "badjson")
    (path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        ChatTemplate.from_config(_hf_cfg(path))
    path = _hf_dir(tmp_path / "badtoken", "x", eos_token=["</s>"])
    with pytest.raises(ChatTemplateError, match="eos_token"):
        ChatTemplate.from_config(_hf_cfg(path))
    # A syntax error in the directory's template names the file and the line.
    path = _hf_dir(tmp_path / "syntax", jinja="{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ChatTemplateError) as exc:
        ChatTemplate.from_config(_hf_cfg(path))
    problem = exc.value.problems[0]
    assert problem.path == str(path / "chat_template.jinja") and "line 2" in problem.message
    assert isinstance(exc.value, ValueError)


# ---------------------------------------------------------------------- segments


def test_segments_by_prefix_mark_answers_and_their_turn_ends():
    llama3 = ChatTemplate(LLAMA3, special_tokens={"bos_token": "<|begin_of_text|>"})
    contents = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert _answers(llama3, CHAT) == [c + "<|eot_id|>" for c in contents]
    assert _answers(llama3, [SYSTEM, *CHAT]) == [c + "<|eot_id|>" for c in contents]
    assert _answers(llama3, CHAT[:3]) == [contents[0] + "<|eot_id|>"]  # ends on a user turn
    assert _answers(llama3, CHAT[:1]) == []
    first = llama3.segments([SYSTEM, *CHAT])[0][0]
    assert first.startswith("<|begin_of_text|><|start_header_id|>system") and first.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )

    qwen = ChatTemplate(QWEN25)
    assert _answers(qwen, CHAT) == [c + "<|im_end|>\n" for c in contents]
    tool_answers = _answers(qwen, TOOL_CHAT, tools=[WEATHER])
    assert tool_answers[0].startswith("<tool_call>\n") and tool_answers[0].endswith(
        "</tool_call><|im_end|>\n"
    )
    assert tool_answers[1] == "Sunny and 21 C.<|im_end|>\n"
    assert not any("sunny, 21 C" in a for a in tool_answers)  # the tool's output is not an answer

    llama2 = ChatTemplate(LLAMA2, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    assert _answers(llama2, CHAT) == [f" {c} </s>" for c in contents]

    llama32 = ChatTemplate(LLAMA32, special_tokens={"bos_token": "<|begin_of_text|>"})
    assert _answers(llama32, [SYSTEM, *CHAT], tools=[WEATHER]) == [c + "<|eot_id|>" for c in contents]


def test_segments_use_generation_blocks_like_transformers(tmp_path):
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ChatTemplate(CHATML_GENERATION)
    assert template.has_generation_blocks and not ChatTemplate(QWEN25).has_generation_blocks
    for messages in (CHAT, [SYSTEM, *CHAT], CHAT[:3], [CHAT[1]]):
        rendered, indices = render_jinja_template(
            conversations=[messages], chat_template=CHATML_GENERATION, return_assistant_tokens_mask=True
        )
        spans, pos = [], 0
        for text, answer in template.segments(messages):
            if answer:
                spans.append((pos, pos + len(text)))
            pos += len(text)
        assert spans == [tuple(s) for s in indices[0]] and pos == len(rendered[0])
    # The token mask transformers computes from its spans is the one these segments give.
    path = _hf_dir(tmp_path / "gen", CHATML_GENERATION)
    hf = _transformers(path)
    out = hf.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    offsets = hf(template.render(CHAT), add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    answer_chars, pos = set(), 0
    for text, answer in template.segments(CHAT):
        if answer:
            answer_chars.update(range(pos, pos + len(text)))
        pos += len(text)
    mask = [int(any(c in answer_chars for c in range(a, b))) for a, b in offsets]
    assert mask == out["assistant_masks"] and sum(mask) > 0


def test_generation_blocks_inside_a_macro_are_located():
    # Output built inside a macro is not streamed; the answers are still found exactly.
    template = ChatTemplate(
        "{% macro turn(m) %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</a>"
        "{% endgeneration %}{% else %}{{ m.content }}</u>{% endif %}{% endmacro %}"
        "{% for m in messages %}{{ turn(m) }}{% endfor %}"
    )
    assert _answers(template, CHAT) == ["4</a>", "It is 6, ünïcode and all.</a>"]
    # A generation block whose output is cut afterwards cannot be located: an error, not a guess.
    cut = ChatTemplate(
        "{% for m in messages %}{% set t %}{% generation %}{{ m.content }}{% endgeneration %}{% endset %}"
        "{{ t[:2] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="generation"):
        cut.segments(CHAT)
    # Answers that contain the characters markers could use do not confuse the marking.
    odd = [{"role": "user", "content": "\U000f0000"}, {"role": "assistant", "content": "\U000f0001x"}]
    assert _answers(ChatTemplate(CHATML_GENERATION), odd) == ["\U000f0001x<|im_end|>"]


def test_segments_refuse_a_template_that_does_not_render_turn_by_turn():
    # Like Qwen3, which shows the reasoning of the last answer only.
    template = ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and loop.last %}<think>..."
        "</think>{% endif %}{{ m.content }}</>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert _answers(template, CHAT[:2]) == ["<think>...</think>4</>"]  # one answer: consistent
    with pytest.raises(ChatTemplateError) as exc:
        template.segments(CHAT)
    problem = exc.value.problems[0]
    assert "turn by turn" in problem.message and "message 1" in problem.message
    assert "{% generation %}" in problem.fix and "input/output" in problem.fix


def test_raise_exception_is_a_chat_template_error(tmp_path):
    bad = [CHAT[0], CHAT[0]]
    path = _hf_dir(tmp_path / "llama2", LLAMA2, bos_token="<s>", eos_token="</s>")
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        _transformers(path).apply_chat_template(bad, tokenize=False)
    template = ChatTemplate.from_config(_hf_cfg(path))
    assert template is not None
    for call in (template.render, template.segments):
        with pytest.raises(ChatTemplateError) as exc:
            call(bad)
        message = exc.value.problems[0].message
        assert "refused" in message and "Conversation roles must alternate" in message
        assert "template line 1" in message and exc.value.problems[0].path.endswith("tokenizer_config.json")
        assert exc.value.__cause__ is None and exc.value.__suppress_context__  # no Jinja traceback
    with pytest.raises(ChatTemplateError, match="template line 3: oops"):
        ChatTemplate("a\nb\n{{ raise_exception('oops') }}").render(CHAT)


def test_segments_keep_one_date_across_their_renders():
    # Every turn is stamped to the microsecond: renders that read different clocks would disagree.
    template = ChatTemplate(
        "{% for m in messages %}{{ m.role }} {{ strftime_now('%H:%M:%S.%f') }}: {{ m.content }};{% endfor %}"
        "{% if add_generation_prompt %}assistant {{ strftime_now('%H:%M:%S.%f') }}: {% endif %}"
    )
    pieces = template.segments(CHAT)
    assert [text for text, answer in pieces if answer] == ["4;", "It is 6, ünïcode and all.;"]
    stamps = re.findall(r"\d\d:\d\d:\d\d\.\d+", "".join(text for text, _ in pieces))
    assert len(stamps) == 4 and len(set(stamps)) == 1


# ---------------------------------------------------------------------- sandbox

HOSTILE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ dict.__class__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{% set x = messages.append(1) %}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ messages.clear() }}",
    "{% set ns = namespace(__dict__=1) %}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ 'a' * 10**10 }}",
    "{{ [1] * 10**10 }}",
    "{{ (10 ** 10) ** (10 ** 10) }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{% include 'x.html' %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ 1 / 0 }}",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_templates_fail_cleanly(text):
    messages = [dict(m) for m in CHAT]
    with pytest.raises(ChatTemplateError) as exc:
        ChatTemplate(text).render(messages)
    assert isinstance(exc.value, ValueError)
    assert exc.value.problems[0].path == "tokenizer.chat_template" and exc.value.problems[0].fix
    assert exc.value.__suppress_context__
    assert messages == CHAT  # nothing was changed


def test_syntax_errors_are_found_when_loading():
    with pytest.raises(ChatTemplateError) as exc:
        ChatTemplate("{% for m in messages %}\n{{ m.content }}\n{% endfor", source="my.jinja")
    problem = exc.value.problems[0]
    assert problem.path == "my.jinja" and "line 3" in problem.message and "{% endfor" in problem.message
    assert "my.jinja" in str(exc.value)
    ChatTemplate(LLAMA3).check()


# ---------------------------------------------------------------------- configuration


def test_chat_template_is_checked_when_the_config_is_validated():
    cfg = tiny_gpt_pretrain_config()
    cfg.tokenizer.chat_template = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    with pytest.raises(ConfigError) as exc:
        cfg.validate()
    [problem] = [p for p in exc.value.problems if p.path == "tokenizer.chat_template"]
    assert "line 2" in problem.message and "tokenizer.chat_template" in (problem.fix or "")

    cfg = tiny_gpt_pretrain_config()
    cfg.tokenizer.chat_template = "   "
    with pytest.raises(ConfigError, match="is empty"):
        cfg.validate()

    cfg = tiny_gpt_pretrain_config()
    cfg.tokenizer.chat_template = QWEN25
    cfg.validate()


def test_a_chat_template_no_longer_stops_a_tokenizer_from_building():
    tok = build_tokenizer(TokenizerConfig(tokenizer_type="ByteLevelTokenizer", chat_template=LLAMA3))
    assert tok.tokenize("hi")


def test_a_template_pickles_and_hashes():
    # DataLoader workers receive the dataset, template included, by pickling.
    template = ChatTemplate(LLAMA3, "x/tokenizer_config.json", {"bos_token": "<|begin_of_text|>"})
    copy = pickle.loads(pickle.dumps(template))
    assert copy == template and hash(copy) == hash(template) and copy.render(CHAT) == template.render(CHAT)
