"""Weight diffs: make-diff then recover is bit-exact (fix-ups included), errors name the tensor, inputs
stay untouched, and tools/diff_checkpoint.py works end to end. Real files, tiny GPT-NeoX models."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from chatkit.convert.weight_diff import (
    CHECKSUM_FILE,
    DIFF_INFO,
    FIXUPS_FILE,
    DiffError,
    WrongBaseError,
    make_diff,
    read_checksum,
    recover,
    verify,
)
from chatkit.convert.weights import WeightsError, hf_refs, weights_sha256

REPO = Path(__file__).resolve().parents[1]


def _model(seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=300
    )
    return GPTNeoXForCausalLM(config).eval()


def _save(
    model, folder: Path, dtype: torch.dtype = torch.float32, shard: str = "5GB", tokenizer=None
) -> Path:
    copy.deepcopy(model).to(dtype).save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "chatkit.json").write_text(json.dumps({"template": "openchatkit"}))
    return folder


def _perturb(model, seed: int, scale: float = 0.01):
    """The 'fine-tuned' model: every weight moved by fp64 noise rounded once to fp32, the way many
    optimizer steps land (not one fp32 add, whose result `b + (t - b)` would always give back), so
    the elements that cross or approach zero need fix-ups in fp32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.double() + torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {r.name: r.load() for r in hf_refs(folder)}


def _assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        assert tb[name].dtype == t.dtype, name
        assert torch.equal(tb[name].view(torch.uint8), t.view(torch.uint8)), name  # bitwise, -0.0 included


