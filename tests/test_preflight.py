"""Pre-flight checks and the hang doctor (chatkit.train.preflight, chatkit.train.watchdog).

- the same code and config on every rank: the message names the ranks, hosts, files and settings;
- room for the checkpoints to come: the estimate against a real DeepSpeed checkpoint's size, and the
  one-line refusal;
- the collective backend: a first all-reduce a peer never joins fails in time, naming the rank;
- a rank stalled at a step: every rank's Python stack and last collective reach the log, and the run
  ends with a non-zero status within collective_timeout_s (a real launch on CPU ranks).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from chatkit.config import TrainConfig
from chatkit.train import preflight
from chatkit.train.context import RunError
from chatkit.train.preflight import (
    checkpoint_bytes,
    checkpoints_ahead,
    describe_mismatch,
    fingerprint,
    rank_list,
    source_hashes,
)

REPO = Path(__file__).resolve().parents[1]


def _found(cfgs: list[TrainConfig], hosts: list[str], sources: list[dict] | None = None) -> list[tuple]:
    sources = sources or [{"chatkit/a.py": "1"}] * len(cfgs)
    return [(h, fingerprint(c, s)) for c, h, s in zip(cfgs, hosts, sources, strict=True)]


def test_ranks_that_agree_pass():
    cfg = TrainConfig(train_files=["t.jsonl"])
    assert describe_mismatch(_found([cfg] * 4, ["a", "a", "b", "b"])) is None


def test_node_local_paths_may_differ():
    """Each node's mount point of the shared output folder, each node's own cache."""
    a = TrainConfig(train_files=["t.jsonl"], output_dir="/mnt/a/run", cache_dir="/local/a")
    b = TrainConfig(train_files=["t.jsonl"], output_dir="/shared/run", cache_dir="/local/b")
    assert describe_mismatch(_found([a, b], ["a", "b"])) is None


def test_a_config_mismatch_names_the_ranks_hosts_and_setting():
    cfg = TrainConfig(train_files=["t.jsonl"])
    odd = TrainConfig(train_files=["t.jsonl"], learning_rate=2e-3)
    message = describe_mismatch(_found([cfg, cfg, odd, odd], ["node-a", "node-a", "node-b", "node-b"]))
    assert message == (
        "the ranks do not run the same code and config: ranks 2-3 on node-b differ from rank 0 on node-a; "
        "rank 2: config learning_rate=0.002 (rank 0: 0.0001). Install the same chatkit and libraries on "
        "every node and launch each with the same recipe and overrides"
    )


def test_a_source_mismatch_names_the_files_and_a_library_its_version():
    cfg = TrainConfig(train_files=["t.jsonl"])
    same = {"chatkit/loop.py": "1", "chatkit/run.py": "2"}
    other = {"chatkit/loop.py": "9", "chatkit/run.py": "2", "chatkit/new.py": "3"}
    found = _found([cfg, cfg, cfg], ["a", "b", "c"], [same, same, other])
    found[1][1]["versions"]["deepspeed"] = "0.1.0"
    message = describe_mismatch(found, [same, same, other])
    assert (
        "ranks do not run the same code and config: rank 1 on b; rank 2 on c differ from rank 0 on a"
        in message
    )
    deepspeed = found[0][1]["versions"]["deepspeed"]
    assert f"rank 1: deepspeed 0.1.0 (rank 0: {deepspeed})." in message
    found = [found[0], found[2]]
    message = describe_mismatch(found, [same, other])
    assert "rank 1: chatkit's source (chatkit/loop.py, chatkit/new.py)." in message


def test_rank_lists_are_spans():
    assert rank_list([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8" and rank_list([3]) == "3"


def test_the_source_hash_covers_chatkit_and_sees_an_edit(tmp_path):
    hashes = source_hashes()
    assert "chatkit/train/loop.py" in hashes and "chatkit/config.py" in hashes
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes.values())


# --- room for checkpoints ---------------------------------------------------------------------------


def test_the_checkpoint_estimate_matches_a_zero3_checkpoint():
    """Measured: 138,496 parameters, ZeRO-3, fp32, 2 ranks: two optim_states files of 835,219 bytes
    and two model_states files of 21,129 (tests/test_training_runs.py's model)."""
    measured = 2 * 835_219 + 2 * 21_129
    assert abs(checkpoint_bytes(138_496, 138_496, "fp32", 3) - measured) / measured < 0.05


def test_the_estimate_by_stage_precision_and_lora():
    n = 1_000_000
    assert checkpoint_bytes(n, n, "bf16", 2) == 2 * n + 12 * n  # bf16 weights + fp32 master + Adam
    assert checkpoint_bytes(n, n, "fp32", 0) == 4 * n + 8 * n  # no master copy without ZeRO in fp32
    assert checkpoint_bytes(n, n // 100, "bf16", 3) == 2 * (n - n // 100) + 12 * (n // 100)  # LoRA


@pytest.mark.parametrize(
    "start, steps, save_every, keep, existing, ahead",
    [
        (0, 100, 0, 0, 0, 1),  # the final save only
        (0, 100, 10, 0, 0, 10),  # every 10 steps, keeping all
        (50, 100, 10, 0, 5, 5),  # resumed at 50: saves at 60..100
        (0, 100, 10, 2, 0, 3),  # keep 2: a third is complete before the oldest goes
        (0, 100, 10, 2, 4, 1),  # more than kept already: one more at a time
        (100, 100, 10, 2, 2, 0),  # nothing left to do
    ],
)
def test_checkpoints_ahead(start, steps, save_every, keep, existing, ahead):
    assert checkpoints_ahead(start, steps, save_every, keep, existing) == ahead


class _Engine:
    def describe(self) -> tuple[str, int]:
        return "2 rank(s)", 7_000_000_000


def test_a_full_disk_is_refused_with_one_line(tmp_path, monkeypatch, caplog_loguru):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    free = [50 * 1024**3]
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10 * 1024**4, 0, free[0]))
    cfg = TrainConfig(
        train_files=["t.jsonl"],
        output_dir=str(tmp_path),
        precision="bf16",
        save_every=100,
        keep_checkpoints=2,
    )
    with pytest.raises(RunError) as e:
        preflight.check_disk_room(cfg, _Engine(), 0, 0, 300)
    assert str(e.value) == (
        f"output_dir {tmp_path} has 50.0 GiB free and the checkpoints still to come need about 273.8 GiB "
        "(3 x 91.27 GiB: 7,000,000,000 parameters, 7,000,000,000 trained, ZeRO stage 0, bf16, "
        "keep_checkpoints=2): free space there, lower keep_checkpoints or raise save_every, or choose "
        "another output_dir"
    )
    assert e.value.all_ranks
    free[0] = 300 * 1024**3
    preflight.check_disk_room(cfg, _Engine(), 0, 0, 300)  # room enough
    assert caplog_loguru == []


