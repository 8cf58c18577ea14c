"""Streamed safetensors I/O against the real safetensors library, shard planning and checksums."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatkit.convert.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    TensorRef,
    WeightsError,
    hf_refs,
    parse_size,
    plan_shards,
    safetensors_refs,
    weights_sha256,
    write_safetensors,
    write_weights,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, 2, generator=g).half(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


def _refs(state):
    return [TensorRef(k, tuple(v.shape), v.dtype, lambda v=v: v.clone()) for k, v in state.items()]


def test_streamed_file_is_read_back_exactly_by_safetensors(tmp_path):
    state = _state()
    write_safetensors(tmp_path / "x.safetensors", _refs(state))
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_reader_reads_files_safetensors_wrote(tmp_path):
    state = _state()
    save_file(state, tmp_path / "y.safetensors")
    refs = {r.name: r for r in safetensors_refs(tmp_path / "y.safetensors")}
    for k, v in state.items():
        assert refs[k].shape == tuple(v.shape) and refs[k].dtype == v.dtype
        assert torch.equal(refs[k].load(), v), k


def test_cast_applies_to_floating_tensors_only(tmp_path):
    state = _state()
    write_safetensors(tmp_path / "z.safetensors", _refs(state), dtype=torch.float16)
    back = load_file(tmp_path / "z.safetensors")
    assert back["a.weight"].dtype == torch.float16 and back["b.bias"].dtype == torch.float16
    assert back["ids"].dtype == torch.int64 and back["flag"].dtype == torch.bool
    assert torch.equal(back["a.weight"], state["a.weight"].half())


def test_sharded_folder_has_a_correct_index_and_round_trips(tmp_path):
    state = {f"layer.{i}.w": torch.full((10, 10), float(i)) for i in range(5)}  # 400 B each
    files = write_weights(tmp_path, _refs(state), max_shard_size=900)
    names = sorted(p.name for p in files)
    assert names[-1] == "model.safetensors.index.json"
    assert names[:-1] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000
    assert index["weight_map"]["layer.4.w"] == "model-00003-of-00003.safetensors"
    back = {r.name: r.load() for r in hf_refs(tmp_path)}
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_one_shard_needs_no_index(tmp_path):
    write_weights(tmp_path, _refs({"w": torch.ones(3)}), max_shard_size="1GB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_plan_puts_an_oversized_tensor_alone():
    refs = _refs({"small": torch.zeros(2), "big": torch.zeros(100), "tail": torch.zeros(2)})
    assert [[r.name for r in s] for s in plan_shards(refs, 40)] == [["small"], ["big"], ["tail"]]


def test_checksum_ignores_sharding_but_sees_one_bit(tmp_path):
    state = {f"w{i}": torch.randn(8, 8) for i in range(4)}
    write_weights(tmp_path / "one", _refs(state), max_shard_size="1GB")
    write_weights(tmp_path / "many", _refs(state), max_shard_size=300)
    a, b = weights_sha256(hf_refs(tmp_path / "one")), weights_sha256(hf_refs(tmp_path / "many"))
    assert a == b
    state["w2"].view(torch.int32)[0, 0] ^= 1  # flip the lowest bit of one float
    assert weights_sha256(_refs(state)) != a


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5gb") == 1_500_000_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="2 bananas"):
        parse_size("2 bananas")


def test_bad_files_are_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(WeightsError, match="model.safetensors"):
        hf_refs(tmp_path)
    with pytest.raises(WeightsError, match="no model weights"):
        hf_refs(tmp_path / "nothing")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-1.safetensors"}}')
    with pytest.raises(WeightsError, match="missing"):
        hf_refs(tmp_path)


def test_pytorch_bin_folders_are_read_with_weights_only(tmp_path):
    state = {"w": torch.randn(4, 4)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (r,) = hf_refs(tmp_path)
    assert torch.equal(r.load(), state["w"])
    torch.save({"w": state["w"], "code": print}, tmp_path / "pytorch_model.bin")  # a pickled function
    with pytest.raises(Exception, match="weights_only|Unsupported|global"):
        hf_refs(tmp_path)


# --- tools/make_shards.py --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str) -> dict:
    """tools/<name>.py's globals, loaded without running it (its main takes an argv)."""
    return runpy.run_path(str(REPO / "tools" / f"{name}.py"), run_name=f"tools.{name}")


def _model_folder(folder: Path) -> Path:
    write_weights(folder, _refs(_state()))
    (folder / "config.json").write_text('{"model_type": "gpt_neox"}')
    return folder


def _shards(*args) -> str | int | None:
    with pytest.raises(SystemExit) as e:
        _tool("make_shards")["main"]([str(a) for a in args])
    return e.value.code


def test_make_shards_refuses_an_unrelated_out_unless_overwrite(tmp_path, capsys):
    main = _tool("make_shards")["main"]
    src = _model_folder(tmp_path / "src")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = _shards("--input", src, "--out", out)
    assert code == (
        f"error: --out {out} is not empty and not an earlier make_shards output: refusing to replace it; "
        "give --overwrite to replace it, or choose another folder"
    )
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model.safetensors").exists()
    main(["--input", str(src), "--out", str(out), "--overwrite"])
    assert not (out / "notes.txt").exists() and weights_sha256(hf_refs(out)) == weights_sha256(hf_refs(src))
    main(["--input", str(src), "--out", str(out), "--max-shard-size", "100"])  # its own output: replaced
    assert (out / "model.safetensors.index.json").is_file()
    (empty := tmp_path / "empty").mkdir()
    main(["--input", str(src), "--out", str(empty)])  # an empty folder holds nothing to lose
    assert (empty / "model.safetensors").is_file()
    (afile := tmp_path / "afile").write_text("x")
    assert "exists and is not a folder" in _shards("--input", src, "--out", afile, "--overwrite")
    assert afile.read_text() == "x"


def test_make_shards_names_a_missing_input_folder(tmp_path):
    missing = tmp_path / "nope"
    assert _shards("--input", missing, "--out", tmp_path / "o") == f"error: --input {missing}: no such folder"
    (afile := tmp_path / "model.safetensors").write_text("x")
    assert _shards("--input", afile, "--out", tmp_path / "o") == f"error: --input {afile}: not a folder"
    assert not (tmp_path / "o").exists()


def test_shard_size_defaults_agree():
    """make_shards, diff_checkpoint and the library write 5GB shards unless told otherwise, as every
    tool with a --max-shard-size does."""
    assert DEFAULT_MAX_SHARD_SIZE == "5GB"
    for tool in ("make_shards", "diff_checkpoint"):
        assert _tool(tool)["_parser"]().get_default("max_shard_size") == DEFAULT_MAX_SHARD_SIZE, tool
    sources = [*(REPO / "tools").glob("*.py"), *(REPO / "chatkit").rglob("*.py")]
    flag = re.compile(r'"--max-shard-size".{0,120}?default=([^,)\s]+)', re.S)  # a command line's
    argument = re.compile(r"max_shard_size: [^=\n]*= ([^,)\s]+)")  # a function's
    defaults = [(p.name, m) for p in sources for rx in (flag, argument) for m in rx.findall(p.read_text())]
    assert len(defaults) >= 10 and {m for _, m in defaults} <= {'"5GB"', "DEFAULT_MAX_SHARD_SIZE"}, defaults
