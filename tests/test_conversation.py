from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatkit.conversation import (
    Conversation,
    ConversationError,
    Message,
    iter_jsonl,
    parse_conversation,
    read_jsonl,
    write_conversations,
)

VALID = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Remember this", "train": True},
        {"role": "assistant", "content": "Bad answer", "train": False},
    ],
    "source": "unit",
    "id": 7,
}


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- Message / Conversation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "train", "expected"),
    [
        ("assistant", None, True),
        ("user", None, False),
        ("system", None, False),
        ("assistant", False, False),
        ("user", True, True),
        ("system", True, True),
        ("assistant", True, True),
        ("user", False, False),
    ],
)
def test_trained_defaults_and_overrides(role, train, expected):
    assert Message(role, "x", train).trained is expected


def test_parse_valid_conversation():
    conv = parse_conversation(VALID, "x.jsonl:1")
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.content for m in conv.messages] == ["Be brief.", "Hi", "Hello!", "Remember this", "Bad answer"]
    assert [m.train for m in conv.messages] == [None, None, None, True, False]
    assert [m.trained for m in conv.messages] == [False, False, True, True, False]
    assert conv.source == "unit"
    assert conv.extra == {"id": 7}


def test_parse_source_defaults_to_empty():
    conv = parse_conversation({"messages": [{"role": "user", "content": ""}]})
    assert conv.source == ""
    assert conv.extra == {}
    assert conv.messages == (Message("user", ""),)


def test_to_dict_round_trip():
    conv = parse_conversation(VALID)
    d = conv.to_dict()
    assert d == VALID
    # train is only written when it was set
    assert "train" not in d["messages"][0]
    assert d["messages"][3]["train"] is True
    assert parse_conversation(d) == conv
    # and it survives JSON
    assert parse_conversation(json.loads(json.dumps(d))) == conv


def test_write_and_read_jsonl_round_trip(tmp_path):
    convs = [
        parse_conversation(VALID),
        Conversation((Message("user", "ünïcödé {content}"), Message("assistant", "ok\nline")), "s2"),
    ]
    path = tmp_path / "out" / "convs.jsonl"
    assert write_conversations(path, convs) == 2
    assert read_jsonl(path) == convs
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2


# --- iter_jsonl errors ----------------------------------------------------------------------------

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


def _msgs(*ms) -> str:
    return json.dumps({"messages": list(ms)})


@pytest.mark.parametrize(
    ("bad_line", "field_fragment"),
    [
        pytest.param('{"messages": [', "invalid JSON", id="invalid-json"),
        pytest.param("[1, 2]", "expected a JSON object, got list", id="not-an-object"),
        pytest.param('"just a string"', "expected a JSON object, got str", id="string-line"),
        pytest.param('{"source": "x"}', "field 'messages'", id="missing-messages"),
        pytest.param('{"messages": []}', "field 'messages'", id="empty-messages"),
        pytest.param('{"messages": {"role": "user"}}', "field 'messages'", id="messages-not-list"),
        pytest.param('{"messages": ["hi"]}', "messages[0]: expected an object", id="message-not-object"),
        pytest.param(
            _msgs({"role": "user", "content": "a"}, {"role": "bot", "content": "b"}),
            "messages[1].role",
            id="bad-role",
        ),
        pytest.param(_msgs({"content": "a"}), "messages[0].role", id="missing-role"),
        pytest.param(_msgs({"role": "user", "content": 3}), "messages[0].content", id="int-content"),
        pytest.param(_msgs({"role": "user"}), "messages[0].content", id="missing-content"),
        pytest.param(
            _msgs({"role": "assistant", "content": "a", "train": "yes"}),
            "messages[0].train",
            id="string-train",
        ),
        pytest.param(
            _msgs({"role": "assistant", "content": "a", "train": 1}), "messages[0].train", id="int-train"
        ),
        pytest.param(
            _msgs({"role": "user", "content": "a", "weight": 1.0}),
            "messages[0]: unknown field(s) weight",
            id="unknown-field",
        ),
        pytest.param(
            _msgs({"role": "user", "content": "a"}, {"role": "system", "content": "s"}),
            "messages[1].role",
            id="system-not-first",
        ),
        pytest.param(
            json.dumps({"messages": [{"role": "user", "content": "a"}], "source": 5}),
            "field 'source'",
            id="non-string-source",
        ),
    ],
)
def test_iter_jsonl_error_names_file_line_and_field(tmp_path, bad_line, field_fragment):
    # Line 1 good, line 2 blank, line 3 whitespace only, line 4 good, line 5 bad.
    path = _write_lines(tmp_path / "data.jsonl", [GOOD_LINE, "", "   \t", GOOD_LINE, bad_line])
    it = iter_jsonl(path)
    # the good lines come out before the error
    assert next(it).messages == (Message("user", "hi"),)
    assert next(it).messages == (Message("user", "hi"),)
    with pytest.raises(ConversationError) as excinfo:
        next(it)
    msg = str(excinfo.value)
    assert msg.startswith(f"{path}:5: "), msg
    assert field_fragment in msg


