"""The entry scripts: --help everywhere, the launcher's --dry-run, early config errors, data preparation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatkit import launch
from chatkit.config import load_config
from chatkit.conversation import read_jsonl

REPO = Path(__file__).resolve().parents[1]
PY_SCRIPTS = [
    "training/train.py",
    "inference/bot.py",
    "tools/convert_to_hf.py",
    "tools/convert_to_hf_gptneox.py",
    "tools/convert_to_hf_llama.py",
    "tools/convert_llama_weights_to_hf.py",
    "tools/diff_checkpoint.py",
    "tools/merge_lora.py",
    "tools/make_shards.py",
    "tools/evaluate.py",
    "tools/tokenize_data.py",
    "data/demo/prepare.py",
    "pretrained/tiny/prepare.py",
]
SH_SCRIPTS = ["training/finetune_demo.sh", "training/finetune_tiny.sh"]
NO_GPU = torch.cuda.device_count() == 0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CHATKIT_CPU_RANKS", "MASTER_PORT")}
    env["PYTHON"] = sys.executable  # the shell scripts run the interpreter the tests run under
    return env


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env())


def sh(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run("bash", script, *args)


# --- --help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", PY_SCRIPTS)
def test_python_script_help(script: str):
    proc = run(sys.executable, script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ")
    assert "--help" in proc.stdout


@pytest.mark.parametrize("script", SH_SCRIPTS)
def test_shell_script_help(script: str):
    proc = sh(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ")
    assert "--dry-run" in proc.stdout and "--cpu-ranks" in proc.stdout


# --- the launcher's --dry-run ---------------------------------------------------------------------


def _command_line(stdout: str) -> str:
    lines = stdout.splitlines()
    return lines[lines.index("# command") + 1]


@pytest.mark.slow
def test_finetune_tiny_dry_run():
    proc = sh("training/finetune_tiny.sh", "max_steps=7", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("# resolved config\n")
    assert "\nmax_steps: 7\n" in out
    assert "\nmax_length: 256\n" in out  # from config/tiny.yaml
    cmd = _command_line(out)
    assert "-m deepspeed.launcher.runner" in cmd
    assert cmd.endswith("training/train.py --config config/tiny.yaml max_steps=7")
    if NO_GPU:
        assert cmd.startswith("DS_ACCELERATOR=cpu ")
        assert "--num_gpus 2 " in cmd
    else:
        assert "DS_ACCELERATOR" not in cmd
        assert f"--num_gpus {torch.cuda.device_count()} " in cmd


@pytest.mark.parametrize(
    "args", [["--dry-run", "max_steps=7"], ["--cpu-ranks", "1", "max_steps=7", "--dry-run"]]
)
@pytest.mark.slow
def test_finetune_tiny_dry_run_flags_before_overrides(args: list[str]):
    proc = sh("training/finetune_tiny.sh", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\nmax_steps: 7\n" in proc.stdout


@pytest.mark.slow
def test_finetune_demo_dry_run_uses_demo_recipe():
    proc = sh("training/finetune_demo.sh", "--dry-run", "--num-gpus", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\nmax_length: 128\n" in proc.stdout  # config/demo.yaml
    cmd = _command_line(proc.stdout)
    assert cmd.endswith("training/train.py --config config/demo.yaml")
    assert cmd.startswith("DS_ACCELERATOR=cpu ") and "--num_gpus 2 " in cmd


@pytest.mark.slow
def test_dry_run_bad_override_fails_naming_the_setting():
    proc = sh("training/finetune_tiny.sh", "precision=fp8", "--dry-run")
    assert proc.returncode != 0
    assert "precision: must be fp32, bf16 or fp16" in proc.stderr
    assert "# command" not in proc.stdout


def _dry_run(capsys, monkeypatch, *argv: str) -> str:
    """chatkit.launch in-process (what the shell scripts exec), with a clean environment."""
    monkeypatch.delenv("CHATKIT_CPU_RANKS", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.chdir(REPO)
    launch.main(["config/tiny.yaml", *argv, "--dry-run"])
    return _command_line(capsys.readouterr().out)


def test_dry_run_forced_cpu(capsys, monkeypatch):
    cmd = _dry_run(capsys, monkeypatch, "--num-gpus", "0")
    assert cmd.startswith("DS_ACCELERATOR=cpu ")
    assert "--num_gpus 2 " in cmd and "--master_port " in cmd  # a free one: tests/test_launch.py
    # One thread per rank's share of the cores.
    assert f"OMP_NUM_THREADS={max(1, (os.cpu_count() or 1) // 2)} " in cmd


def test_dry_run_cpu_ranks(capsys, monkeypatch):
    cmd = _dry_run(capsys, monkeypatch, "--num-gpus", "0", "--cpu-ranks", "1")
    assert "--num_gpus 1 " in cmd
    assert f"OMP_NUM_THREADS={os.cpu_count() or 1} " in cmd


def test_dry_run_cpu_ranks_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("CHATKIT_CPU_RANKS", "3")
    monkeypatch.chdir(REPO)
    launch.main(["config/tiny.yaml", "--num-gpus", "0", "--dry-run"])
    assert "--num_gpus 3 " in _command_line(capsys.readouterr().out)


def test_dry_run_default_counts_the_gpus(capsys, monkeypatch):
    cmd = _dry_run(capsys, monkeypatch)
    if NO_GPU:
        assert cmd.startswith("DS_ACCELERATOR=cpu ") and "--num_gpus 2 " in cmd
    else:
        assert f"--num_gpus {torch.cuda.device_count()} " in cmd


def test_dry_run_hostfile(capsys, monkeypatch, tmp_path):
    hosts = tmp_path / "h"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    cmd = _dry_run(
        capsys, monkeypatch, "--hostfile", str(hosts), "--node-rank", "1", "--master-addr", "10.0.0.1"
    )
    assert f"--hostfile {hosts} " in cmd
    assert "--node_rank 1 " in cmd
    assert "--no_ssh " in cmd
    assert "--master_addr 10.0.0.1 " in cmd
    assert "--num_gpus" not in cmd


def test_dry_run_master_port(capsys, monkeypatch):
    cmd = _dry_run(capsys, monkeypatch, "--master-port", "29611")
    assert "--master_port 29611 " in cmd


def test_master_port_zero_picks_a_free_port(capsys, monkeypatch):
    cmd = _dry_run(capsys, monkeypatch, "--master-port", "0")
    port = int(cmd.split("--master_port ")[1].split()[0])
    assert port > 0
    with socket.socket() as s:  # free when picked: this process can bind it
        s.bind(("127.0.0.1", port))


def test_master_port_zero_refused_with_a_hostfile(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        launch.main(["config/tiny.yaml", "--hostfile", "h", "--master-port", "0", "--dry-run"])
    assert e.value.code == 2


def test_offload_launch_reports_a_stale_build_lock(tmp_path, monkeypatch):
    """A lock left by a killed build would make every rank wait forever: the launcher stops instead."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "lock").touch()
    cfg = load_config(f"{REPO}/config/tiny.yaml", ["deepspeed=zero2_offload"], check_files=False)
    with pytest.raises(SystemExit) as e:
        launch.prebuild_cpu_adam(cfg, gpu=False)
    assert str(tmp_path / "cpu_adam" / "lock") in str(e.value.code)
    launch.prebuild_cpu_adam(load_config(f"{REPO}/config/tiny.yaml", [], check_files=False), gpu=False)


