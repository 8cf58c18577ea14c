"""tools/inspect_data.py: what is trained, token by token; and one `error:` line for an input it cannot read
(once a traceback each: a bad line of the data, a missing file, a missing model)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = str(REPO / "tools" / "inspect_data.py")
GOOD = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
ROBOT = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from chatkit.pretrained import prepare_tiny

    path = tmp_path_factory.mktemp("inspect") / "base"
    prepare_tiny([], str(path), vocab_size=300, layers=1, hidden=32, heads=2)
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in (GOOD, GOOD, ROBOT, GOOD)), encoding="utf-8")
    return path


def _inspect(capsys, monkeypatch, *argv: str) -> tuple[int, list[str], list[str]]:
    """(exit status, stdout lines, stderr lines) of the tool, run in this process."""
    monkeypatch.setattr(sys, "argv", [TOOL, *argv])
    try:
        runpy.run_path(TOOL, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_conversations_are_shown_with_what_is_trained(capsys, monkeypatch, model, data):
    code, out, err = _inspect(capsys, monkeypatch, "--model", str(model), "--data", str(data), "-n", "1")
    assert code == 0 and err == []
    assert out[0].startswith("── conversation 1 (no source): ") and out[0].endswith(" trained")
    assert "⟦" in "\n".join(out[1:])  # the trained reply, marked (no terminal: no colour)


def test_a_bad_line_stops_with_file_line_and_field(capsys, monkeypatch, model, data):
    code, out, err = _inspect(capsys, monkeypatch, "--model", str(model), "--data", str(data), "-n", "5")
    assert code == 1
    assert len([line for line in out if line.startswith("── conversation")]) == 2  # the two before it
    assert err == [
        f"error: {data}:3: messages[1].role: must be one of system, user, assistant, tool, got 'robot'"
    ]


@pytest.mark.parametrize(
    ("model_arg", "data_arg", "expected"),
    [
        ("{model}", "{tmp}/nope.jsonl", "error: --data: no such file '{tmp}/nope.jsonl'"),
        ("{model}", "{tmp}", "error: --data: '{tmp}' is a folder, not a conversation JSONL file"),
        ("{tmp}/nobase", "{data}", "error: --model: no such folder '{tmp}/nobase' (nor a hub id in the Hugging "
         "Face cache)"),
        ("nobase", "{data}", "error: --model: no such folder 'nobase' (nor a hub id in the Hugging Face cache)"),
        ("{tmp}", "{data}", "error: --model: '{tmp}' has no tokenizer files (one of tokenizer.json, "
         "tokenizer.model, vocab.json)"),
    ],
)  # fmt: skip
def test_a_missing_input_is_one_line(
    capsys, monkeypatch, tmp_path, model, data, model_arg, data_arg, expected
):
    fill = {"model": model, "data": data, "tmp": tmp_path}
    code, out, err = _inspect(
        capsys, monkeypatch, "--model", model_arg.format(**fill), "--data", data_arg.format(**fill)
    )
    assert code == 1 and out == []
    assert err == [expected.format(**fill)]


def test_an_unknown_template_is_one_line(capsys, monkeypatch, model, data):
    code, _, err = _inspect(
        capsys, monkeypatch, "--model", str(model), "--data", str(data), "--template", "x"
    )
    assert (
        code == 1
        and len(err) == 1
        and err[0].startswith("error: --template: unknown chat template 'x'; known: ")
    )


@pytest.mark.slow
def test_the_tool_prints_the_one_line_and_nothing_else(model, data):
    r = subprocess.run(
        [sys.executable, TOOL, "--model", str(model), "--data", str(data), "--skip", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: {data}:3: messages[1].role: must be one of system, user, assistant, tool, got 'robot'"
    ]
