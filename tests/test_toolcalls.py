"""Tool calls and reasoning read back out of generated text (chatkit/templates/replies.py), the shell's
`[tool call]` line, the toolcall dataset (data/toolcall) on fixtures in each upstream layout, and the
engine's prompt with tools. A tool-call data set trained, exported and served end to end:
tests/test_toolcall_training.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path

import pytest

from chatkit.conversation import Message, ToolCall, read_jsonl
from chatkit.templates import get_template
from chatkit.templates.replies import (
    PLAIN,
    Reply,
    ReplyStream,
    format_of_jinja,
    hermes_calls,
    llama3_calls,
    mistral_calls,
)
from chatkit.tokenization import encode_conversation

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
EOS, BOS = "</s>", "<s>"


def U(text: str) -> Message:
    return Message("user", text)


def A(text: str, reasoning: str | None = None, calls: tuple[ToolCall, ...] = ()) -> Message:
    return Message("assistant", text, tool_calls=calls, reasoning=reasoning)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER, TIME]
PARIS = ToolCall("get_weather", {"city": "Paris", "units": ["°C", 1.5, None, True]}, "call12345")
TOKYO = ToolCall("get_weather", {"city": "Tōkyō"}, "call67890")
CLOCK = ToolCall("get_time", {}, "callclock")

# family -> replies it can render (Llama 3.1: one call, alone; Mistral: no reasoning)
REPLIES = {
    "llama3": [A("", calls=(PARIS,)), A("", calls=(TOKYO,)), A("It is sunny {today}.")],
    "qwen3": [
        A("", calls=(PARIS,)),
        A("Let me check both.", reasoning="Two cities:\nask twice.", calls=(PARIS, TOKYO)),
        A("", reasoning="Just the time.", calls=(CLOCK,)),
        A("Sunny.", reasoning="Easy."),
        A("hello <b>there</b>"),
    ],
    "mistral": [A("", calls=(PARIS, CLOCK)), A("", calls=(TOKYO,)), A("It is sunny.")],
}
CASES = [(family, i) for family, replies in REPLIES.items() for i in range(len(replies))]
IDS = [f"{family}-{i}" for family, i in CASES]


def generated(family: str, reply: Message, tools=TOOLS) -> str:
    """What a model trained on `family` generates for `reply`: the rendered conversation after the
    generation prompt, up to the end of turn, as the chat engine assembles it."""
    template, msgs = get_template(family), [U("Weather in Paris and Tokyo?")]
    prompt = template.render(msgs, EOS, BOS, True, tools=tools)
    full = template.render([*msgs, reply], EOS, BOS, tools=tools)
    assert full.startswith(prompt)
    text = full[len(prompt) :]
    ends = [i for s in (*template.stop_strings, EOS) if (i := text.find(s)) >= 0]
    return template.reply_text(text[: min(ends)])


def expected(family: str, reply: Message) -> Reply:
    """The reply as parsing gives it back: ids only where the format writes them (Mistral's)."""
    calls = (
        reply.tool_calls
        if family == "mistral"
        else tuple(dataclasses.replace(c, id=None) for c in reply.tool_calls)
    )
    return Reply(reply.content, calls, reply.reasoning)


# --- parsing: parse(render(reply)) is the reply ------------------------------------------------------


@pytest.mark.parametrize(("family", "i"), CASES, ids=IDS)
def test_parse_reads_back_what_the_template_renders(family: str, i: int):
    reply = REPLIES[family][i]
    assert get_template(family).parse_reply(generated(family, reply)) == expected(family, reply)
    content, calls, reasoning = get_template(family).parse_reply(generated(family, reply))  # a triple
    assert (content, calls, reasoning) == expected(family, reply)


def test_each_format_in_the_shapes_models_write():
    qwen3, llama3, mistral = (get_template(n) for n in ("qwen3", "llama3", "mistral"))
    paris = ToolCall("get_weather", {"city": "Paris"})
    # arguments as a JSON string; reasoning left open by a generation prompt that opened the block
    args = json.dumps(json.dumps({"city": "Paris"}))
    text = f'Checking.</think>\n\n<tool_call>{{"name": "get_weather", "arguments": {args}}}</tool_call>'
    assert qwen3.parse_reply(text) == Reply("", (paris,), "Checking.")
    assert qwen3.parse_reply("<think>\nstill thinking") == Reply("", (), "still thinking")  # cut off
    assert qwen3.parse_reply("<think>\n\n</think>\n\nhi") == Reply("hi")  # an empty block: no reasoning
    # Llama 3.1: after <|python_tag|>, several calls separated by ';', "arguments" for "parameters"
    two = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    two += '{"name": "get_time", "arguments": {}}'
    assert llama3.parse_reply(two) == Reply("", (paris, ToolCall("get_time", {})))
    # Mistral: text before the calls is the content; one call object without a list
    assert mistral.parse_reply(
        'Sure. [TOOL_CALLS] {"name": "get_weather", "arguments": {"city": "Paris"}}'
    ) == (Reply("Sure.", (paris,)))


MALFORMED = {
    "qwen3": [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',  # not JSON
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # cut off
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "a"}\n</tool_call> <tool_call>\n{"name": }\n</tool_call>',  # one bad of two
    ],
    "llama3": [
        '{"name": "get_weather", "parameters": {"city": "Par',
        "{not json}",
        '{"name": "x"} trailing',
        "{}",
    ],
    "mistral": ["[TOOL_CALLS] [{", '[TOOL_CALLS] [{"name": "a", "arguments": {}}] more', "[TOOL_CALLS] [1]"],
}


