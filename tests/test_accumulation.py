"""Loss normalisation across gradient accumulation, through the real DeepSpeed engine.

Two runs see the same rows in each optimizer step: 2 micro-batches of 1 row (accumulated) and 1
micro-batch of 2 rows. With the loss divided by the trained tokens of the whole step (not per
micro-batch), they take the same steps: equal losses and equal weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatkit.conversation import write_conversations
from chatkit.convert.deepspeed import load_deepspeed_weights
from chatkit.datasets.synthetic import make_splits
from chatkit.pretrained import prepare_tiny

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _train(root: Path, name: str, overrides: list[str]) -> Path:
    out = root / name
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
        f"train_files=[{root / 'train.jsonl'}]", f"output_dir={out}", f"cache_dir={root / 'cache'}",
        "max_steps=3", "log_every=1", "warmup_steps=0", "learning_rate=1e-3", "pack=false", "max_length=128",
        "--cpu-ranks", "1", "--master-port", "0", *overrides,
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return out


def test_accumulated_micro_batches_equal_one_batch(tmp_path):
    # conversations of different lengths, so per-micro-batch averaging would weigh tokens differently
    train, _ = make_splits(64, 0, seed=3)
    write_conversations(tmp_path / "train.jsonl", train)
    prepare_tiny(
        [str(tmp_path / "train.jsonl")], str(tmp_path / "base"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    acc = _train(tmp_path, "acc", ["micro_batch_size=1", "gradient_accumulation_steps=2"])
    one = _train(tmp_path, "one", ["micro_batch_size=2", "gradient_accumulation_steps=1"])
    losses = [
        [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (acc, one)
    ]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    wa = load_deepspeed_weights(acc / "checkpoints")
    wb = load_deepspeed_weights(one / "checkpoints")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert any(not torch.equal(base[n], wa[n]) for n in wa if n in base)  # training moved the weights
