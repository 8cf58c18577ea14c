"""Resume at another layout (issue 17, item 2), through the real launcher on CPU ranks (gloo).

A run saved on 2 ranks with ZeRO-3 resumes on 3 ranks, on 1 rank and with ZeRO-2, keeping the global
batch (micro_batch_size x ranks): the loss of every following step equals that of the run that went on
at 2 ranks (1e-4), as do the final weights. A 2-stage pipeline run resumes without a pipeline. What
cannot be resumed is refused in one line before any step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatkit.conversation import write_conversations
from chatkit.convert.deepspeed import load_deepspeed_weights
from chatkit.datasets.synthetic import make_splits
from chatkit.pretrained import prepare_tiny

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 6
GLOBAL = 6  # rows per step: 2 ranks x 3, 3 x 2, 1 x 6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("universal")
    train, _ = make_splits(120, 0, seed=3)
    write_conversations(root / "train.jsonl", train)
    prepare_tiny(
        [str(root / "train.jsonl")], str(root / "base"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    return root


def launch(root: Path, name: str, *args: str, ranks: int, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
        f"train_files=[{root / 'train.jsonl'}]", f"output_dir={root / name}", f"cache_dir={root / 'cache'}",
        f"max_steps={STEPS}", "log_every=1", "warmup_steps=2", "learning_rate=2e-3", "max_length=128",
        "--cpu-ranks", str(ranks), "--master-port", "0", *args,
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    if ok:
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    else:
        assert r.returncode != 0, (r.stdout + r.stderr)[-4000:]
    return r


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in rows if "loss" in m}


def resumed_from(root: Path, source: str, name: str, step: int = 3) -> Path:
    """A new output folder holding `source`'s checkpoint of `step`, as a job resubmitted elsewhere."""
    out = root / name
    shutil.copytree(root / source / "checkpoints" / f"step{step}", out / "checkpoints" / f"step{step}")
    (out / "checkpoints" / "latest").write_text(f"step{step}")
    return out


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """2 ranks, ZeRO-3, 3 rows each: saved at step 3, run on to step 6."""
    launch(root, "ref", f"micro_batch_size={GLOBAL // 2}", "save_every=3", ranks=2)
    return root / "ref"


def assert_continues(reference: Path, run: Path, tol: float = 1e-4) -> None:
    ref, got = losses(reference), losses(run)
    assert sorted(got) == [4, 5, 6], got
    for step in got:
        assert abs(ref[step] - got[step]) < tol, (step, ref[step], got[step])
    wa, wb = load_deepspeed_weights(reference / "checkpoints"), load_deepspeed_weights(run / "checkpoints")
    assert max(float((wa[k] - wb[k]).detach().abs().max()) for k in wa) < tol


@pytest.mark.parametrize(
    ("ranks", "settings"),
    [
        (3, [f"micro_batch_size={GLOBAL // 3}"]),
        (1, [f"micro_batch_size={GLOBAL // 2}", "gradient_accumulation_steps=2"]),
        (2, [f"micro_batch_size={GLOBAL // 2}", "deepspeed=zero2"]),
    ],
    ids=["zero3-on-3-ranks", "zero3-on-1-rank", "zero2-on-2-ranks"],
)
def test_a_zero3_checkpoint_resumes_at_another_layout(root, reference, ranks, settings):
    name = f"resumed-{ranks}-{'-'.join(settings)}".replace("=", "")
    run = resumed_from(root, "ref", name)
    r = launch(root, name, *settings, "resume=auto", ranks=ranks)
    assert "at step 3" in r.stdout + r.stderr
    assert "universal checkpoint" in r.stdout + r.stderr
    assert_continues(reference, run)
    assert (run / "checkpoints" / "step3" / "universal" / "manifest.json").is_file()


def test_another_global_batch_is_refused_before_any_step(root, reference):
    name = "other-global"
    resumed_from(root, "ref", name)
    r = launch(root, name, "micro_batch_size=2", "resume=auto", ranks=2, ok=False)
    err = r.stderr
    assert "global_batch 6 -> 4" in err and "keep the global batch" in err, err[-2000:]
    assert "step 4" not in r.stdout + err


def test_a_zero2_checkpoint_resumes_under_zero3_on_3_ranks(root, reference):
    """The other direction: ZeRO-2's universal form (per-parameter steps, ds_version) read by ZeRO-3."""
    launch(root, "ref-zero2", f"micro_batch_size={GLOBAL // 2}", "save_every=3", "deepspeed=zero2", ranks=2)
    run = resumed_from(root, "ref-zero2", "zero2-to-zero3")
    launch(root, "zero2-to-zero3", f"micro_batch_size={GLOBAL // 3}", "resume=auto", ranks=3)
    assert_continues(root / "ref-zero2", run)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_two_stage_pipeline_resumes_without_a_pipeline(root, precision):
    """Pipeline checkpoints (no ZeRO: one torch AdamW per stage, or bf16's flat fp32 partitions) are
    converted by chatkit, named as the model's parameters, and continue under ZeRO-3 on one rank.
    bf16 steps agree to bf16's resolution only: the two layouts round activations differently."""
    ref = f"pipe-{precision}"
    launch(
        root, ref, f"micro_batch_size={GLOBAL}", "pipeline_stages=2", "deepspeed=pipeline", "save_every=3",
        f"precision={precision}", ranks=2,
    )  # fmt: skip
    assert (root / ref / "checkpoints" / "step3" / "optimizer_params_stage1.json").is_file()
    run = resumed_from(root, ref, f"{ref}-on-1")
    r = launch(
        root, f"{ref}-on-1", f"micro_batch_size={GLOBAL}", "resume=auto", f"precision={precision}", ranks=1
    )
    assert "saved at 2 pipeline stages x 1 data-parallel rank(s)" in r.stdout + r.stderr
    ref_losses, got = losses(root / ref), losses(run)
    assert sorted(got) == [4, 5, 6]
    tol = 1e-5 if precision == "fp32" else 2e-3
    for step in got:
        assert abs(ref_losses[step] - got[step]) < tol, (step, ref_losses[step], got[step])


def test_a_layout_that_cannot_take_the_checkpoint_is_refused_before_any_step(root, reference):
    name = "to-zero0"
    resumed_from(root, "ref", name)
    r = launch(root, name, f"micro_batch_size={GLOBAL}", "deepspeed=zero0", "resume=auto", ranks=1, ok=False)
    assert "into ZeRO stages 1-3 only" in r.stderr and "deepspeed=zero2 or zero3" in r.stderr, r.stderr[
        -2000:
    ]
    assert "step 4" not in r.stdout + r.stderr
    assert r.stderr.count("error:") == 1, r.stderr[-2000:]


def test_a_lora_checkpoint_resumes_on_one_rank(root):
    """LoRA under ZeRO-3: the adapters' moments move; the frozen base is the one the run loads.
    Without LoRA dropout, so that no random draw depends on which rank holds a row."""
    lora = ["lora_r=4", "lora_alpha=8", "lora_dropout=0"]
    launch(root, "lora", f"micro_batch_size={GLOBAL // 2}", "save_every=3", *lora, ranks=2)
    run = resumed_from(root, "lora", "lora-on-1")
    launch(root, "lora-on-1", f"micro_batch_size={GLOBAL}", "resume=auto", *lora, ranks=1)
    ref, got = losses(root / "lora"), losses(run)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert abs(ref[step] - got[step]) < 1e-5, (step, ref[step], got[step])
