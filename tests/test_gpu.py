"""The gpu tier: the paths the CPU suite cannot see, run on CUDA with nccl. Skipped, saying why, where
torch sees no CUDA device; `pytest -m gpu` runs the tier alone on a GPU machine.

- every collective of the loop runs on the engine's device (nccl reduces no CPU tensor: the pipeline
  engine's data-parallel sums once did, and stopped every pipeline recipe at its first step);
- ZeRO-3 training samples replies with every rank taking rank 0's token, so all ranks stop together;
- the pipeline engine honours gradient_checkpointing (two GPUs or more).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="no CUDA device: the gpu tier runs on GPUs"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from chatkit.conversation import write_conversations
    from chatkit.datasets.synthetic import make_splits
    from chatkit.pretrained import prepare_tiny

    root = tmp_path_factory.mktemp("gpu")
    train, val = make_splits(256, 9, seed=3)
    write_conversations(root / "train.jsonl", train)
    write_conversations(root / "val.jsonl", val)
    prepare_tiny(
        [str(root / "train.jsonl")], str(root / "neox"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    return root


def _train(root: Path, name: str, gpus: int, overrides: list[str]) -> Path:
    out = root / name
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'neox'}",
        f"train_files=[{root / 'train.jsonl'}]", f"val_files=[{root / 'val.jsonl'}]", f"output_dir={out}",
        f"cache_dir={root / 'cache'}", "max_steps=4", "eval_every=2", "log_every=1", "max_length=128",
        "micro_batch_size=2", "precision=bf16", 'eval_prompts=["What is 2 + 3?"]',
        "--num-gpus", str(gpus), "--master-port", "0", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    (root / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_all_sum_runs_on_the_device_under_nccl():
    """The loop's sums on an nccl group: on the CUDA device they reduce; a CPU tensor is refused."""
    import torch.distributed as dist

    from chatkit.train.distributed import all_sum

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    os.environ.update(env)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        assert all_sum([1.5, 2.0], torch.device("cuda", 0)) == [1.5, 2.0]
        with pytest.raises((RuntimeError, ValueError)):  # what the pipeline engine's CPU tensor met on GPUs
            dist.all_reduce(torch.tensor([1.0], dtype=torch.float64))
    finally:
        dist.destroy_process_group()


def test_zero3_trains_evaluates_and_samples_on_cuda(root):
    ranks = min(torch.cuda.device_count(), 2)
    out = _train(root, "zero3", ranks, ["deepspeed=zero3"])
    rows = _rows(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(l == l and l < 50 for l in losses)  # noqa: E741 (finite)
    assert len([r for r in rows if "samples" in r]) == 2 and len([r for r in rows if "val_loss" in r]) == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step4"


def test_pipeline_with_gradient_checkpointing_on_cuda(root):
    if torch.cuda.device_count() < 2:
        pytest.skip("a pipeline needs 2 GPUs (nccl ranks cannot share one device)")
    out = _train(root, "pipe", 2, ["deepspeed=pipeline", "pipeline_stages=2", "gradient_checkpointing=true"])
    assert "activation checkpointing: every 1 pipeline layer(s)" in (root / "pipe.log").read_text()
    rows = _rows(out)
    assert len([r for r in rows if "loss" in r]) == 4 and len([r for r in rows if "samples" in r]) == 2


def test_vllm_serves_the_export_as_the_bot_does(root):
    """tools/vllm_parity.py on a chatkit model folder: vLLM's chat prompt (from the embedded template)
    and its greedy replies equal the bot's engine's."""
    pytest.importorskip("vllm", reason="vLLM parity needs the vllm package")
    proc = subprocess.run(
        [sys.executable, "tools/vllm_parity.py", "--model", str(root / "neox"), "--require", "-n", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert result["prompts"] == result["prompts_identical"] == result["replies_identical"] == 4