def _snapshot(*folders: Path) -> dict[str, tuple[int, str]]:
    """Every file's mtime and content hash: inputs must come out of a run exactly as they went in."""
    out = {}
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                out[str(f)] = (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base (fp32, seed 0), target32 (fp32, perturbed), base16/target16 (bf16, sharded), other (seed 1)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("diff_models")
    words = Tokenizer(WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="[UNK]")
    model = _model(0)
    paths = {"base": _save(model, root / "base")}
    paths["base16"] = _save(model, root / "base16", torch.bfloat16, shard="60KB")
    _perturb(model, seed=10)
    paths["target32"] = _save(model, root / "target32", tokenizer=tok)
    paths["target16"] = _save(model, root / "target16", torch.bfloat16, shard="60KB", tokenizer=tok)
    paths["other"] = _save(_model(1), root / "other")
    return paths


def test_fp32_target_recovers_bit_exact_and_inputs_stay_untouched(models, tmp_path):
    base, target = models["base"], models["target32"]
    before = _snapshot(base, target)
    rep = make_diff(base, target, tmp_path / "diff")
    print(f"fp32 target: {rep.fixup_elements} element(s) needed fix-ups")
    assert rep.fixup_elements > 0 and (tmp_path / "diff" / FIXUPS_FILE).is_file()
    diff_before = _snapshot(tmp_path / "diff")
    out = recover(base, tmp_path / "diff", tmp_path / "rec").out
    _assert_same_weights(target, out)
    assert read_checksum(out / CHECKSUM_FILE) == weights_sha256(hf_refs(target))
    assert _snapshot(base, target) == before and _snapshot(tmp_path / "diff") == diff_before
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chatkit.json"):
        assert (out / name).read_bytes() == (target / name).read_bytes(), name
    info = json.loads((tmp_path / "diff" / DIFF_INFO).read_text())
    assert all(e["dtype"] == "F32" and len(e["base_sha256"]) == 64 for e in info["tensors"].values())
    assert verify(out) == verify(out, tmp_path / "diff") == info["target_sha256"]


def test_bf16_sharded_target_needs_no_fixups(models, tmp_path):
    for base in (models["base16"], models["base"]):  # bf16 base, and the fp32 base it came from
        d = tmp_path / f"diff-{base.name}"
        rep = make_diff(base, models["target16"], d, max_shard_size="100KB")
        assert rep.fixup_elements == 0 and not (d / FIXUPS_FILE).exists()
        assert (d / "model.safetensors.index.json").is_file()  # sharded diff
        out = recover(base, d, tmp_path / f"rec-{base.name}", max_shard_size="60KB").out
        assert (out / "model.safetensors.index.json").is_file()
        _assert_same_weights(models["target16"], out)
        assert read_checksum(out / CHECKSUM_FILE) == weights_sha256(hf_refs(models["target16"]))


def _raw_folder(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    return folder


def test_fixups_make_hard_fp32_cases_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, 32, generator=g)
    t = b + 0.01 * torch.randn(64, 32, generator=g)
    b[0, :8], t[0, :8] = 1e8, 1e-3  # target tiny, base huge: t - b rounds to -b
    b[1, 0], t[1, 0] = 0.0, -0.0  # signed zero: 0.0 + -0.0 is +0.0
    naive = b + (t - b)
    assert not torch.equal(naive.view(torch.int32), t.view(torch.int32))
    ids = torch.arange(6).reshape(2, 3)
    base = _raw_folder(tmp_path / "b", {"w": b, "ids": ids, "f64": torch.ones(3, dtype=torch.float64)})
    tgt = _raw_folder(
        tmp_path / "t", {"w": t, "ids": ids + 1, "f64": torch.full((3,), 1 / 3, dtype=torch.float64)}
    )
    rep = make_diff(base, tgt, tmp_path / "d")
    assert rep.fixups_per_tensor["w"] >= 9 and (tmp_path / "d" / FIXUPS_FILE).is_file()
    info = json.loads((tmp_path / "d" / DIFF_INFO).read_text())
    assert info["tensors"]["ids"]["op"] == info["tensors"]["f64"]["op"] == "copy"
    out = recover(base, tmp_path / "d", tmp_path / "r").out
    _assert_same_weights(tgt, out)


def test_recovered_model_gives_the_targets_logits(models, tmp_path):
    from transformers import AutoModelForCausalLM

    make_diff(models["base"], models["target32"], tmp_path / "d")
    out = recover(models["base"], tmp_path / "d", tmp_path / "r").out
    ids = torch.tensor([[1, 5, 7, 42, 299, 3]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(models["target32"]).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def diff32(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diff32") / "diff"
    make_diff(models["base"], models["target32"], out)
    return out


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a model folder with its weights passed through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    state = edit(_tensors(src))
    (dst / "model.safetensors").unlink()
    save_file(state, dst / "model.safetensors")
    return dst


def test_wrong_base_is_named_by_tensor(models, diff32, tmp_path):
    with pytest.raises(
        WrongBaseError, match=r"BASE .* is not the model this diff was made from: tensor '.+' differs"
    ):
        recover(models["other"], diff32, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_missing_extra_and_reshaped_tensors(models, diff32, tmp_path):
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"

    def drop(s):
        return {k: v for k, v in s.items() if k != name}

    def reshape(s):
        return s | {name: s[name][:, :64].contiguous()}

    missing = _edited_copy(models["base"], tmp_path / "missing", drop)
    with pytest.raises(DiffError, match=rf"tensor '{name}' missing in BASE"):
        recover(missing, diff32, tmp_path / "r")
    with pytest.raises(DiffError, match=rf"tensor '{name}' missing in BASE"):
        make_diff(missing, models["target32"], tmp_path / "d")
    with pytest.raises(DiffError, match=r"BASE .* has tensors the other side lacks"):
        make_diff(models["base"], missing, tmp_path / "d")
    reshaped = _edited_copy(models["base"], tmp_path / "reshaped", reshape)
    with pytest.raises(DiffError, match=rf"tensor '{name}': shape \[64, 64\] in BASE"):
        recover(reshaped, diff32, tmp_path / "r")
    with pytest.raises(DiffError, match=rf"tensor '{name}': shape .* in TARGET"):
        make_diff(reshaped, models["target32"], tmp_path / "d")


def test_folder_without_diff_info_is_not_a_diff(models, diff32, tmp_path):
    plain = shutil.copytree(diff32, tmp_path / "plain", ignore=shutil.ignore_patterns(DIFF_INFO))
    with pytest.raises(DiffError, match=r"no diff_info.json"):
        recover(models["base"], plain, tmp_path / "r")


def test_outputs_never_overlap_or_clobber_inputs(models, diff32, tmp_path):
    before = _snapshot(models["base"], diff32)
    with pytest.raises(DiffError, match="overlaps BASE"):
        make_diff(models["base"], models["target32"], models["base"])
    with pytest.raises(DiffError, match="overlaps DIFF"):
        recover(models["base"], diff32, diff32)
    with pytest.raises(DiffError, match="overlaps BASE"):
        recover(models["base"], diff32, models["base"].parent)  # would replace the folder holding BASE
    with pytest.raises(DiffError, match="overlaps BASE"):
        recover(models["base"], diff32, models["base"] / "sub")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(DiffError, match="refusing to replace"):
        recover(models["base"], diff32, tmp_path / "precious")
    recover(models["base"], diff32, tmp_path / "again")
    recover(models["base"], diff32, tmp_path / "again")  # an earlier recovered folder is replaced
    assert _snapshot(models["base"], diff32) == before
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_verify_catches_a_changed_folder(models, diff32, tmp_path):
    out = recover(models["base"], diff32, tmp_path / "r").out

    def bump(s):
        return s | {"embed_out.weight": s["embed_out.weight"] + 1}

    changed = _edited_copy(out, tmp_path / "changed", bump)
    with pytest.raises(DiffError, match="does not match"):
        verify(changed)
    with pytest.raises(DiffError, match="does not match"):
        verify(changed, diff32)
    with pytest.raises(WeightsError, match="no checksum file"):
        verify(models["target32"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/diff_checkpoint.py", *args, "--no-progress"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_make_diff_recover_and_wrong_base(models, tmp_path):
    base, target = str(models["base"]), str(models["target32"])
    r = _cli("--make-diff", "--base", base, "--target", target, "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert "needed fix-ups" in r.stdout
    r = _cli("--recover", "--base", base, "--diff", str(tmp_path / "d"), "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "bit-exact" in r.stdout
    _assert_same_weights(models["target32"], tmp_path / "r")
    other = str(models["other"])
    r = _cli("--recover", "--base", other, "--diff", str(tmp_path / "d"), "--out", str(tmp_path / "r2"))
    assert r.returncode == 1
    assert "error: BASE" in r.stderr and "is not the model this diff was made from: tensor" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r2").exists()


MEMORY_SCRIPT = """
import sys, torch
from chatkit.convert.weights import TensorRef, peak_rss_bytes, write_weights
from chatkit.convert.weight_diff import make_diff, recover
root, n, numel = sys.argv[1], 32, 2**19  # 32 fp32 tensors of 2 MB: 64 MB per model


def ref(i, shift):  # generated when written, so making the inputs holds one tensor too
    gen = lambda: torch.randn(numel, generator=torch.Generator().manual_seed(i)) + shift
    return TensorRef(f"t{i}", (numel,), torch.float32, gen)


start = peak_rss_bytes()  # after the imports
for name, shift in (("base", 0.0), ("target", 0.01)):
    write_weights(f"{root}/{name}", [ref(i, shift) for i in range(n)])
make_diff(f"{root}/base", f"{root}/target", f"{root}/diff")
recover(f"{root}/base", f"{root}/diff", f"{root}/rec")
print((peak_rss_bytes() - start) / 2**20)
"""


def test_memory_stays_at_a_few_tensors(tmp_path):
    """Peak memory grows by a few 2 MB tensors, far from the 64 MB one model holds (128 MB for base and
    target): a version that loads whole state dicts fails this."""
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    grew_mb = float(r.stdout.split()[-1])
    print(f"peak RSS grew {grew_mb:.0f} MB")
    assert grew_mb < 48


def _hard_fp32_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A base and an fp32 target whose diff needs fix-ups (every element moved by about its own size)."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, 32, generator=g) * 0.02
    t = (b.double() + torch.randn(64, 32, generator=g, dtype=torch.float64) * 0.02).float()
    return _raw_folder(tmp_path / "b", {"w": b}), _raw_folder(tmp_path / "t", {"w": t})


def test_cli_prints_each_message_once(tmp_path, capfd, monkeypatch):
    """One line per result (the tool's), not the tool's and the library's log line too."""
    import runpy

    from loguru import logger

    main = runpy.run_path(str(REPO / "tools" / "diff_checkpoint.py"), run_name="tools.diff_checkpoint")[
        "main"
    ]
    base, target = _hard_fp32_pair(tmp_path)

    def output(*args: str) -> str:
        """Everything the tool shows: stdout, stderr and loguru's messages (whatever sink it has)."""
        capfd.readouterr()
        logged: list[str] = []
        sink = logger.add(logged.append, level="DEBUG", format="{message}")
        monkeypatch.setattr(sys, "argv", ["diff_checkpoint.py", *args, "--no-progress"])
        try:
            main()
        finally:
            logger.remove(sink)
        return "".join(capfd.readouterr()) + "".join(logged)

    text = output("--make-diff", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "d"))
    assert text.count("fix-ups") == 1 and text.count("\n") == 1, text
    text = output(
        "--recover", "--base", str(base), "--diff", str(tmp_path / "d"), "--out", str(tmp_path / "r")
    )
    assert text.startswith(f"recovered {tmp_path / 'r'}") and text.count("\n") == 1, text


def test_fixups_size_is_reported(tmp_path, capfd):
    """The fix-up file of an fp32 target can be a large share of the model: its size is in the report
    and in the tool's line, next to the target's."""
    base, target = _hard_fp32_pair(tmp_path)
    rep = make_diff(base, target, tmp_path / "d")
    size = (tmp_path / "d" / FIXUPS_FILE).stat().st_size
    assert rep.fixups_bytes == size and rep.target_bytes == 64 * 32 * 4
    assert size > 0.3 * rep.target_bytes  # 12 bytes (int64 index, fp32 value) an element fixed
    import runpy

    main = runpy.run_path(str(REPO / "tools" / "diff_checkpoint.py"), run_name="tools.diff_checkpoint")[
        "main"
    ]
    capfd.readouterr()
    main(
        [
            "--make-diff",
            "--base",
            str(base),
            "--target",
            str(target),
            "--out",
            str(tmp_path / "d"),
            "--no-progress",
        ]
    )
    out = capfd.readouterr().out
    assert (
        f"{FIXUPS_FILE}: {size / 1e3:.1f} kB, {size / rep.target_bytes:.0%} of the target's weights" in out
    ), out