def test_conversation_error_is_value_error():
    assert issubclass(ConversationError, ValueError)


def test_system_message_error_says_why(tmp_path):
    path = _write_lines(
        tmp_path / "d.jsonl",
        [_msgs({"role": "user", "content": "a"}, {"role": "system", "content": "s"})],
    )
    with pytest.raises(ConversationError, match=r"d\.jsonl:1: messages\[1\]\.role: a system message"):
        read_jsonl(path)


def test_invalid_json_reports_column(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", ['{"messages": nope}'])
    with pytest.raises(ConversationError, match=r"d\.jsonl:1: invalid JSON \(.* at column 14\)"):
        read_jsonl(path)


def test_blank_lines_skipped_but_counted(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", ["", GOOD_LINE, "", "", GOOD_LINE, "  ", ""])
    convs = read_jsonl(path)
    assert len(convs) == 2
    path2 = _write_lines(tmp_path / "e.jsonl", ["", "", "", "[]"])
    with pytest.raises(ConversationError, match=r"e\.jsonl:4: "):
        read_jsonl(path2)


def test_error_for_bad_role_shows_value(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [_msgs({"role": "Assistant", "content": "a"})])
    with pytest.raises(ConversationError) as excinfo:
        read_jsonl(path)
    msg = str(excinfo.value)
    assert "'Assistant'" in msg
    assert "system, user, assistant" in msg


# --- tools, tool calls, tool results, reasoning ---------------------------------------------------

TOOL_RECORD = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning": "Look it up.",
            "tool_calls": [
                {
                    "type": "function",
                    "id": "call_1",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "22", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "assistant", "content": "22 °C."},
    ],
    "source": "unit",
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
}


def test_parse_tool_use_and_round_trip():
    conv = parse_conversation(TOOL_RECORD)
    call = conv.messages[1].tool_calls[0]
    assert (call.name, call.arguments, call.id) == ("get_weather", {"city": "Paris"}, "call_1")
    assert conv.messages[1].reasoning == "Look it up." and conv.messages[1].trained
    assert conv.messages[2].tool_call_id == "call_1" and not conv.messages[2].trained
    assert conv.tools == tuple(TOOL_RECORD["tools"]) and "tools" not in conv.extra
    assert conv.to_dict() == TOOL_RECORD
    assert parse_conversation(json.loads(json.dumps(conv.to_dict()))) == conv
    # positional construction still works, the new fields are keywords with defaults
    assert Message("user", "hi", True).tool_calls == () and Message("user", "hi").reasoning is None


def test_openai_shapes_are_normalised():
    conv = parse_conversation(
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "r",
                    "tool_calls": [{"function": {"name": "f", "arguments": '{"a": [1, 2]}'}}],
                },
            ]
        }
    )
    m = conv.messages[1]
    assert (m.content, m.reasoning, m.tool_calls[0].arguments, m.tool_calls[0].id) == (
        "",
        "r",
        {"a": [1, 2]},
        None,
    )
    assert m.to_dict()["reasoning"] == "r" and not m.is_empty


def _tool_msgs(**assistant) -> dict:
    return {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", **assistant}]}


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        pytest.param(
            _tool_msgs(tool_calls=[{"function": {"name": "f", "arguments": "{bad"}}]),
            "messages[1].tool_calls[0].function.arguments: not JSON",
            id="arguments-not-json",
        ),
        pytest.param(
            _tool_msgs(tool_calls=[{"function": {"name": "f", "arguments": "[1]"}}]),
            "messages[1].tool_calls[0].function.arguments: must be an object",
            id="arguments-not-object",
        ),
        pytest.param(
            _tool_msgs(tool_calls=[{"function": {"arguments": {}}}]),
            "messages[1].tool_calls[0].function.name",
            id="no-name",
        ),
        pytest.param(
            _tool_msgs(tool_calls={"a": 1}), "messages[1].tool_calls: must be a list", id="calls-not-list"
        ),
        pytest.param(
            _tool_msgs(reasoning="a", reasoning_content="b"),
            "messages[1]: 'reasoning' and 'reasoning_content'",
            id="both",
        ),
        pytest.param(
            {"messages": [{"role": "tool", "content": "22", "train": True}]},
            "messages[0].train: a tool result is never trained",
            id="trained-tool",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages[0]: unknown field(s) tool_calls",
            id="user-tool-calls",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]},
            "tools[0]: expected",
            id="tool-schema",
        ),
        pytest.param(
            {"messages": [{"role": "assistant", "content": None}]},
            "messages[0].content: must be a string",
            id="null-content-without-calls",
        ),
    ],
)
def test_tool_use_errors_name_file_line_and_field(tmp_path, record, fragment):
    path = _write_lines(tmp_path / "t.jsonl", [json.dumps(record)])
    with pytest.raises(ConversationError) as excinfo:
        read_jsonl(path)
    assert str(excinfo.value).startswith(f"{path}:1: ") and fragment in str(excinfo.value), str(excinfo.value)
