"""The launcher (chatkit.launch): what it refuses before anything starts, and that nothing it starts
outlives it.

- Pre-launch checks: a missing model folder, hostfile or resume checkpoint, data files, max_length over
  the base's context, pipeline stages that do not divide the ranks, fp16 on CPU ranks. Each is one
  `error:` line and exit status 2, with nothing started; --dry-run refuses the same problems of the
  launch as planned, and warns of the files this machine lacks (it plans without weights or data).
- Devices: CUDA_VISIBLE_DEVICES goes to DeepSpeed as --include (never with --num_gpus, which made it take
  GPUs 0..N-1); --include is passed through and checked as DeepSpeed's runner would; GPUs that torch
  cannot use (a fake `nvidia-smi` on PATH, or the driver's device node) are refused unless CPU ranks
  are asked for.
- Several nodes: --master-addr and --node-rank are required with --hostfile (a loopback address only
  when every host is this machine), and the ranks check that output_dir is one folder every node sees.
- Signals: SIGINT/SIGTERM/SIGHUP to the launcher's PID stop the DeepSpeed runner's whole process
  group (runner, launcher, ranks), SIGKILL after a grace period, and exit 128 + the signal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from chatkit import launch

REPO = Path(__file__).resolve().parents[1]


# --- pre-launch checks, in-process (nothing may start) ---------------------------------------------


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A base folder as far as the launcher reads one: its config.json (context of 128 tokens)."""
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "max_position_embeddings": 128}))
    return path


