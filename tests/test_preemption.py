"""Preemption: SIGTERM or SIGUSR1 ends a run after a step, with a checkpoint and exit status 0, and
`resume=auto` ends with the weights of the uninterrupted run.

- the loop (fake engine, in process): a signal during step 2 saves step 2, skips the end-of-run work,
  and tells the launcher;
- the launcher (stand-in runner, launcher and rank processes): the signal reaches the registered ranks
  only, the run has preempt_grace_s (not the 10 s of a stop), and the status says whether it saved;
- real launches on CPU ranks (ZeRO-3, SIGTERM; pipeline, SIGUSR1): a signal to the launcher after the
  first logged step, a checkpoint, exit 0, the resume line, and a resumed run equal to an
  uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_loop import FakeEngine, _fit, _run

from chatkit.train import preemption

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_rank(monkeypatch):
    """Collectives of one rank (as tests/test_loop.py), and the preemption flag put back afterwards."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda *a, **k: None)
    handlers = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    preemption._requested = 0


def test_a_signal_during_a_step_saves_that_step_and_stops(
    tmp_path, make_wordlevel_tokenizer, one_rank, monkeypatch
):
    launch_dir = tmp_path / "launch"
    launch_dir.mkdir()
    monkeypatch.setenv(preemption.LAUNCH_DIR_ENV, str(launch_dir))
    monkeypatch.setenv("RANK", "0")
    preemption.listen()
    assert (launch_dir / "rank0.pid").read_text() == str(os.getpid())

    class Preempted(FakeEngine):
        def train_step(self, micro, count):
            if len(self.steps) == 1:  # during step 2
                os.kill(os.getpid(), signal.SIGTERM)
            return super().train_step(micro, count)

    run = _run(tmp_path, make_wordlevel_tokenizer(), save_every=3, eval_every=1)
    engine = Preempted(tmp_path)
    last, _ = _fit(run, engine)
    assert len(engine.steps) == 2 and last["step"] == 2
    assert [c[:2] for c in engine.calls if c[0] == "save"] == [("save", 2)]
    assert [c for c in engine.calls if c[0] == "evaluate"] == [("evaluate", 1)]  # none after the signal
    assert not (run.out / "final_metrics.json").exists()
    assert preemption.stopped(launch_dir) == {
        "step": 2, "checkpoint": str((tmp_path / "step2").resolve()), "signal": "SIGTERM",
    }  # fmt: skip


def test_no_signal_no_stop(tmp_path, make_wordlevel_tokenizer, one_rank):
    preemption.listen()
    engine = FakeEngine(tmp_path)
    _fit(_run(tmp_path, make_wordlevel_tokenizer()), engine)
    assert len(engine.steps) == 4 and (tmp_path / "out" / "final_metrics.json").is_file()


def test_the_resume_line_names_the_checkpoint_and_the_command():
    from chatkit.launch import resume_line

    line = resume_line(
        {"step": 7, "checkpoint": "/o/checkpoints/step7", "signal": "SIGUSR1"},
        ["config/tiny.yaml", "max_steps=9", "resume=", "--cpu-ranks", "2"],
    )
    assert line == (
        "launch: SIGUSR1: the run saved /o/checkpoints/step7 after step 7 and stopped; to continue: "
        "python -m chatkit.launch config/tiny.yaml max_steps=9 --cpu-ranks 2 resume=auto"
    )


# --- the launcher's side, with stand-ins for DeepSpeed's processes ----------------------------------