@pytest.mark.parametrize("family", list(MALFORMED))
def test_malformed_calls_are_plain_content_never_an_exception(family: str):
    template = get_template(family)
    for text in MALFORMED[family]:
        assert template.parse_reply(text) == Reply(text), text
    assert template.parse_reply("", tools=True) == Reply("")


def test_without_tools_no_call_is_read():
    text = generated("qwen3", A("", reasoning="r", calls=(PARIS,)))
    content, calls, reasoning = get_template("qwen3").parse_reply(text, tools=False)
    assert not calls and content.startswith("<tool_call>") and reasoning == "r"


def test_templates_without_a_format_return_the_text_unchanged():
    for name in ("openchatkit", "alpaca", "chatml", "gemma"):
        text = ' <tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> <think>x</think> '
        assert get_template(name).parse_reply(text) == Reply(text)


def test_hf_reads_the_format_its_jinja_writes():
    fixture = {
        n: (FIXTURES / f"{n}.jinja").read_text(encoding="utf-8")
        for n in ("qwen3", "llama3", "mistral", "gemma3")
    }
    assert format_of_jinja(fixture["qwen3"]).calls is hermes_calls and format_of_jinja(fixture["qwen3"]).think
    assert format_of_jinja(fixture["llama3"]).calls is llama3_calls
    assert format_of_jinja(fixture["mistral"]).calls is mistral_calls
    assert format_of_jinja(fixture["gemma3"]) == PLAIN
    from chatkit.templates.hf import HFChatTemplate

    tok = type("Tok", (), {"chat_template": fixture["qwen3"]})()
    reply = A("Let me check.", reasoning="why", calls=(PARIS,))
    assert HFChatTemplate(tok).parse_reply(generated("qwen3", reply)) == expected("qwen3", reply)


# --- streaming: deltas join to the parsed fields; possible calls are held back ----------------------


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = (
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
        if len(text) > 1
        else []
    )
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _stream(
    fmt, pieces: list[str], tools: bool = True
) -> tuple[dict[str, str], Reply, list[tuple[str, str]]]:
    stream, deltas = ReplyStream(fmt, tools), []
    for piece in pieces:
        deltas += stream.push(piece)
    rest, reply = stream.finish()
    deltas += rest
    joined = {kind: "".join(t for k, t in deltas if k == kind) for kind in ("reasoning", "content")}
    return joined, reply, deltas