@pytest.fixture
def train(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    return path


class Started(list):
    """The commands the launcher would have started; `envs`, the environment of each; `tokenized`, the
    configs whose data it tokenized before starting them."""

    envs: list[dict[str, str]]
    tokenized: list


@pytest.fixture
def started(monkeypatch) -> Started:
    """The commands the launcher would have started (none is run, and no data is tokenized: the bases
    here are a config.json alone), with a clean environment."""
    calls = Started()
    calls.envs = []
    calls.tokenized = []
    monkeypatch.setattr(launch, "tokenize_data", calls.tokenized.append)

    def run_group(cmd, env, grace=None):
        calls.append(cmd)
        calls.envs.append(env)
        return 0

    monkeypatch.setattr(launch, "run_group", run_group)
    monkeypatch.setattr(launch, "prebuild_cpu_adam", lambda cfg, gpu: None)
    for var in ("CHATKIT_CPU_RANKS", "MASTER_PORT", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO)
    return calls


def _args(tmp_path: Path, base: Path, train: Path, *more: str) -> list[str]:
    return [
        "config/tiny.yaml", f"model={base}", f"train_files=[{train}]", f"output_dir={tmp_path / 'out'}",
        "max_length=64", "--num-gpus", "0", "--cpu-ranks", "2", "--master-port", "29633", *more,
    ]  # fmt: skip


NODE_0 = ("--node-rank", "0", "--master-addr", "10.0.0.1")
"""What each node's launch names with a hostfile: its place, and where node 0 listens."""


DEEPSPEED_MODE = "launch: mode deepspeed (no Slurm allocation, no PET_* variables)"
"""What a launch says first, where nothing asks for another launch mode (chatkit.launch_modes)."""


def _launch(capsys, argv: list[str]) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of chatkit.launch.main(argv)."""
    try:
        launch.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err.splitlines()


def _refused(capsys, started, argv: list[str]) -> list[str]:
    """The `error:` lines of a launch that must stop before starting anything (exit status 2)."""
    code, err = _launch(capsys, argv)
    assert code == 2, err
    assert started == []
    errors = [line for line in err if line.startswith("error: ")]
    assert errors, err
    return errors


def test_a_clean_launch_starts_the_runner(capsys, started, tmp_path, base, train):
    code, err = _launch(capsys, _args(tmp_path, base, train))
    assert code == 0 and not [line for line in err if line.startswith(("error", "warning"))], err
    assert len(started) == 1 and "deepspeed.launcher.runner" in started[0]


@pytest.mark.parametrize(
    "model", ["pretrained/NoSuchBase/model", "./nowhere", "outputs/no-run/hf", "{tmp}/gone"]
)
def test_a_missing_model_folder_is_refused(capsys, started, tmp_path, base, train, model):
    """Once reported by the ranks, after tokenizing, as a hub 'Repo id' error."""
    model = model.format(tmp=tmp_path)
    errors = _refused(capsys, started, _args(tmp_path, base, train, f"model={model}"))
    assert errors == [f"error: model: no such folder {model!r}"]


def test_a_missing_registry_base_names_its_prepare_script(capsys, started, tmp_path, base, train):
    errors = _refused(
        capsys, started, _args(tmp_path, base, train, "model=pretrained/Pythia-6.9B-deduped/model")
    )
    assert errors == [
        "error: model: no such folder 'pretrained/Pythia-6.9B-deduped/model' "
        "(pretrained/Pythia-6.9B-deduped/prepare.py prepares it)"
    ]


def test_a_folder_without_config_json_is_refused(capsys, started, tmp_path, base, train):
    (base / "config.json").unlink()
    errors = _refused(capsys, started, _args(tmp_path, base, train))
    assert errors == [f"error: model: {str(base)!r} has no config.json (not a Hugging Face model folder)"]


def test_hub_ids_and_local_paths_are_told_apart(monkeypatch):
    monkeypatch.chdir(REPO)
    for hub in ("EleutherAI/pythia-70m", "gpt2", "togethercomputer/LLaMA-2-7B-32K"):
        assert not launch.looks_like_a_path(hub), hub
    for path in ("pretrained/x/model", "./x", "../x", "/abs/x", "outputs/run/hf", "tests/no-such-folder"):
        assert launch.looks_like_a_path(path), path  # the last: its parent folder is here


def test_a_hub_id_is_left_to_the_ranks(capsys, started, tmp_path, base, train):
    code, err = _launch(capsys, _args(tmp_path, base, train, "model=EleutherAI/pythia-70m"))
    assert code == 0 and started, err


def test_a_missing_resume_checkpoint_is_refused(capsys, started, tmp_path, base, train):
    errors = _refused(capsys, started, _args(tmp_path, base, train, f"resume={tmp_path / 'ckpt'}"))
    assert errors == [
        f"error: resume: no checkpoint folder {str(tmp_path / 'ckpt')!r} (give one, or resume=auto)"
    ]
    (tmp_path / "ckpt").mkdir()  # a folder is the trainer's to judge; auto needs nothing
    for resume in (tmp_path / "ckpt", "auto"):
        started.clear()
        assert _launch(capsys, _args(tmp_path, base, train, f"resume={resume}"))[0] == 0 and started


def test_max_length_over_the_context_is_refused(capsys, started, tmp_path, base, train):
    """Once found by the ranks after tokenizing and loading the model."""
    errors = _refused(capsys, started, _args(tmp_path, base, train, "max_length=256"))
    assert errors == [
        "error: max_length: 256 exceeds the model's context of 128 tokens "
        f"(max_position_embeddings in {base / 'config.json'})"
    ]
    assert _launch(capsys, _args(tmp_path, base, train, "max_length=128"))[0] == 0


def test_max_length_over_a_registry_base_context_is_refused_without_its_weights(capsys, started):
    errors = _refused(
        capsys,
        started,
        ["config/Pythia-Chat-Base-7B.yaml", "max_length=4096", "--num-gpus", "8", "--dry-run"],
    )
    assert errors == [
        "error: max_length: 4096 exceeds the model's context of 2048 tokens "
        "(max_position_embeddings in the Pythia-6.9B-deduped entry of chatkit.models)"
    ]


def test_stages_that_do_not_divide_the_ranks_are_refused(capsys, started, tmp_path, base, train):
    pipe = ["deepspeed=pipeline", "pipeline_stages=2"]
    argv = _args(tmp_path, base, train, *pipe)
    errors = _refused(capsys, started, [*argv, "--cpu-ranks", "3"])
    assert errors == [
        "error: pipeline_stages: 2 stages need a multiple of 2 ranks and this launch starts 3 CPU rank(s); "
        "set pipeline_stages, or plan for other hardware with --num-gpus N"
    ]
    assert _launch(capsys, [*argv, "--cpu-ranks", "4"])[0] == 0 and started


def test_stages_are_counted_over_the_hostfile_nodes(capsys, started, tmp_path, base, train):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=3\nb slots=3\n")
    argv = _args(tmp_path, base, train, "deepspeed=pipeline", "pipeline_stages=4", "--hostfile", str(hosts))
    errors = _refused(capsys, started, [*argv, "--dry-run"])
    assert errors[0].startswith(
        "error: pipeline_stages: 4 stages need a multiple of 4 ranks and this launch starts 6"
    )


def test_fp16_on_cpu_ranks_is_refused(capsys, started, tmp_path, base, train):
    """DeepSpeed's CPU accelerator has no fp16: once an error in every rank after the launch."""
    errors = _refused(capsys, started, _args(tmp_path, base, train, "precision=fp16"))
    assert len(errors) == 1 and errors[0].startswith(
        "error: precision: fp16 needs GPUs and this launch starts 2 CPU rank(s)"
    )
    # Planned for GPUs, it is fine.
    assert (
        _launch(capsys, _args(tmp_path, base, train, "precision=fp16", "--num-gpus", "2", "--dry-run"))[0]
        == 0
    )


def test_missing_train_files_are_refused(capsys, started, tmp_path, base, train):
    gone = [tmp_path / f"gone{i}.jsonl" for i in range(5)]
    errors = _refused(capsys, started, _args(tmp_path, base, train, f"train_files=[{gone[0]}]"))
    assert errors == [f"error: train_files: no such file {str(gone[0])!r}"]
    listed = ",".join(map(str, [train, *gone]))
    errors = _refused(
        capsys, started, _args(tmp_path, base, train, f"train_files=[{listed}]", f"val_files=[{gone[0]}]")
    )
    assert errors == [
        f"error: train_files: no such file {', '.join(repr(str(p)) for p in gone[:3])} and 2 more",
        f"error: val_files: no such file {str(gone[0])!r}",
    ]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "error: --hostfile: no such file"),
        ("", "lists no host"),
        ("# only a comment\n", "lists no host"),
        ("node-a\n", "bad line 'node-a' (expected `host slots=N`)"),
        ("node-a slots=2\nnode-a slots=2\n", "node-a is listed twice"),
    ],
)
def test_a_hostfile_deepspeed_would_not_use_is_refused(
    capsys, started, tmp_path, base, train, content, needle
):
    """A mistyped --hostfile once turned a multi-node launch into a one-node run that exited 0."""
    hosts = tmp_path / "hosts"
    if content is not None:
        hosts.write_text(content)
    for dry in ([], ["--dry-run"]):
        argv = _args(tmp_path, base, train, "--hostfile", str(hosts), *NODE_0)
        errors = _refused(capsys, started, [*argv, *dry])
        assert len(errors) == 1 and needle in errors[0] and str(hosts) in errors[0]


def test_every_problem_is_reported_at_once(capsys, started, tmp_path, base, train):
    argv = _args(
        tmp_path, base, train, "precision=fp16", "max_length=512", f"resume={tmp_path / 'nope'}",
        f"model={tmp_path / 'missing'}", f"train_files=[{tmp_path / 'missing.jsonl'}]",
        "--hostfile", str(tmp_path / "hosts"),
    )  # fmt: skip
    settings = [line.split(":")[1].strip() for line in _refused(capsys, started, argv)]
    assert settings == [
        "--hostfile",
        "precision",
        "--master-addr",
        "--node-rank",
        "model",
        "train_files",
        "resume",
    ]


def test_config_errors_and_a_bad_hostfile_are_reported_together(capsys, started, tmp_path, base, train):
    argv = _args(tmp_path, base, train, "deepspeed=zero9", "--hostfile", str(tmp_path / "hosts"))
    code, err = _launch(capsys, argv)
    assert code == 2 and not started
    assert err[0].startswith("error: --hostfile: no such file")
    assert err[1].startswith("error: invalid training config") and "deepspeed: no preset 'zero9'" in err[2]