def test_keeping_every_checkpoint_needs_room_for_the_next_and_warns_of_the_rest(
    tmp_path, monkeypatch, caplog_loguru
):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10 * 1024**4, 0, 150 * 1024**3))
    cfg = TrainConfig(train_files=["t.jsonl"], output_dir=str(tmp_path), precision="bf16", save_every=100)
    preflight.check_disk_room(cfg, _Engine(), 0, 0, 300)  # one fits: go, with a warning
    assert [line.split(" (")[0] for line in caplog_loguru] == [
        f"output_dir {tmp_path} has 150.0 GiB free and the checkpoints still to come need about 273.8 GiB"
    ]
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10 * 1024**4, 0, 50 * 1024**3))
    with pytest.raises(RunError, match=r"need about 91.3 GiB \(1 x 91.27 GiB"):
        preflight.check_disk_room(cfg, _Engine(), 0, 0, 300)


# --- the backend and hangs: several processes -------------------------------------------------------

BACKEND = textwrap.dedent(
    """
    import os, sys, time, torch, torch.distributed as dist
    rank, port = int(sys.argv[1]), sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from chatkit.train.preflight import check_backend
    if rank == 1:  # never joins
        time.sleep(20)
        os._exit(0)
    start = time.monotonic()
    try:
        check_backend(0, 2, torch.device("cpu"), 2)
    except Exception as e:
        print(f"{time.monotonic() - start:.1f} {type(e).__name__}: {e}", flush=True)
    os._exit(0)
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_first_all_reduce_that_never_completes_fails_in_time_naming_the_rank():
    import socket

    from chatkit.launch import free_port

    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BACKEND, str(r), port], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    out = procs[0].communicate(timeout=120)[0].strip().splitlines()[-1]
    procs[1].kill()
    took, line = out.split(" ", 1)
    assert 2 <= float(took) < 4
    assert line.startswith(
        f"BackendTimeout: rank 0 ({socket.gethostname()}): the first all-reduce over gloo did not complete in 2 s"
    )


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory) -> Path:
    from chatkit.conversation import write_conversations
    from chatkit.datasets.synthetic import make_splits
    from chatkit.pretrained import prepare_tiny

    root = tmp_path_factory.mktemp("hang")
    train, _ = make_splits(64, 0, seed=3)
    write_conversations(root / "train.jsonl", train)
    prepare_tiny(
        [str(root / "train.jsonl")], str(root / "base"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    return root


TIMEOUT_S = 15


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stalled_rank_gets_every_ranks_stack_logged_and_the_run_ends(base_and_data):
    """Rank 1 sleeps at the start of step 2 (the test hook); rank 0 waits for it in the step's first
    all-reduce. Past collective_timeout_s both stacks are written, rank 1's through the store, and
    the run exits non-zero well before torch's own timeout."""
    root = base_and_data
    out = root / "stalled"
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
        f"train_files=[{root / 'train.jsonl'}]", f"output_dir={out}", f"cache_dir={root / 'cache'}",
        "max_steps=10", "log_every=1", "max_length=128", "micro_batch_size=2", f"collective_timeout_s={TIMEOUT_S}",
        "--cpu-ranks", "2", "--master-port", "0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("CHATKIT_CPU_RANKS", "MASTER_PORT")}
    env |= {"CHATKIT_TEST_STALL_RANK": "1", "CHATKIT_TEST_STALL_STEP": "2"}
    log = (root / "stalled.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, (root / "stalled.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.1)
        start = time.monotonic()  # step 1 is logged: step 2 is stalled now, or within a moment
        rc = proc.wait(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - start
    finally:
        proc.kill()
        log.close()
    text = (root / "stalled.log").read_text()
    assert rc != 0 and TIMEOUT_S <= took < TIMEOUT_S + 15, (took, text[-4000:])
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    lines = text.splitlines()
    cause = f"all_reduce has not completed after {TIMEOUT_S} s"
    for rank in (0, 1):
        mine = [line.split("] ", 1)[1] for line in lines if line.startswith(f"[rank {rank}] ")]
        assert mine and mine[0].startswith("error: hang: rank 0 (") and cause in mine[0], text[-4000:]
        assert f"Rank {rank} (" in mine[0] and "at step 2:" in mine[0]
        assert any(re.search(r'File ".*chatkit/train/loop\.py", line \d+ in fit', x) for x in mine), mine
        assert (out / "hangs" / f"rank{rank}.txt").read_text().startswith(mine[0])
    rank0 = next(line for line in lines if line.startswith("[rank 0] error: hang"))
    rank1 = next(line for line in lines if line.startswith("[rank 1] error: hang"))
    assert f"in all_reduce for {TIMEOUT_S}" in rank0 or f"in all_reduce for {TIMEOUT_S + 1}" in rank0
    assert "not in a collective; the last, all_reduce, returned" in rank1
    assert any("in stall_for_tests" in line for line in lines if line.startswith("[rank 1] "))