@pytest.mark.parametrize(("family", "i"), CASES, ids=IDS)
def test_stream_deltas_join_to_the_parsed_reply(family: str, i: int):
    template, rng = get_template(family), random.Random(i)
    text = generated(family, REPLIES[family][i])
    for pieces in ([text], list(text), *(_pieces(text, rng) for _ in range(20))):
        joined, reply, deltas = _stream(template.reply_format, pieces)
        assert reply == template.parse_reply(text) == expected(family, REPLIES[family][i])
        assert joined == {"reasoning": reply.reasoning or "", "content": reply.content}
        for marker in ("<tool_call>", "[TOOL_CALLS]", '{"name"', "<think>", "</think>"):
            assert all(marker not in t for _, t in deltas)  # markup never leaks out as text


def test_stream_lets_text_out_before_a_call_and_malformed_calls_at_the_end():
    qwen3 = get_template("qwen3").reply_format
    stream = ReplyStream(qwen3)
    assert stream.push("<think>\nHmm") == [("reasoning", "Hmm")]
    assert stream.push(".\n</think>\n\nLet me") == [("reasoning", "."), ("content", "Let me")]
    assert stream.push(" check.\n<tool") == [("content", " check.")]  # "<tool" may open a call
    assert stream.push('_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>') == []
    assert stream.finish() == ([], Reply("Let me check.", (ToolCall("get_time", {}),), "Hmm."))
    for family, texts in MALFORMED.items():
        for text in texts:
            joined, reply, _ = _stream(get_template(family).reply_format, list(text))
            assert reply == Reply(text) and joined["content"] == text
    # a plain template streams every piece as it comes; so does a tool template offered no tools
    assert _stream(PLAIN, [" a ", "b "])[2] == [("content", " a "), ("content", "b ")]
    llama3 = get_template("llama3").reply_format
    assert _stream(llama3, ['{"name"', ": 1}"], tools=False)[2] == [
        ("content", '{"name"'),
        ("content", ": 1}"),
    ]
    assert _stream(llama3, ["It is ", "{warm}"])[2] == [("content", "It is"), ("content", " {warm}")]


# --- the shell shows a call the model makes ---------------------------------------------------------


class _ScriptedEngine:
    """Says `reply` to anything, as a model trained on `template` would write it (only what
    ChatShell uses of an engine)."""

    def __init__(self, template: str, reply: str) -> None:
        self.template, self.reply = get_template(template), reply

    def prompt_messages(self, messages, max_new_tokens, **_):
        return list(messages)

    def stream(self, messages, params, seed=None, **_):
        yield from (self.reply[:5], self.reply[5:])


def test_the_shell_prints_a_tool_call_the_model_makes():
    from chatkit.bot import ChatShell
    from chatkit.chat import GenerationParams

    text = generated("qwen3", A("", calls=(TOKYO,)))
    out = io.StringIO()
    shell = ChatShell(_ScriptedEngine("qwen3", text), GenerationParams(), out=out)  # type: ignore[arg-type]
    assert shell.say("Weather in Tokyo?") == text
    assert out.getvalue() == text + '\n[tool call] get_weather({"city": "Tōkyō"})\n'
    assert shell.history[-1] == Message("assistant", text)  # kept as the model wrote it
    out.truncate(0), out.seek(0)
    shell.engine = _ScriptedEngine("qwen3", "no call here")  # type: ignore[assignment]
    shell.say("hi")
    assert "[tool call]" not in out.getvalue()


# --- data/toolcall: the upstream layouts --------------------------------------------------------------