def test_settings_and_launch_problems_are_reported_together(capsys, started, tmp_path, base, train):
    """A bad setting once hid the launch's problems until it was fixed (the README: "all reported
    together, before anything starts")."""
    argv = _args(tmp_path, base, train, "deepspeed=zero9", "precision=fp16", "max_length=256")
    for dry in ([], ["--dry-run"]):
        code, err = _launch(capsys, [*argv, *dry])
        assert code == 2 and not started, err
        assert err[0] == "error: invalid training config in config/tiny.yaml:"
        assert err[1].startswith("  deepspeed: no preset 'zero9'")
        assert [line.split(":")[1] for line in err[2:]] == [" precision", " max_length"]
    # A value that could not be read leaves its default standing in: nothing is reported of that default.
    code, err = _launch(capsys, _args(tmp_path, base, train, "max_length=abc"))
    assert code == 2 and err == [
        "error: invalid training config in config/tiny.yaml:",
        "  max_length: expected int, got 'abc'",
    ]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["deepspeed=zero9"], "  deepspeed: no preset 'zero9'"),
        (
            ["pipeline_stages=2"],
            "  pipeline_stages: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only",
        ),
        (["precision=fp16"], "error: precision: fp16 needs GPUs and this launch starts 2 CPU rank(s)"),
    ],
)
def test_what_would_fail_in_the_ranks_is_refused_before_the_launch(
    capsys, started, tmp_path, base, train, overrides, needle
):
    """Each once passed the launcher and failed in every rank (zero9 even passed --dry-run)."""
    for dry in ([], ["--dry-run"]):
        code, err = _launch(capsys, [*_args(tmp_path, base, train, *overrides), *dry])
        assert code == 2 and not started, err
        assert [line for line in err if line.startswith(needle)], err
        assert "Traceback" not in "\n".join(err)


def _dry_run_port(capsys, argv: list[str]) -> int:
    """The --master_port of a dry run's command."""
    launch.main([*argv, "--dry-run"])
    return int(capsys.readouterr().out.split("--master_port ")[1].split()[0])


