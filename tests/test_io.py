from __future__ import annotations

import json

import pytest

from chatkit.io import atomic_dir, atomic_open, write_json, write_jsonl


class Boom(Exception):
    pass


def _names(directory) -> set[str]:
    return {p.name for p in directory.iterdir()}


# --- atomic_open ----------------------------------------------------------------------------------


def test_atomic_open_writes_via_temp_and_renames(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # parent is created
    with atomic_open(target) as f:
        f.write("héllo\n")
        f.flush()
        # the data goes to a temp file beside the target, not to the target itself
        assert not target.exists()
        (tmp_name,) = _names(target.parent)
        assert tmp_name != "out.txt"
        assert (target.parent / tmp_name).read_text(encoding="utf-8") == "héllo\n"
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert _names(target.parent) == {"out.txt"}


def test_atomic_open_replaces_existing_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with atomic_open(target) as f:
        f.write("new")
        assert target.read_text(encoding="utf-8") == "old"
    assert target.read_text(encoding="utf-8") == "new"
    assert _names(tmp_path) == {"out.txt"}


def test_atomic_open_binary(tmp_path):
    target = tmp_path / "blob.bin"
    with atomic_open(target, "wb") as f:
        f.write(b"\x00\xffabc")
    assert target.read_bytes() == b"\x00\xffabc"


def test_atomic_open_exception_keeps_old_content_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(Boom), atomic_open(target) as f:
        f.write("half-written")
        raise Boom
    assert target.read_text(encoding="utf-8") == "old"
    assert _names(tmp_path) == {"out.txt"}


def test_atomic_open_exception_without_existing_target(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt), atomic_open(target) as f:  # BaseException too
        f.write("x")
        raise KeyboardInterrupt
    assert not target.exists()
    assert _names(tmp_path) == set()


# --- write_jsonl / write_json ---------------------------------------------------------------------


def test_write_jsonl_returns_row_count(tmp_path):
    rows = [{"a": 1}, {"b": "ünï"}, {"c": [1, 2]}]
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, iter(rows)) == 3
    text = path.read_text(encoding="utf-8")
    assert "ünï" in text  # not \u-escaped
    lines = text.splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert text.endswith("\n")


def test_write_jsonl_zero_rows(tmp_path):
    path = tmp_path / "empty.jsonl"
    assert write_jsonl(path, []) == 0
    assert path.read_text(encoding="utf-8") == ""


def test_write_jsonl_failing_generator_keeps_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"old": true}\n', encoding="utf-8")

    def rows():
        yield {"a": 1}
        raise Boom

    with pytest.raises(Boom):
        write_jsonl(path, rows())
    assert path.read_text(encoding="utf-8") == '{"old": true}\n'
    assert _names(tmp_path) == {"rows.jsonl"}


def test_write_json(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"k": "ü", "n": [1]})
    assert json.loads(path.read_text(encoding="utf-8")) == {"k": "ü", "n": [1]}
    assert path.read_text(encoding="utf-8").endswith("\n")


# --- atomic_dir -----------------------------------------------------------------------------------


def test_atomic_dir_creates_new(tmp_path):
    target = tmp_path / "parent" / "model"
    with atomic_dir(target) as d:
        assert d != target
        assert d.parent == target.parent
        assert not target.exists()
        (d / "a.txt").write_text("A", encoding="utf-8")
    assert target.is_dir()
    assert (target / "a.txt").read_text(encoding="utf-8") == "A"
    assert _names(target.parent) == {"model"}


def test_atomic_dir_replaces_existing_only_on_success(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old", encoding="utf-8")
    with atomic_dir(target) as d:
        (d / "new.txt").write_text("new", encoding="utf-8")
        # the old directory stays in place while the new one is built
        assert _names(target) == {"old.txt"}
    assert _names(target) == {"new.txt"}
    assert (target / "new.txt").read_text(encoding="utf-8") == "new"
    assert _names(tmp_path) == {"model"}  # no temp or .old directory left


def test_atomic_dir_failure_leaves_existing_untouched(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(Boom), atomic_dir(target) as d:
        (d / "new.txt").write_text("new", encoding="utf-8")
        (d / "nested").mkdir()
        (d / "nested" / "f").write_text("x", encoding="utf-8")
        raise Boom
    assert _names(target) == {"old.txt"}
    assert (target / "old.txt").read_text(encoding="utf-8") == "old"
    assert _names(tmp_path) == {"model"}


def test_atomic_dir_failure_without_existing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(Boom), atomic_dir(target) as d:
        (d / "f").write_text("x", encoding="utf-8")
        raise Boom
    assert not target.exists()
    assert _names(tmp_path) == set()


def test_check_apart_refuses_outputs_over_inputs(tmp_path):
    from chatkit.io import check_apart

    src = tmp_path / "model"
    src.mkdir()
    for out in (src, src / "sub", tmp_path):  # the input itself, inside it, the folder holding it
        with pytest.raises(ValueError, match="overlaps the source"):
            check_apart(out, {"the source": src})
    check_apart(tmp_path / "model-hf", {"the source": src})  # a sibling is fine
