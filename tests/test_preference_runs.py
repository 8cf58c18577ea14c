"""Preference training through the real launcher on CPU ranks (gloo), as a user runs it:

- ZeRO-3 on 2 ranks takes the same steps as one process (loss and reward statistics to 1e-5, weights to 1e-4),
  and both compute the same reference log-probabilities (each rank scores a share of the pairs);
- a second run reads the reference from the cache; a run killed mid-way and resumed ends where the
  uninterrupted run ends (the reference is always the starting model, never the checkpoint);
- LoRA under ZeRO-3 and QLoRA (4-bit base, ZeRO-2) train with DPO; the reference-free losses need no
  reference pass;
- metrics.jsonl, train.log and the curves carry the preference statistics.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chatkit.conversation import write_conversations
from chatkit.convert.deepspeed import load_deepspeed_weights
from chatkit.datasets.synthetic import make_splits, near_miss
from chatkit.pretrained import prepare_tiny

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    train, val = make_splits(96, 8, seed=5)
    write_conversations(root / "sft.jsonl", train)
    rng = random.Random(0)
    for name, convs in (("pairs", train), ("val", val)):
        with (root / f"{name}.jsonl").open("w") as f:
            for c in convs:
                *prompt, reply = (m.to_dict() for m in c.messages)
                rejected = near_miss(reply["content"], rng)
                f.write(
                    json.dumps({"messages": prompt, "chosen": reply, "rejected": {"content": rejected}})
                    + "\n"
                )
    prepare_tiny([str(root / "sft.jsonl")], str(root / "base"), vocab_size=300, layers=2, hidden=64, heads=4)
    return root


def launch(root: Path, name: str, *args: str, ranks: int = 1, env: dict | None = None, ok: bool = True):
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
        f"train_files=[{root / 'pairs.jsonl'}]", f"val_files=[{root / 'val.jsonl'}]", f"output_dir={root / name}",
        f"cache_dir={root / ('cache-' + name)}", f"max_steps={STEPS}", "log_every=1", "warmup_steps=0",
        "learning_rate=2e-3", "max_length=256", "micro_batch_size=2", "method=dpo", "beta=0.5",
        "--cpu-ranks", str(ranks), "--master-port", "0", *args,
    ]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )
    if ok:
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    else:
        assert r.returncode != 0
    return r


def rows(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "loss" in m}


def references(root: Path, name: str) -> list[np.ndarray]:
    """The cached reference log-probabilities of the train set, then the validation set's (each named
    by its tokenized set's key, the name of the set's cache entry after its file's stem)."""
    cache, out = root / f"cache-{name}", []
    for stem in ("pairs", "val"):
        (entry,) = cache.glob(f"{stem}-*")
        (ref,) = cache.glob(f"reference-{entry.name.removeprefix(stem + '-')}-*.npy")
        out.append(np.load(ref))
    return out


@pytest.fixture(scope="module")
def one(root) -> Path:
    launch(root, "one", "save_every=2", "micro_batch_size=4", "about=adds numbers")  # rows 2 ranks x 2 see
    return root / "one"


def test_zero3_on_two_ranks_equals_one_process(root, one):
    launch(root, "two", ranks=2)
    a, b = rows(one), rows(root / "two")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-5), (step, key)
    assert a[STEPS]["chosen_reward"] != 0 and a[STEPS]["reward_margin"] != 0  # the policy left its reference
    ra, rb = references(root, "one"), references(root, "two")
    assert len(ra) == len(rb) == 2  # train and validation sets
    for x, y in zip(ra, rb, strict=True):  # NaN: pairs the run never draws are never scored
        assert x.shape[1] == 2 and np.array_equal(np.isnan(x), np.isnan(y)) and (x[~np.isnan(x)] < 0).all()
        assert np.allclose(x, y, rtol=1e-6, equal_nan=True)
    scored = np.flatnonzero(~np.isnan(ra[0][:, 0]))
    assert 0 < len(scored) < len(ra[0][:, 0])  # 4 steps of 4 rows: only what they draw (train set)
    assert not np.isnan(ra[1]).any()  # the validation set: every pair
    wa, wb = load_deepspeed_weights(one / "checkpoints"), load_deepspeed_weights(root / "two" / "checkpoints")
    # Adam turns summation-order differences of the gradients (1e-7) into weight differences of ~3e-5
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_chunked_log_probabilities_on_two_zero3_ranks_equal_the_logits_path(root, one):
    """chunked_loss=always: the policy's and the reference's log-probabilities come from hidden states
    chunk by chunk (the backward recomputes each chunk from the head ZeRO-3 gathers again), and the
    run takes the steps of the logits path."""
    launch(root, "chunked", "chunked_loss=always", ranks=2)
    a, b = rows(one), rows(root / "chunked")
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "reward_margin", "chosen_logps", "rejected_logps"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-5), (step, key)
    for x, y in zip(references(root, "one"), references(root, "chunked"), strict=True):
        assert np.allclose(x, y, rtol=1e-6, equal_nan=True)
    wa, wb = (
        load_deepspeed_weights(one / "checkpoints"),
        load_deepspeed_weights(root / "chunked" / "checkpoints"),
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_about_travels_in_every_checkpoint(one):
    for step in (2, 4):
        assert (
            json.loads((one / "checkpoints" / f"step{step}" / "chatkit.json").read_text())["about"]
            == "adds numbers"
        )


def test_statistics_reach_metrics_log_and_curves(one):
    last = rows(one)[STEPS]
    for key in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps"):
        assert key in last
    val = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert val and 0 <= val[-1]["val_reward_accuracy"] <= 1 and "val_ppl" not in val[-1]
    log = (one / "train.log").read_text()
    assert "preference pairs" in log and "| reward_accuracy" in log and "val_reward_accuracy" in log
    assert "reference log-probabilities of" in log and (one / "curves.png").stat().st_size > 1000


def test_killed_run_resumes_to_the_uninterrupted_result(root, one):
    import shutil

    shutil.copytree(root / "cache-one", root / "cache-killed")
    args = ("save_every=2", "micro_batch_size=4")
    launch(root, "killed", *args, env={"CHATKIT_FAULT": "step:3"}, ok=False)
    r = launch(root, "killed", *args, "resume=auto")
    log = r.stdout + r.stderr
    assert "at step 2" in log and "read from" in log  # the cached reference, not the checkpoint's model
    assert rows(root / "killed")[STEPS]["loss"] == pytest.approx(rows(one)[STEPS]["loss"], abs=1e-6)


@pytest.mark.parametrize(
    "args",
    [
        ("lora_r=4", "deepspeed=zero3"),
        ("lora_r=4", "quantize=4bit", "deepspeed=zero2", "precision=bf16"),
        ("preference_loss=simpo", "deepspeed=zero2"),
        ("preference_loss=orpo", "deepspeed=zero2"),
    ],
    ids=["lora-zero3", "qlora-zero2", "simpo", "orpo"],
)
def test_adapters_and_reference_free_losses_train(root, args):
    name = "-".join(a.split("=")[1] for a in args)
    r = launch(root, name, *args)
    last = rows(root / name)[STEPS]
    assert all(np.isfinite(last[k]) for k in ("loss", "reward_margin", "chosen_logps"))
    computed = "reference log-probabilities" in r.stdout + r.stderr
    assert computed == ("preference_loss" not in args[0])  # SimPO and ORPO need no reference pass