GLAIVE = [  # LLaMA-Factory's data/glaive_toolcall_en_demo.json layout (its rows abridged)
    {
        "conversations": [
            {"from": "human", "value": "I need to calculate the area of a rectangle. The length is 5 and the breadth is 3."},
            {"from": "function_call", "value": '{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}'},
            {"from": "observation", "value": '{"area": 15}'},
            {"from": "gpt", "value": "The area of the rectangle is 15 square units."},
            {"from": "human", "value": "And a circle of radius 4 and a square of side 7?"},
            {"from": "function_call", "value": '[{"name": "calculate_area", "arguments": {"shape": "circle", "dimensions": [4]}}, '
                                               '{"name": "calculate_area", "arguments": "{\\"shape\\": \\"square\\", \\"dimensions\\": [7]}"}]'},
            {"from": "observation", "value": '{"area": 50.24}'},
            {"from": "observation", "value": '{"area": 49}'},
            {"from": "gpt", "value": "<think>\nBoth came back.\n</think>\n\nAbout 50.24 and 49 square units."},
        ],
        "tools": '[{"name": "calculate_area", "description": "Calculate the area of a given shape", "parameters": '
                 '{"type": "object", "properties": {"shape": {"type": "string"}, "dimensions": {"type": "array", '
                 '"items": {"type": "number"}}}, "required": ["shape", "dimensions"]}}]',
    },
    {
        "conversations": [{"from": "human", "value": "What is the difference between AR and VR?"},
                          {"from": "gpt", "value": "AR overlays; VR replaces."}],
        "tools": "[]",
        "system": "Answer briefly.",
    },
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "bard", "value": "yo"}], "tools": "[]"},
]  # fmt: skip
OPENAI = [  # OpenAI's chat messages with tool calls, as its API returns them
    {
        "messages": [
            {"role": "system", "content": "You help with weather."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "refusal": None, "reasoning_content": "Look it up.",
             "tool_calls": [{"id": "call_abc", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather", "content": "22"},
            {"role": "assistant", "content": "<think>It said 22.</think>\n\n22 °C in Paris."},
        ],
        "tools": [WEATHER],
    },
]  # fmt: skip


def _prepare(tmp_path: Path, name: str, rows: list, *extra: str) -> tuple[list, str]:
    from chatkit.datasets import get_dataset
    from chatkit.datasets.prepare import prepare

    src = tmp_path / name
    src.write_text(
        json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    )
    out = tmp_path / "out"
    prepare(get_dataset("toolcall"), ["--source", str(src), "--out", str(out), "--val-fraction", "0", *extra])
    return read_jsonl(out / "train.jsonl"), str(src)


def test_toolcall_reads_llama_factorys_sharegpt_layout(tmp_path: Path, capsys, bpe_tokenizer):
    convs, src = _prepare(tmp_path, "glaive_toolcall_en_demo.json", GLAIVE)
    assert f"unknown role 'bard': first skipped at {src}[2]" in capsys.readouterr().out
    first, second = convs
    area = first.tools[0]
    assert area["type"] == "function" and area["function"]["name"] == "calculate_area"
    roles = [m.role for m in first.messages]
    assert roles == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]
    call = first.messages[1].tool_calls[0]
    assert call == ToolCall("calculate_area", {"shape": "rectangle", "dimensions": [5, 3]}, "call00001")
    circle, square = first.messages[5].tool_calls  # a parallel call; a JSON string's arguments read
    assert (circle.id, square.id, square.arguments) == (
        "call00002",
        "call00003",
        {"shape": "square", "dimensions": [7]},
    )
    results = [(m.tool_call_id, m.name, m.content) for m in first.messages if m.role == "tool"]
    assert results == [
        ("call00001", "calculate_area", '{"area": 15}'),
        ("call00002", "calculate_area", '{"area": 50.24}'),
        ("call00003", "calculate_area", '{"area": 49}'),
    ]
    assert first.messages[-1] == Message(
        "assistant", "About 50.24 and 49 square units.", reasoning="Both came back."
    )
    assert second.tools == () and second.messages[0] == Message("system", "Answer briefly.")
    # what was written trains with the tool templates (Mistral's: ids of nine characters, no reasoning)
    assert encode_conversation(bpe_tokenizer, get_template("qwen3"), first.messages, first.tools).num_trained
    plain = [dataclasses.replace(m, reasoning=None) for m in first.messages]
    assert encode_conversation(bpe_tokenizer, get_template("mistral"), plain, first.tools).num_trained


def test_toolcall_reads_openai_messages(tmp_path: Path):
    (conv,), _ = _prepare(tmp_path, "chats.jsonl", OPENAI)
    assert conv.tools == (WEATHER,)
    assert conv.messages[2] == Message(
        "assistant",
        "",
        tool_calls=(ToolCall("get_weather", {"city": "Paris"}, "call_abc"),),
        reasoning="Look it up.",
    )
    assert conv.messages[3] == Message("tool", "22", tool_call_id="call_abc", name="get_weather")
    assert conv.messages[4] == Message("assistant", "22 °C in Paris.", reasoning="It said 22.")


def _calling(value: str, **row) -> dict:
    """A ShareGPT row: a question, then a function_call turn holding `value`."""
    turns = [{"from": "human", "value": "x"}, {"from": "function_call", "value": value}]
    return {"conversations": turns, **row}


_BAD_ARGUMENTS = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}
BROKEN = [
    ("a.json", [_calling("{oops")], "[0]: field 'conversations'[1].value: not JSON"),
    ("b.json", [_calling('{"arguments": {}}')], "[0]: field 'conversations'[1].value: a call needs"),
    ("c.json", [_calling("{}", tools="[{")], "[0]: field 'tools': not JSON"),
    ("d.json", [_calling("{}", tools='{"name": "f"}')], "[0]: field 'tools': expected a list"),
    ("e.jsonl", [{"messages": [{"role": "user", "content": "x"},
                               {"role": "assistant", "content": None, "tool_calls": [_BAD_ARGUMENTS]}]}],
     ":1: messages[1].tool_calls[0].function.arguments: not JSON"),
    ("f.jsonl", [{"prompt": "x", "completion": "y"}], ":1: no known tool-call layout"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "rows", "says"), BROKEN, ids=[b[0] for b in BROKEN])
def test_toolcall_errors_name_the_file_the_row_and_the_field(
    tmp_path: Path, name: str, rows: list, says: str
):
    with pytest.raises(SystemExit) as e:
        _prepare(tmp_path, name, rows)
    assert str(e.value).startswith(f"error: {tmp_path / name}{says}"), e.value
    assert not (tmp_path / "out").exists()


# --- the engine's prompt with tools (the trained path, end to end: tests/test_toolcall_training.py) ---


def test_the_engine_prompts_with_the_tools_and_thinking_it_is_given(tiny_engine):
    from chatkit.chat import ChatEngine
    from chatkit.tokenization import encode_prompt

    qwen3 = get_template("qwen3")
    engine = ChatEngine(tiny_engine.model, tiny_engine.tokenizer, qwen3, tiny_engine.device)
    msgs, tok = [U("Weather in Paris?")], tiny_engine.tokenizer
    for tools, thinking in ((None, None), ([WEATHER], None), (None, False)):
        ids = encode_prompt(tok, qwen3, msgs, tools, thinking)
        assert len(ids) == engine.prompt_length(msgs, tools=tools, thinking=thinking)
        if tools is None:  # the tool list alone fills most of the tiny model's context
            assert engine.prompt_ids(msgs, 4, tools=tools, thinking=thinking) == ids
        assert engine.raw_prompt(msgs, tools=tools, thinking=thinking) == qwen3.render(
            msgs, tok.eos_token, tok.bos_token, True, tools=tools, thinking=thinking
        )
    assert '"name": "get_weather"' in engine.raw_prompt(msgs, tools=[WEATHER])
    # a tool result awaits a reply too: its prompt ends with the generation prompt
    result = [*msgs, A("", calls=(PARIS,)), Message("tool", "22")]
    assert engine.raw_prompt(result, tools=[WEATHER]).endswith("<|im_start|>assistant\n")