# The runner starts a per-node launcher that, like DeepSpeed's, exits 1 on SIGTERM; it starts a rank
# that registers (chatkit.train.preemption.listen) and, asked to stop, takes SAVE_S seconds to "save",
# reports it and exits 0 (or, with SAVE_S < 0, ignores the request).
TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    role, save_s = sys.argv[1], float(sys.argv[2])
    if role == "runner":
        sys.exit(subprocess.call([sys.executable, __file__, "launcher", sys.argv[2]]))
    if role == "launcher":
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
        rank = subprocess.Popen([sys.executable, __file__, "rank", sys.argv[2]])
        sys.exit(rank.wait())
    from chatkit.train import preemption
    preemption.listen()
    while not preemption.requested():
        time.sleep(0.05)
    if save_s < 0:
        time.sleep(600)
    time.sleep(save_s)
    preemption.report_stopped(3, "/ckpt/step3", preemption.requested())
    """
)
RUN_GROUP = (
    "import sys; from chatkit.launch import run_group; "
    "sys.exit(run_group(sys.argv[2:], {**__import__('os').environ, "
    "'CHATKIT_LAUNCH_DIR': sys.argv[1], 'CHATKIT_PREEMPT_GRACE_S': '15'}))"
)


def _tree(tmp_path: Path, save_s: float) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "tree.py").write_text(TREE)
    folder = tmp_path / "launch"
    folder.mkdir()
    cmd = [
        sys.executable,
        "-c",
        RUN_GROUP,
        str(folder),
        sys.executable,
        str(tmp_path / "tree.py"),
        "runner",
        str(save_s),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (folder / "rank0.pid").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    return proc, folder


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_the_ranks_alone_are_told_and_have_the_preemption_grace(tmp_path, signum):
    """Saving takes 11 s, more than a stop's 10 s: the launcher waits (grace 15 s here), DeepSpeed's
    stand-in launcher is never signalled (it would exit 1), and the status is 0."""
    proc, folder = _tree(tmp_path, 11)
    try:
        start = time.monotonic()
        os.kill(proc.pid, signum)
        time.sleep(1)
        os.kill(proc.pid, signum)  # a repeat changes nothing
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert 11 < time.monotonic() - start < 15
        assert f"launch: {signal.Signals(signum).name}: asking the run to save a checkpoint and stop" in err
        assert preemption.stopped(folder)["signal"] == signal.Signals(signum).name
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_run_that_does_not_save_in_time_is_killed_and_fails(tmp_path):
    proc, folder = _tree(tmp_path, -1)
    try:
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert 15 < time.monotonic() - start < 15 + 8
    finally:
        proc.kill()


@pytest.mark.slow
def test_ctrl_c_during_a_preemption_save_stops_the_run_as_before(tmp_path):
    proc, folder = _tree(tmp_path, 30)
    try:
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(1)
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - start < 10 + 3, err
        assert "launch: SIGINT: stopping the run" in err
    finally:
        proc.kill()


# --- real launches: DeepSpeed on CPU ranks ----------------------------------------------------------

STEPS = 40  # a tiny step takes ~0.2 s: the signal lands mid-run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from chatkit.conversation import write_conversations
    from chatkit.datasets.synthetic import make_splits
    from chatkit.pretrained import prepare_tiny

    root = tmp_path_factory.mktemp("preempt")
    train, _ = make_splits(160, 0, seed=2)
    write_conversations(root / "train.jsonl", train)
    prepare_tiny(
        [str(root / "train.jsonl")], str(root / "base"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    return root


ENGINES = {
    "zero3": ["deepspeed=zero3"],
    "pipeline": ["deepspeed=pipeline", "pipeline_stages=2"],
}


def _cmd(root: Path, name: str, engine: str, *more: str) -> list[str]:
    return [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
        f"train_files=[{root / 'train.jsonl'}]", f"output_dir={root / name}", f"cache_dir={root / 'cache'}",
        f"max_steps={STEPS}", "log_every=1", "warmup_steps=0", "learning_rate=2e-3", "max_length=128",
        "micro_batch_size=2", *ENGINES[engine], "--cpu-ranks", "2", "--master-port", "0", *more,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("CHATKIT_CPU_RANKS", "MASTER_PORT")}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from chatkit.convert.deepspeed import load_deepspeed_weights

    return load_deepspeed_weights(run / "checkpoints")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine, signum", [("zero3", signal.SIGTERM), ("pipeline", signal.SIGUSR1)])
def test_a_preempted_run_saves_exits_0_and_resumes_exactly(root, engine, signum):
    name = f"{engine}-preempted"
    out = root / name
    # the uninterrupted run alongside (start-up overlaps well even on 2 cores)
    ref = subprocess.Popen(_cmd(root, f"{engine}-ref", engine), cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = (root / f"{name}.log").open("w")
    proc = subprocess.Popen(
        _cmd(root, name, engine), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT
    )
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().strip()):  # the first step is logged
            assert proc.poll() is None, (root / f"{name}.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.1)
        proc.send_signal(signum)
        rc = proc.wait(timeout=120)
        text = (root / f"{name}.log").read_text()
        assert rc == 0, text[-4000:]
    finally:
        proc.kill()
        log.close()
    step = int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 1 <= step < STEPS, text[-3000:]
    assert not (out / "final_metrics.json").exists()
    sig = signal.Signals(signum).name
    assert f"{sig}: stopping after step {step} (preemption): saving a checkpoint" in text
    assert (
        f"launch: {sig}: the run saved {out / 'checkpoints' / f'step{step}'} after step {step} and stopped; "
        "to continue: python -m chatkit.launch config/tiny.yaml" in text
    ) and text.rstrip().endswith("resume=auto"), text[-2000:]

    r = subprocess.run(
        _cmd(root, name, engine, "resume=auto"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert f"at step {step}" in r.stdout + r.stderr
    assert ref.wait(timeout=300) == 0
    wa, wb = _weights(root / f"{engine}-ref"), _weights(out)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [m["step"] for m in rows if "loss" in m] == list(range(1, STEPS + 1))