# --- training/train.py fails early on a bad config ------------------------------------------------


def test_train_rejects_unknown_setting_before_starting():
    proc = run(sys.executable, "training/train.py", "--config", "config/demo.yaml", "bogus=1")
    assert proc.returncode != 0
    assert "bogus: unknown setting" in proc.stderr
    assert "Traceback" not in proc.stderr  # a clean message, not a crash
    assert "init_distributed" not in proc.stderr and "Initializing TorchBackend" not in proc.stderr


# --- data/demo/prepare.py -------------------------------------------------------------------------


def _user_key(conv) -> tuple[str, ...]:
    return tuple(m.content for m in conv.messages if m.role == "user")


def test_demo_prepare_writes_disjoint_splits(tmp_path: Path):
    out = tmp_path / "demo"
    proc = run(sys.executable, "data/demo/prepare.py", "--out", str(out), "--train", "400", "--heldout", "40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 400 train and 40 held-out conversations" in proc.stdout
    train, held = read_jsonl(out / "train.jsonl"), read_jsonl(out / "heldout.jsonl")
    assert len(train) == 400 and len(held) == 40
    # No held-out user prompt sequence occurs in train.
    held_keys = {_user_key(c) for c in held}
    assert len(held_keys) > 1
    assert not held_keys & {_user_key(c) for c in train}
    # Tasks in equal shares; every conversation ends with the assistant's answer.
    sources = [c.source for c in held]
    assert {sources.count(s) for s in set(sources)} == {10}
    assert all(c.messages[-1].role == "assistant" for c in [*train, *held])


def test_demo_prepare_is_seeded(tmp_path: Path):
    outs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run(
            sys.executable,
            "data/demo/prepare.py",
            "--out",
            str(tmp_path / name),
            "--train",
            "20",
            "--heldout",
            "8",
            "--seed",
            seed,
        ).check_returncode()
        outs.append((tmp_path / name / "heldout.jsonl").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_gpu_check_dry_run_covers_every_recipe_with_valid_launches(tmp_path):
    """bench/gpu_check.sh (run by a person with a GPU): its dry run names each recipe's tiny variant in
    fp16 (saved, resumed, exported) and bf16, and every training command it would run is one the
    launcher accepts (its own --dry-run exits 0)."""
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "gpu-check")}
    out = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    recipes = sorted(
        p.stem for p in (REPO / "config").glob("*.yaml") if p.stem not in {"tiny", "demo", "demo-dpo"}
    )
    for r in recipes:
        for suffix in ("fp16", "fp16-resume", "export", "bf16"):
            assert f"{r}-{suffix}" in lines, f"{r}-{suffix} missing"
    assert {"environment", "gpu-tier", "pipeline-2gpu", "long-context", "decode"} <= set(lines)
    launches = [cmd for name, cmd in lines.items() if cmd.startswith("bash training/")]
    assert len(launches) == 3 * len(recipes) + 1
    for cmd in launches[:: max(1, len(launches) // 6)] + [
        lines["pipeline-2gpu"]
    ]:  # a spread, and the pipeline
        proc = subprocess.run(
            [*cmd.split(), "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
    assert not (tmp_path / "gpu-check").exists()  # a dry run writes nothing


def test_vllm_parity_skips_with_its_reason_without_a_gpu(tiny_model_dir):
    """tools/vllm_parity.py (issue: parity beyond transformers) says why it skips where it cannot run,
    exits 0 (1 with --require), and names a folder that is not a model."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the gpu tier runs the comparison itself")
    run = [sys.executable, "tools/vllm_parity.py", "--model", str(tiny_model_dir)]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "skipped: no CUDA device" in proc.stdout
    assert json.loads(proc.stdout.splitlines()[-1]) == {"skipped": "no CUDA device: vLLM serves on GPUs"}
    proc = subprocess.run([*run, "--require"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    bad = subprocess.run(run[:2] + ["--model", "/nonexistent"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "not a Hugging Face model folder" in bad.stderr