def test_a_single_node_launch_finds_a_free_port(capsys, started, monkeypatch, tmp_path, base, train):
    """Two runs on one machine once collided on 29500 (`make demo` failed while another run trained)."""
    argv = [a for a in _args(tmp_path, base, train) if a not in ("--master-port", "29633")]
    ports = {_dry_run_port(capsys, argv) for _ in range(3)}
    assert 29500 not in ports and all(p > 0 for p in ports)
    for port in ports:  # free when picked: this process can bind it
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert _dry_run_port(capsys, [*argv, "--master-port", "29611"]) == 29611  # an explicit port stands
    monkeypatch.setenv("MASTER_PORT", "29612")
    assert _dry_run_port(capsys, argv) == 29612
    monkeypatch.delenv("MASTER_PORT")
    # Several nodes must agree on the port: with a hostfile, the default stays DeepSpeed's 29500.
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\nb slots=2\n")
    assert _dry_run_port(capsys, [*argv, "--hostfile", str(hosts)]) == 29500
    with pytest.raises(SystemExit):
        launch.main(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "else on one node a free port" in usage and "every node must be given the same port" in usage


def test_deepspeeds_launcher_logs_only_what_is_critical(monkeypatch, tmp_path, base, train):
    """Its INFO and WARNING lines (hostfile fallback, world-info dicts, CUDA_VISIBLE_DEVICES on a CPU
    machine, every spawned command) once filled the screen; --verbose or CHATKIT_VERBOSE=1 shows them."""
    monkeypatch.delenv("CHATKIT_VERBOSE", raising=False)
    args = argparse.Namespace(
        num_gpus=0, cpu_ranks=2, hostfile=None, include=None, master_port=29633, recipe="config/tiny.yaml",
        overrides=[],
    )  # fmt: skip
    cmd, _ = launch.build_command(args)
    assert cmd[cmd.index("--log_level") + 1] == "critical"
    monkeypatch.setenv("CHATKIT_VERBOSE", "1")
    cmd, _ = launch.build_command(args)
    assert cmd[cmd.index("--log_level") + 1] == "info"


def test_a_rank_killed_by_a_signal_is_named():
    """DeepSpeed's own line about it is silenced with its log: the launcher says it instead."""
    assert launch.failure_line(256 - signal.SIGKILL).startswith(
        "error: a training rank was killed by SIGKILL (the system kills the largest process when memory"
    )
    assert "killed by SIGSEGV" in launch.failure_line(256 - signal.SIGSEGV)
    for reported in (0, 1, 2, 130, 143):  # the ranks', or the launcher's own (a forwarded signal)
        assert launch.failure_line(reported) is None


def test_dry_run_refuses_the_same_and_warns_of_missing_files(capsys, started, tmp_path, base, train):
    """A dry run plans without weights or data: what this machine lacks is a warning, and the plan
    prints; what no machine could run is refused as the launch would refuse it."""
    argv = _args(
        tmp_path, base, train, f"model={tmp_path / 'missing'}", f"train_files=[{tmp_path / 'x.jsonl'}]"
    )
    code, err = _launch(capsys, [*argv, "--dry-run"])
    assert code == 0 and not started
    assert err == [
        f"warning: model: no such folder {str(tmp_path / 'missing')!r}; a launch here would stop on it",
        f"warning: train_files: no such file {str(tmp_path / 'x.jsonl')!r}; a launch here would stop on it",
    ]
    assert _refused(capsys, started, argv) == [
        line.replace("warning", "error", 1).split(";")[0] for line in err
    ]
    for bad in ("precision=fp16", "max_length=4096", "pipeline_stages=3"):
        real = _refused(capsys, started, _args(tmp_path, base, train, bad, "deepspeed=pipeline"))
        assert (
            _refused(capsys, started, _args(tmp_path, base, train, bad, "deepspeed=pipeline", "--dry-run"))
            == real
        )


def test_tiny_inputs_are_built_when_missing_and_then_checked(capsys, started, monkeypatch, tmp_path):
    """config/tiny.yaml names the tiny base and the demo data, which a launch builds when they are
    missing: they are not reported missing (a dry run does not warn of them), a launch refused for
    another reason builds nothing, and what was built is checked before the runner starts."""
    monkeypatch.chdir(tmp_path)  # a checkout without them
    built = []

    def ensure(cfg, context=512):
        built.append(cfg.model)
        Path(launch.DEMO_TRAIN).parent.mkdir(parents=True, exist_ok=True)
        Path(launch.DEMO_TRAIN).write_text("{}\n")
        Path(cfg.model).mkdir(parents=True, exist_ok=True)
        Path(cfg.model, "config.json").write_text(json.dumps({"max_position_embeddings": context}))

    monkeypatch.setattr(launch, "ensure_tiny_inputs", ensure)
    argv = [str(REPO / "config/tiny.yaml"), "--num-gpus", "0", "--master-port", "29633"]
    code, err = _launch(capsys, [*argv, "--dry-run"])
    assert code == 0 and not [line for line in err if line.startswith(("error", "warning"))], err
    assert built == []
    assert _refused(capsys, started, [*argv, "precision=fp16"])[0].startswith("error: precision:")
    assert built == []
    code, err = _launch(capsys, argv)
    assert code == 0 and built == ["pretrained/tiny/model"] and len(started) == 1, err
    # What the build wrote is checked like any base: here, too short a context for max_length 256.
    monkeypatch.setattr(launch, "ensure_tiny_inputs", lambda cfg: ensure(cfg, context=128))
    (tmp_path / "pretrained/tiny/model/config.json").unlink()
    started.clear()
    assert _refused(capsys, started, argv) == [
        "error: max_length: 256 exceeds the model's context of 128 tokens "
        "(max_position_embeddings in pretrained/tiny/model/config.json)"
    ]


# --- which devices: CUDA_VISIBLE_DEVICES, --include, a torch that cannot use the GPUs ----------------


def _auto(tmp_path: Path, base: Path, train: Path, *more: str) -> list[str]:
    """A launch that picks its devices itself: no --num-gpus, no --cpu-ranks."""
    return [
        "config/tiny.yaml", f"model={base}", f"train_files=[{train}]", f"output_dir={tmp_path / 'out'}",
        "max_length=64", "--master-port", "29633", *more,
    ]  # fmt: skip


def _flag(cmd: list[str], name: str) -> str | None:
    """The value of flag `name` in `cmd`, None when it is not there."""
    return cmd[cmd.index(name) + 1] if name in cmd else None


def _dry_command(capsys, argv: list[str]) -> str:
    launch.main([*argv, "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    return lines[lines.index("# command") + 1]


def test_cuda_visible_devices_choose_the_gpus(capsys, started, monkeypatch, tmp_path, base, train):
    """With `--num_gpus 4`, DeepSpeed's runner dropped CUDA_VISIBLE_DEVICES=4,5,6,7 and trained on 0-3."""
    monkeypatch.setattr(launch, "count_gpus", lambda: 4)  # torch sees the 4 the variable shows
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert _launch(capsys, _auto(tmp_path, base, train))[0] == 0
    cmd, env = started[-1], started.envs[-1]
    assert _flag(cmd, "--include") == "localhost:4,5,6,7" and "--num_gpus" not in cmd
    assert "CUDA_VISIBLE_DEVICES" not in env and "DS_ACCELERATOR" not in env
    assert _launch(capsys, _auto(tmp_path, base, train, "--num-gpus", "2"))[0] == 0
    assert _flag(started[-1], "--include") == "localhost:4,5"  # the first two it shows
    line = _dry_command(capsys, _auto(tmp_path, base, train))
    assert line.startswith("env -u CUDA_VISIBLE_DEVICES ") and " --include localhost:4,5,6,7 " in line
    # Unset: DeepSpeed's --num_gpus, GPUs 0..N-1, as before.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _launch(capsys, _auto(tmp_path, base, train))[0] == 0
    assert _flag(started[-1], "--num_gpus") == "4" and "--include" not in started[-1]
    assert _dry_command(capsys, _auto(tmp_path, base, train)).startswith(f"{sys.executable} -m deepspeed")


@pytest.mark.parametrize(
    ("visible", "more", "message"),
    [
        (
            "GPU-8f6b2a1c,GPU-77d1e0aa",
            [],
            "error: CUDA_VISIBLE_DEVICES=GPU-8f6b2a1c,GPU-77d1e0aa: DeepSpeed's --include takes GPU indices",
        ),
        (
            "4,5",
            ["--num-gpus", "4"],
            "error: --num-gpus: 4 GPU(s) asked for and CUDA_VISIBLE_DEVICES=4,5 shows 2",
        ),
    ],
)
def test_cuda_visible_devices_that_cannot_be_honoured_are_refused(
    capsys, started, monkeypatch, tmp_path, base, train, visible, more, message
):
    monkeypatch.setattr(launch, "count_gpus", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    for dry in ([], ["--dry-run"]):
        errors = _refused(capsys, started, [*_auto(tmp_path, base, train, *more), *dry])
        assert len(errors) == 1 and errors[0].startswith(message), errors


def test_include_is_passed_to_deepspeed(capsys, started, monkeypatch, tmp_path, base, train):
    monkeypatch.setattr(launch, "count_gpus", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # --include names physical GPUs and wins
    assert _launch(capsys, _auto(tmp_path, base, train, "--include", "localhost:4,5"))[0] == 0
    assert _flag(started[-1], "--include") == "localhost:4,5" and "--num_gpus" not in started[-1]
    assert "CUDA_VISIBLE_DEVICES" not in started.envs[-1]
    hosts = tmp_path / "hosts"
    hosts.write_text("host1 slots=8\nhost2 slots=8\n")
    argv = _auto(tmp_path, base, train, "--hostfile", str(hosts), "--include", "host1:0,1@host2:0", *NODE_0)
    launch.main([*argv, "--dry-run"])
    out = capsys.readouterr().out
    assert "world: 3 rank(s)" in out and " --include host1:0,1@host2:0 " in out and "--num_gpus" not in out


@pytest.mark.parametrize(
    ("include", "hostfile", "message"),
    [
        ("localhost", None, "--include: name localhost's GPUs, e.g. localhost:0,1"),
        ("node-x:0", None, "--include: node-x is not a host of this machine (no --hostfile: only localhost)"),
        ("localhost:a", None, "--include: bad node 'localhost:a' in 'localhost:a'"),
        ("host1:0@", "host1 slots=2\n", "--include: bad node '' in 'host1:0@'"),
        ("host1:2", "host1 slots=2\n", "--include: host1 has 2 slot(s) in {hosts}, numbered from 0: no 2"),
        ("host3", "host1 slots=2\nhost2 slots=2\n", "--include: host3 is not a host of {hosts}"),
    ],
)
def test_an_include_deepspeed_would_refuse_is_refused(
    capsys, started, monkeypatch, tmp_path, base, train, include, hostfile, message
):
    """DeepSpeed's runner raises on these after the launch, with a traceback."""
    monkeypatch.setattr(launch, "count_gpus", lambda: 2)
    more = ["--include", include]
    if hostfile:
        (tmp_path / "hosts").write_text(hostfile)
        more += ["--hostfile", str(tmp_path / "hosts"), *NODE_0]
    errors = _refused(capsys, started, _auto(tmp_path, base, train, *more))
    assert len(errors) == 1 and errors[0].startswith(f"error: {message.format(hosts=tmp_path / 'hosts')}")


def test_include_and_num_gpus_together_are_refused(capsys, started, monkeypatch, tmp_path, base, train):
    monkeypatch.setattr(launch, "count_gpus", lambda: 2)
    errors = _refused(
        capsys, started, _auto(tmp_path, base, train, "--include", "localhost:0", "--num-gpus", "1")
    )
    assert errors == [
        "error: --include and --num-gpus: give one "
        "(DeepSpeed's runner refuses both; --include names the GPUs)"
    ]


def test_visible_devices_other_than_the_hostfile_slots_are_refused(
    capsys, started, monkeypatch, tmp_path, base, train
):
    """With a hostfile, DeepSpeed's per-node launcher sets CUDA_VISIBLE_DEVICES to 0..slots-1 itself."""
    monkeypatch.setattr(launch, "count_gpus", lambda: 2)
    hosts = tmp_path / "hosts"
    hosts.write_text("host1 slots=2\nhost2 slots=2\n")
    argv = _auto(tmp_path, base, train, "--hostfile", str(hosts), *NODE_0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    errors = _refused(capsys, started, argv)
    assert len(errors) == 1 and errors[0].startswith(
        "error: CUDA_VISIBLE_DEVICES=2,3: with --hostfile DeepSpeed gives each node its GPUs 0-1 whatever"
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what DeepSpeed will use anyway: fine
    assert _launch(capsys, argv)[0] == 0 and started


class Machine:
    """This machine as the launcher's GPU checks see it: what torch sees and is built for, an
    `nvidia-smi` on PATH (a script in tmp_path), the driver's device node."""

    def __init__(self, monkeypatch, tmp_path: Path):
        self.bin, self.device = tmp_path / "bin", tmp_path / "nvidia0"
        self.bin.mkdir()
        self.monkeypatch = monkeypatch
        monkeypatch.setenv("PATH", str(self.bin))  # no real nvidia-smi
        monkeypatch.setattr(launch, "NVIDIA_DEVICE", self.device)
        self.torch(0, None)

    def torch(self, gpus: int, cuda: str | None) -> None:
        self.monkeypatch.setattr(launch, "count_gpus", lambda: gpus)
        self.monkeypatch.setattr(
            launch, "torch_build", lambda: (f"2.13.0+{'cu128' if cuda else 'cpu'}", cuda)
        )

    def nvidia_smi(self, listing: list[str], status: int = 0) -> None:
        script = self.bin / "nvidia-smi"
        lines = "".join(f"echo '{line}'\n" for line in listing)
        script.write_text(f"#!/bin/sh\n{lines}exit {status}\n")
        script.chmod(0o755)


@pytest.fixture
def machine(monkeypatch, tmp_path) -> Machine:
    return Machine(monkeypatch, tmp_path)


H100S = ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1a)", "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2b)"]


def test_gpus_a_cpu_torch_cannot_use_are_refused(
    capsys, started, monkeypatch, machine, tmp_path, base, train
):
    """A CPU-only torch on a GPU machine once trained on CPU ranks without a word."""
    machine.nvidia_smi(H100S)
    argv = _auto(tmp_path, base, train)
    errors = _refused(capsys, started, argv)
    assert errors == [
        "error: torch 2.13.0+cpu is a CPU-only build and this machine has GPUs (nvidia-smi lists 2 GPU(s)): "
        "this launch would train on CPU ranks; install a CUDA build of torch (README, section GPUs: "
        "make install TORCH_INDEX=https://download.pytorch.org/whl/cu128), or ask for CPU ranks with "
        "--num-gpus 0 or --cpu-ranks N"
    ]
    monkeypatch.setenv("CHATKIT_CPU_RANKS", "2")  # a standing default, not this launch asking for CPU
    assert _refused(capsys, started, argv) == errors
    code, err = _launch(capsys, [*argv, "--dry-run"])  # a dry run: a warning
    assert code == 0 and err == [f"warning: {errors[0][len('error: ') :]}; a launch here would stop on it"]
    for cpu in (["--cpu-ranks", "2"], ["--num-gpus", "0"]):  # CPU ranks, asked for
        code, err = _launch(capsys, [*argv, *cpu])
        assert code == 0 and err == [DEEPSPEED_MODE] and started.envs[-1]["DS_ACCELERATOR"] == "cpu", err


def test_the_driver_device_node_is_evidence_too(capsys, started, machine, tmp_path, base, train):
    machine.device.touch()
    errors = _refused(capsys, started, _auto(tmp_path, base, train))
    assert len(errors) == 1 and f"this machine has GPUs ({machine.device} exists)" in errors[0]


def test_a_machine_without_gpus_trains_on_cpu_ranks(capsys, started, machine, tmp_path, base, train):
    for smi in ([], ["No devices were found"]):  # nvidia-smi lists none, or fails (exit 6 or 9)
        machine.nvidia_smi(smi, status=6 if smi else 9)
        code, err = _launch(capsys, _auto(tmp_path, base, train))
        assert code == 0 and err == [DEEPSPEED_MODE], err
        assert started.envs[-1]["DS_ACCELERATOR"] == "cpu" and _flag(started[-1], "--num_gpus") == "2"


def test_a_cuda_torch_that_sees_no_gpu_is_refused(
    capsys, started, monkeypatch, machine, tmp_path, base, train
):
    machine.nvidia_smi(H100S)
    machine.torch(0, "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    errors = _refused(capsys, started, _auto(tmp_path, base, train))
    assert errors == [
        "error: torch 2.13.0+cu128 sees no GPU (torch.cuda.is_available() is False) and this machine has "
        "GPUs (nvidia-smi lists 2 GPU(s)): this launch would train on CPU ranks; check CUDA_VISIBLE_DEVICES "
        "() and that the driver supports CUDA 12.8, or ask for CPU ranks with --num-gpus 0 or --cpu-ranks N"
    ]


def test_gpus_asked_for_need_a_torch_that_sees_them(capsys, started, machine, tmp_path, base, train):
    argv = _auto(tmp_path, base, train, "--num-gpus", "2")
    assert _refused(capsys, started, argv) == ["error: --num-gpus 2: torch sees no GPU on this machine"]
    assert _launch(capsys, [*argv, "--dry-run"]) == (0, [])  # planning for GPUs elsewhere: fine
    machine.nvidia_smi(H100S)
    errors = _refused(capsys, started, argv)
    assert (
        len(errors) == 1
        and "(nvidia-smi lists 2 GPU(s)): --num-gpus 2 needs GPUs that torch can use;" in errors[0]
    )
    machine.torch(1, "12.8")
    assert _refused(capsys, started, argv) == ["error: --num-gpus 2: torch sees 1 GPU(s) on this machine"]
    machine.torch(2, "12.8")
    assert _launch(capsys, argv)[0] == 0 and _flag(started[-1], "--num_gpus") == "2"


# --- several nodes: each launch names its node and node 0's address ---------------------------------


def _two_hosts(tmp_path: Path, names: str = "node-a node-b") -> Path:
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{name} slots=2\n" for name in names.split()))
    return hosts


def test_several_nodes_need_a_node_rank_and_node_0s_address(capsys, started, tmp_path, base, train):
    """127.0.0.1 was the default: node 0 waited alone, every other node for a node 0 on itself."""
    argv = _args(tmp_path, base, train, "--hostfile", str(_two_hosts(tmp_path)))
    errors = _refused(capsys, started, argv)
    assert [e.split(":")[1] for e in errors] == [" --master-addr", " --node-rank"]
    assert errors[0].startswith("error: --master-addr: required with --hostfile")
    code, err = _launch(capsys, [*argv, "--dry-run"])  # the plan of the whole launch: warnings
    assert code == 0 and [e.split(";")[0] for e in err] == [e.replace("error", "warning", 1) for e in errors]
    assert _launch(capsys, [*argv, "--node-rank", "1", "--master-addr", "10.0.0.1"])[0] == 0
    cmd = started[-1]
    assert (
        _flag(cmd, "--node_rank") == "1" and _flag(cmd, "--master_addr") == "10.0.0.1" and "--no_ssh" in cmd
    )
    # The ranks check that output_dir is one folder every node sees (chatkit.train.distributed).
    assert started.envs[-1]["CHATKIT_SHARED_OUTPUT_DIR"] == str((tmp_path / "out").resolve())
    assert "CHATKIT_SHARED_OUTPUT_DIR=" in _dry_command(capsys, [*argv, *NODE_0])


def test_a_loopback_master_addr_is_refused_when_other_machines_take_part(
    capsys, started, tmp_path, base, train
):
    argv = _args(tmp_path, base, train, "--hostfile", str(_two_hosts(tmp_path)), "--node-rank", "0")
    for loopback in ("127.0.0.1", "localhost", "::1"):
        errors = _refused(capsys, started, [*argv, "--master-addr", loopback])
        assert errors == [
            f"error: --master-addr: {loopback} is each machine's own loopback and {tmp_path / 'hosts'} lists "
            "other machines (node-a, node-b): they would wait for node 0 on themselves; give node 0's address"
        ]
    # Every "node" on this machine (tests/test_training_runs.py's two nodes on loopback): fine.
    argv = _args(tmp_path, base, train, "--hostfile", str(_two_hosts(tmp_path, "localhost 127.0.0.1")))
    assert _launch(capsys, [*argv, "--node-rank", "1", "--master-addr", "127.0.0.1"])[0] == 0 and started


def test_a_node_rank_outside_the_hostfile_is_refused(capsys, started, tmp_path, base, train):
    """DeepSpeed's runner asserts it after the launch: "--node_rank is not set correctly"."""
    argv = _args(tmp_path, base, train, "--hostfile", str(_two_hosts(tmp_path)), "--master-addr", "10.0.0.1")
    for rank in ("2", "-1"):
        errors = _refused(capsys, started, [*argv, "--node-rank", rank])
        assert errors == [f"error: --node-rank: {rank} is not one of the 2 node(s) 0-1"]


def test_node_settings_without_a_hostfile_are_refused(capsys, started, tmp_path, base, train):
    """They once were ignored in silence: a one-node run where several nodes were meant."""
    errors = _refused(capsys, started, _args(tmp_path, base, train, *NODE_0))
    assert errors == [
        "error: --node-rank and --master-addr: for several nodes, with --hostfile (one node needs neither)"
    ]
    assert _launch(capsys, _args(tmp_path, base, train))[0] == 0
    assert "CHATKIT_SHARED_OUTPUT_DIR" not in started.envs[-1]  # one node: nothing to check


def test_help_lists_the_nccl_settings(capsys):
    with pytest.raises(SystemExit):
        launch.main(["--help"])
    usage = capsys.readouterr().out
    for name in (
        "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG=INFO", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_ASYNC_ERROR_HANDLING", "DEEPSPEED_TIMEOUT", "--include",
    ):  # fmt: skip
        assert name in usage, name


# Two ranks on gloo as two nodes (LOCAL_RANK 0 both), each given its own path to the output folder.
SHARED_CHECK = textwrap.dedent(
    """
    import os, sys
    import torch.distributed as dist
    from chatkit.train.context import RunError
    from chatkit.train.distributed import check_shared_output_dir

    rank, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        check_shared_output_dir(folder, rank, wait_s=1)
        print("ok")
    except RunError as e:
        print(f"error: {e}")
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_the_ranks_check_that_every_node_sees_the_output_folder(tmp_path):
    def run(folders: list[Path]) -> list[str]:
        port = str(launch.free_port())
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", SHARED_CHECK, str(rank), port, str(folder)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "LOCAL_RANK": "0", "CROSS_RANK": str(rank)},
            )  # fmt: skip
            for rank, folder in enumerate(folders)
        ]
        return [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]

    shared = tmp_path / "shared" / "out"
    assert run([shared, shared]) == ["ok", "ok"]
    assert list(shared.iterdir()) == []  # its files are gone
    apart = run([tmp_path / "node0" / "out", tmp_path / "node1" / "out"])
    assert apart[0] == apart[1] and apart[0].startswith(
        f"error: output_dir {tmp_path / 'node0' / 'out'} is not one folder shared by every node: node 1 ("
    )
    assert (
        f"{tmp_path / 'node1' / 'out'}) does not see the file node 0 wrote there (.chatkit-shared-"
        in apart[0]
    )
    assert apart[0].endswith("after 1 s; put output_dir on storage that every node mounts")


# --- the process group: nothing outlives the launcher (subprocesses) --------------------------------


def _alive(pid: int) -> bool:
    """A live process (not a zombie) with this pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _processes_with(marker: str) -> list[int]:
    """Live processes (other than this one) whose command line contains `marker`."""
    me = os.getpid()
    try:
        import psutil
    except ImportError:
        psutil = None
    found = []
    if psutil is not None:
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] != me and p.info["status"] != psutil.STATUS_ZOMBIE and marker in cmdline:
                found.append(p.info["pid"])
        return found
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me and _alive(int(entry.name)):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry.name))
    return found


def _kill_all(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# A stand-in for DeepSpeed's runner: a child in the same group (as DeepSpeed's launcher and ranks are)
# that ignores SIGTERM and SIGINT, and writes both pids once it does. The runner waits ("wait"), also
# ignores the signals ("stubborn"), or exits 3 and leaves the child behind ("exit").
TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    pids, marker, mode = sys.argv[1:4]
    if mode == "stubborn":
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
    child = (
        "import os, signal, sys, time\\n"
        "for s in (signal.SIGINT, signal.SIGTERM):\\n    signal.signal(s, signal.SIG_IGN)\\n"
        "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getppid()} {os.getpid()}')\\n"
        "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\\n"
        "time.sleep(600)"
    )
    subprocess.Popen([sys.executable, "-c", child, pids, marker])
    while not os.path.exists(pids):
        time.sleep(0.05)
    if mode == "exit":
        sys.exit(3)
    time.sleep(600)
    """
)
RUN_GROUP = (
    "import sys; from chatkit.launch import run_group; sys.exit(run_group(sys.argv[1:], None, grace=2))"
)


def _start_tree(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, list[int], str]:
    marker = f"tree-marker-{tmp_path.name}"
    (tmp_path / "tree.py").write_text(TREE)
    pids = tmp_path / "pids"
    cmd = [
        sys.executable,
        "-c",
        RUN_GROUP,
        sys.executable,
        str(tmp_path / "tree.py"),
        str(pids),
        marker,
        mode,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pids.is_file():
        assert proc.poll() is None or mode == "exit", proc.stderr.read()
        assert time.monotonic() < deadline, "the stand-in runner never started"
        time.sleep(0.1)
    return proc, [int(p) for p in pids.read_text().split()], marker


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_the_whole_group(tmp_path, signum):
    proc, pids, marker = _start_tree(tmp_path, "wait")
    try:
        start = time.monotonic()
        os.kill(proc.pid, signum)  # the launcher alone, not its group
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signum, err
        assert time.monotonic() - start < 2 + 8  # the grace period, then SIGKILL for the one ignoring SIGTERM
        assert f"launch: {signal.Signals(signum).name}: stopping the run" in err
        assert [pid for pid in pids if _alive(pid)] == [] and _processes_with(marker) == []
    finally:
        proc.kill()
        _kill_all([*pids, *_processes_with(marker)])


@pytest.mark.slow
def test_a_second_signal_kills_at_once(tmp_path):
    proc, pids, marker = _start_tree(tmp_path, "stubborn")
    try:
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # a second Ctrl-C
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGINT and time.monotonic() - start < 1.5, err
        assert "killing the run" in err and [pid for pid in pids if _alive(pid)] == []
    finally:
        proc.kill()
        _kill_all([*pids, *_processes_with(marker)])


@pytest.mark.slow
def test_what_the_runner_leaves_behind_is_stopped(tmp_path):
    """A runner that exits (or dies) before its ranks: they are not left running."""
    proc, pids, marker = _start_tree(tmp_path, "exit")
    try:
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 3, err  # the runner's own status
        assert [pid for pid in pids if _alive(pid)] == [] and _processes_with(marker) == []
    finally:
        proc.kill()
        _kill_all([*pids, *_processes_with(marker)])


@pytest.mark.slow
def test_a_missing_hostfile_through_the_real_launcher(tmp_path, base, train):
    """DeepSpeed alone warns 'Unable to find hostfile', runs on this machine only, and exits 0."""
    cmd = [
        sys.executable,
        "-m",
        "chatkit.launch",
        *_args(tmp_path, base, train, "--hostfile", str(tmp_path / "hosts"), *NODE_0),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("CHATKIT_CPU_RANKS", "MASTER_PORT")}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: --hostfile: no such file {str(tmp_path / 'hosts')!r}"]
    assert "Unable to find hostfile" not in r.stdout + r.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_the_launcher_stops_the_training_run(tmp_path):
    """SIGTERM to the launcher's PID alone (not its group): the runner and both ranks stop with it, and
    no checkpoint is written afterwards. (Once, they trained to the end after the launcher had gone.)
    SIGTERM is a preemption: the ranks save the step they are in and the launch exits 0
    (tests/test_preemption.py); SIGINT keeps exit status 130 (test_a_signal_stops_the_whole_group)."""
    from chatkit.conversation import write_conversations
    from chatkit.datasets.synthetic import make_splits
    from chatkit.pretrained import prepare_tiny

    data, _ = make_splits(64, 4, seed=5)
    write_conversations(tmp_path / "train.jsonl", data)
    prepare_tiny(
        [str(tmp_path / "train.jsonl")], str(tmp_path / "base"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    out = tmp_path / "run-sigterm"  # unique: every process of the run has it on its command line
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={tmp_path / 'base'}",
        f"train_files=[{tmp_path / 'train.jsonl'}]", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}",
        "max_steps=1000", "log_every=1", "save_every=5", "keep_checkpoints=2", "warmup_steps=0",
        "max_length=128", "micro_batch_size=2", "--cpu-ranks", "2", "--master-port", "0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("CHATKIT_CPU_RANKS", "MASTER_PORT")}
    log = (tmp_path / "launch.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().strip()):  # training has started
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.5)
        assert len(_processes_with(str(out))) >= 3  # the launcher, DeepSpeed's runner and launcher, 2 ranks

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert time.monotonic() - start < 10 + 20  # the launcher's grace period, and some
        assert _processes_with(str(out)) == [], "the run outlived its launcher"
        assert rc == 0, (tmp_path / "launch.log").read_text()[-4000:]
        assert "launch: SIGTERM: the run saved" in (tmp_path / "launch.log").read_text()

        def state():
            ckpts = out / "checkpoints"
            names = sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []
            return names, len(metrics.read_text().splitlines())

        before = state()
        time.sleep(8)  # a live rank would have logged steps and saved step N+5 by now
        assert state() == before
        assert _processes_with(str(out)) == []
    finally:
        proc.kill()
        proc.wait()
        _kill_all(_processes_with(str(out)))
        log.close()


# --- what a user sees of a real launch (DeepSpeed on CPU ranks) -------------------------------------

CHATTER = (
    "Unable to find hostfile",  # DeepSpeed's runner
    "WORLD INFO DICT",  # its per-node launcher, with the rank mapping, the world size, ...
    "CUDA_VISIBLE_DEVICES",  # ... set on a machine without CUDA
    "spawned with command",
    "Setting accelerator to CPU",  # DeepSpeed's accelerator probe, on import
    "FutureWarning",  # transformers' gradient_checkpointing_enable, PEFT's is_gradient_checkpointing
    "[INFO]",
    "[WARNING]",
    "[ERROR]",  # DeepSpeed's launcher repeating a failed rank's command
)


def _visible(output: str) -> list[str]:
    """The lines a terminal would show: what follows each line's last carriage return (progress bars
    redraw themselves with those), blank ones left out."""
    return [
        line.rsplit("\r", 1)[-1].rstrip() for line in output.split("\n") if line.rsplit("\r", 1)[-1].strip()
    ]


def _tiny_base_and_data(tmp_path: Path) -> tuple[Path, Path]:
    from chatkit.conversation import write_conversations
    from chatkit.datasets.synthetic import make_splits
    from chatkit.pretrained import prepare_tiny

    data, _ = make_splits(64, 4, seed=5)
    write_conversations(tmp_path / "train.jsonl", data)
    prepare_tiny(
        [str(tmp_path / "train.jsonl")], str(tmp_path / "base"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    return tmp_path / "base", tmp_path / "train.jsonl"


def _run(cmd: list[str], *unset: str) -> tuple[int, str]:
    """(exit status, stdout + stderr) of `cmd`, carriage returns kept (text mode would make them newlines)."""
    drop = {"CHATKIT_CPU_RANKS", "MASTER_PORT", "CHATKIT_VERBOSE", *unset}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300, env=env)
    return r.returncode, (r.stdout + r.stderr).decode("utf-8", errors="replace")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_bad_training_line_reaches_the_user_as_one_line(tmp_path):
    """Once the `file:line: field` message was buried in a 71-line multiprocessing traceback from rank 0,
    rank 1's gloo error and DeepSpeed's launcher log. The launcher tokenizes before the ranks start, so
    it is now refused there (exit status 2); tests/test_token_store.py tests the ranks' own path."""
    base, train = _tiny_base_and_data(tmp_path)
    lines = train.read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    robot = '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n'
    bad.write_text("".join([*lines[:2], robot, *lines[2:6]]))
    cmd = [  # no --master-port: a free one is found
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={base}", f"train_files=[{bad}]",
        f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "max_length=128", "--cpu-ranks", "2",
    ]  # fmt: skip
    code, output = _run(cmd)
    assert code == 2, output
    assert _visible(output) == [
        f"error: {bad}:3: messages[1].role: must be one of system, user, assistant, tool, got 'robot'"
    ], output


@pytest.mark.slow
@pytest.mark.distributed
def test_a_run_and_its_export_show_no_dependency_chatter(tmp_path):
    """A LoRA run with gradient checkpointing (each of those warned), then tools/convert_to_hf.py, which
    imports DeepSpeed and so probed for an accelerator (DS_ACCELERATOR unset, as a user has it)."""
    base, train = _tiny_base_and_data(tmp_path)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={base}", f"train_files=[{train}]",
        f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "max_length=128", "max_steps=2",
        "micro_batch_size=2", "warmup_steps=0", "save_every=0", "log_every=1", "gradient_checkpointing=true",
        "lora_r=4", "--cpu-ranks", "1",
    ]  # fmt: skip
    code, output = _run(cmd, "DS_ACCELERATOR")
    assert code == 0, output[-4000:]
    shown = "\n".join(_visible(output))
    assert "step 2/2" in shown and [c for c in CHATTER if c in shown] == [], shown
    convert = [
        sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "hf"),
    ]  # fmt: skip
    code, output = _run(convert, "DS_ACCELERATOR")
    assert code == 0, output[-4000:]
    shown = "\n".join(_visible(output))
    assert "exported" in shown and [c for c in CHATTER if c in shown] == [], shown
    # Asked for, DeepSpeed's launcher log is there.
    code, output = _run(
        [*cmd, "max_steps=1", f"output_dir={tmp_path / 'verbose'}", "--verbose"], "DS_ACCELERATOR"
    )
    assert code == 0 and "WORLD INFO DICT" in output, output[-4000:]
