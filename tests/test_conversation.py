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
