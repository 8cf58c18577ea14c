"""Launch modes beside DeepSpeed's runner (chatkit.launch_modes): torchrun, Slurm's srun, mpirun.

- Which mode `auto` picks: Slurm inside an allocation (not inside an srun step's task), torchrun where
  Kubeflow's torch runtime set PET_*, else DeepSpeed's runner.
- Each mode's command as a --dry-run prints it, and as a launch starts it (with the preemption folder);
  what a mode cannot do is refused with the other problems.
- The ranks of srun and mpirun take RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from what
  those set (chatkit.train.distributed.launcher_rank_env), with Slurm's node lists read without scontrol.
- training/slurm.sbatch and training/kubeflow-trainjob.yaml hold what README's section says they do.
- Slow: the tiny recipe through torchrun, through srun's variables (two ranks started here) and through
  mpirun (when there is one) takes the DeepSpeed runner's steps, loss for loss; SIGUSR1 to the launcher
  reaches torchrun's and mpirun's ranks (process groups of their own), which save and exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import test_launch
import yaml
from test_launch import _args, _launch, _refused, _run, _tiny_base_and_data
from test_training_runs import losses

from chatkit import launch, launch_modes
from chatkit.plan import World
from chatkit.train.context import RunError
from chatkit.train.distributed import expand_hostlist, launcher_rank_env, slurm_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "training" / "train.py")
base, train, started = test_launch.base, test_launch.train, test_launch.started  # its fixtures, used here
CLEARED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CLEARED_PREFIXES = ("SLURM_", "PET_", "OMPI_", "PMI_", "MPI_LOCAL")


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """No scheduler around: a test machine inside a Slurm job or a pod must not change what auto picks."""
    for name in list(os.environ):
        if name in CLEARED or name.startswith(CLEARED_PREFIXES):
            monkeypatch.delenv(name)


def _tools(monkeypatch, tmp_path: Path, *names: str) -> None:
    """Stand-ins for srun and mpirun on PATH (an Open MPI `mpirun --version`), before the real ones."""
    folder = tmp_path / "tools"
    folder.mkdir(exist_ok=True)
    for name in names:
        script = folder / name
        script.write_text("#!/bin/sh\necho 'mpirun (Open MPI) 4.1.4'\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def _dry(capsys, argv: list[str]) -> dict[str, list[str]]:
    """A dry run's stdout, section by section (`# name` -> its lines)."""
    launch.main([*argv, "--dry-run"])
    sections: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("# "):
            sections[line[2:]] = []
        elif sections:
            sections[list(sections)[-1]].append(line)
    return sections


def _by_mode(sections: dict[str, list[str]]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in sections["commands by launch mode"])


# --- which mode ------------------------------------------------------------------------------------

BATCH = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "4"}
PET = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "1",
       "PET_MASTER_ADDR": "chat-node-0-0.chat", "PET_MASTER_PORT": "29500"}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({}, "deepspeed"),
        (BATCH, "slurm"),  # the batch script (or an salloc shell)
        ({**BATCH, "SLURM_STEP_ID": "0", "SLURM_PROCID": "1"}, "deepspeed"),  # a task of an srun step
        ({"SLURM_JOB_ID": "4242"}, "deepspeed"),  # a job id alone says nothing of the allocation
        (PET, "torchrun"),
    ],
)
def test_auto_picks_the_mode_from_the_environment(env, mode):
    assert launch_modes.detect(env)[0] == mode
    assert launch_modes.choose("mpi", env) == ("mpi", "--mode mpi")


def test_a_launch_says_which_mode_it_took(capsys, started, monkeypatch, tmp_path, base, train):
    code, err = _launch(capsys, _args(tmp_path, base, train, "--mode", "torchrun"))
    assert code == 0 and err == ["launch: mode torchrun (--mode torchrun)"], err
    _tools(monkeypatch, tmp_path, "srun")
    for name, value in BATCH.items():
        monkeypatch.setenv(name, value)
    code, err = _launch(capsys, _args(tmp_path, base, train))
    assert code == 0 and err == [
        "launch: mode slurm (inside Slurm job 4242 (2 node(s)): srun starts every node's ranks)"
    ], err
    code, err = _launch(capsys, _args(tmp_path, base, train, "--mode", "deepspeed"))
    assert code == 0 and err == ["launch: mode deepspeed (--mode deepspeed)"]


# --- the commands ----------------------------------------------------------------------------------


def test_every_mode_s_command_is_in_the_dry_run(capsys, started, monkeypatch, tmp_path, base, train):
    _tools(monkeypatch, tmp_path, "mpirun")
    argv = _args(tmp_path, base, train)
    train_args = shlex.join(
        [
            TRAIN,
            "--config",
            "config/tiny.yaml",
            f"model={base}",
            f"train_files=[{train}]",
            f"output_dir={tmp_path / 'out'}",
            "max_length=64",
        ]
    )
    for mode in ("torchrun", "slurm", "mpi"):
        sections = _dry(capsys, [*argv, "--mode", mode])
        assert sections["launch mode"] == [f"{mode} (--mode {mode})"]
        assert _by_mode(sections)[mode] == sections["command"][0]
    commands = _by_mode(sections)
    assert commands["deepspeed"] == _dry(capsys, argv)["command"][0]
    cpu = "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1"
    assert commands["torchrun"] == (
        f"{cpu} TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT {sys.executable} -m torch.distributed.run "
        f"--standalone --nproc-per-node 2 {train_args}"
    )
    assert commands["slurm"] == (
        f"{cpu} MASTER_PORT=29633 srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=2 {sys.executable} {train_args}"
    )
    root = " --allow-run-as-root" if os.geteuid() == 0 else ""
    assert commands["mpi"] == (
        f"{cpu} MASTER_ADDR=127.0.0.1 MASTER_PORT=29633 mpirun -np 2 --map-by ppr:2:node --bind-to none{root} "
        f"-x MASTER_ADDR -x MASTER_PORT -x DS_ACCELERATOR -x OMP_NUM_THREADS {sys.executable} {train_args}"
    )


def test_slurm_s_command_spans_the_allocation(capsys, started, monkeypatch, tmp_path, base, train):
    """srun starts every node's ranks; the port is the job's own (derived by the ranks) unless given."""
    _tools(monkeypatch, tmp_path, "srun", "mpirun")
    for name, value in BATCH.items():
        monkeypatch.setenv(name, value)
    argv = [a for a in _args(tmp_path, base, train) if a not in ("--master-port", "29633")]
    sections = _dry(capsys, argv)
    command = sections["command"][0]
    assert sections["launch mode"][0].startswith("slurm (inside Slurm job 4242")
    assert "srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=2 " in command
    assert "MASTER_PORT" not in command and f"CHATKIT_SHARED_OUTPUT_DIR={tmp_path / 'out'}" in command
    assert "world: 4 rank(s)" in "\n".join(sections["plan"])
    assert " MASTER_PORT=29700 srun " in _dry(capsys, [*argv, "--master-port", "29700"])["command"][0]
    assert "mpirun -np 4 --map-by ppr:2:node " in _by_mode(sections)["mpi"]  # inside the allocation too


def test_torchrun_over_several_nodes_meets_at_node_0(capsys, started, monkeypatch, tmp_path, base, train):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    node_1 = ("--hostfile", str(hosts), "--node-rank", "1", "--master-addr", "10.0.0.1")
    command = _dry(capsys, _args(tmp_path, base, train, "--mode", "torchrun", *node_1))["command"][0]
    spec = launch_modes.Spec("config/tiny.yaml", (), World(4, 2, 2, False), str(tmp_path / "out"), 29633)
    assert (
        "-m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint "
        "10.0.0.1:29633 --rdzv-id chatkit-"
    ) in command
    assert command.split("--rdzv-id ")[1].startswith(
        launch_modes.rendezvous_id(spec) + " --rdzv-conf is_host=false "
    )
    # Kubeflow Trainer's torch runtime: every setting from PET_*, nothing on the command line.
    for name, value in PET.items():
        monkeypatch.setenv(name, value)
    sections = _dry(capsys, _args(tmp_path, base, train))
    assert sections["launch mode"][0].startswith("torchrun (PET_NNODES, ")
    assert (
        "--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint chat-node-0-0.chat:29500"
        in sections["command"][0]
    )


def test_a_launch_gives_each_mode_its_command_and_the_preemption_folder(
    capsys, started, monkeypatch, tmp_path, base, train
):
    _tools(monkeypatch, tmp_path, "srun", "mpirun")
    for mode in ("torchrun", "mpi"):
        assert _launch(capsys, _args(tmp_path, base, train, "--mode", mode))[0] == 0
    (torchrun, mpi), (env_t, env_m) = started[-2:], started.envs[-2:]
    assert torchrun[1:3] == ["-m", "torch.distributed.run"] and env_t["DS_ACCELERATOR"] == "cpu"
    assert env_t["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGINT,SIGHUP,SIGQUIT"
    assert mpi[0] == "mpirun" and "CHATKIT_LAUNCH_DIR" in env_m  # this node's ranks inherit it ...
    assert "CHATKIT_LAUNCH_DIR" not in mpi  # ... and the other nodes' do not get it (it is this node's)
    for env in (env_t, env_m):
        assert Path(env["CHATKIT_LAUNCH_DIR"]).parent == Path(tempfile.gettempdir())
        assert env["CHATKIT_PREEMPT_GRACE_S"]
    # srun's ranks on other nodes register too: the folder is in the output folder, and gone afterwards.
    assert _launch(capsys, _args(tmp_path, base, train, "--mode", "slurm"))[0] == 0
    folder = Path(started.envs[-1]["CHATKIT_LAUNCH_DIR"])
    assert folder.parent == tmp_path / "out" and folder.name.startswith(".chatkit-launch-")
    assert not folder.exists()


def test_what_a_mode_cannot_do_is_refused(capsys, started, monkeypatch, tmp_path, base, train):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    nodes = ("--hostfile", str(hosts), "--node-rank", "0", "--master-addr", "10.0.0.1")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no srun, no mpirun
    assert _refused(capsys, started, _args(tmp_path, base, train, "--mode", "mpi", *nodes)) == [
        "error: --hostfile: mpirun would start the other nodes' ranks over ssh; run --mode mpi inside a "
        "Slurm allocation instead (Open MPI then starts them through Slurm), or use --mode deepspeed/torchrun",
        "error: --mode mpi: no mpirun here (Debian: apt-get install openmpi-bin; a cluster: its MPI module)",
    ]
    errors = _refused(capsys, started, _args(tmp_path, base, train, "--mode", "slurm", *nodes))
    assert errors[0].startswith("error: --hostfile: Slurm names the nodes") and "no srun here" in errors[1]
    errors = _refused(
        capsys, started, _args(tmp_path, base, train, "--mode", "torchrun", "--include", "localhost:0")
    )
    assert errors[0] == (
        "error: --include: DeepSpeed's runner syntax; with --mode torchrun choose the GPUs with CUDA_VISIBLE_DEVICES"
    )
    code, err = _launch(capsys, [*_args(tmp_path, base, train, "--mode", "mpi"), "--dry-run"])  # a plan
    assert code == 0 and err == [
        "warning: --mode mpi: no mpirun here (Debian: apt-get install openmpi-bin; a cluster: its MPI module); "
        "a launch here would stop on it"
    ]


# --- the ranks' side: srun's and mpirun's variables ------------------------------------------------


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu5", ["gpu5"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("c[009-011]-ib,login", ["c009-ib", "c010-ib", "c011-ib", "login"]),
        ("", []),
    ],
)
def test_slurm_hostlists_are_expanded_as_scontrol_does(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


SRUN_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-10]"}  # fmt: skip


def test_srun_s_variables_become_torch_s():
    assert launcher_rank_env(SRUN_TASK) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "CROSS_RANK": "2", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(slurm_port("123456")),
    }  # fmt: skip
    assert 15000 <= slurm_port("123456") < 35000 and slurm_port("123456") != slurm_port("123457")
    step = {
        **SRUN_TASK,
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NODELIST": "gpu[09-10]",
        "MASTER_PORT": "29611",
    }
    assert launcher_rank_env(step) == {
        "RANK": "5", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "2", "MASTER_ADDR": "gpu09",
        "MASTER_PORT": "29611",
    }  # fmt: skip
    assert launcher_rank_env({**SRUN_TASK, "RANK": "5"}) == {}  # set by a launcher already
    batch_shell = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    assert launcher_rank_env(batch_shell) == {}  # not a rank: the batch script itself


def test_mpirun_s_variables_become_torch_s(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # no mpi4py
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}  # fmt: skip
    want = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert launcher_rank_env(ompi) == want  # one node: node 0 is this one
    given = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29611"}
    assert launcher_rank_env({**ompi, **given}) == {**want, **given}
    hydra = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", **given}
    assert launcher_rank_env(hydra) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", **given}
    with pytest.raises(RunError, match="MPI ranks on several nodes need MASTER_ADDR"):
        launcher_rank_env({**ompi, "OMPI_COMM_WORLD_SIZE": "4"})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # mpi4py: DeepSpeed asks MPI
    assert launcher_rank_env(ompi) == {}
    assert launcher_rank_env({}) == {}


def test_ranks_of_torchrun_and_mpirun_are_the_run_s():
    """torchrun and mpirun give each rank a process group of its own: a child of the run's group counts."""
    spawn = "import subprocess, sys, time; p = subprocess.Popen(['sleep', '30'], start_new_session=True); print(p.pid, flush=True); time.sleep(30)"
    run = subprocess.Popen(
        [sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        rank = int(run.stdout.readline())
        assert os.getpgid(rank) != run.pid
        assert launch_modes.in_run(rank, run.pid) and launch_modes.in_run(run.pid, run.pid)
        assert not launch_modes.in_run(os.getpid(), run.pid)
    finally:
        os.killpg(run.pid, 9)
        run.wait()
        os.kill(rank, 9)


# --- the files README points to ------------------------------------------------------------------


def test_the_sbatch_template_launches_through_chatkit_launch():
    text = (REPO / "training" / "slurm.sbatch").read_text()
    directives = dict(
        re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line).groups()
        for line in text.splitlines()
        if line.startswith("#SBATCH ")
    )
    assert {"nodes", "ntasks-per-node", "gpus-per-node", "time", "signal"} <= set(directives)
    assert directives["signal"] == "USR1@120"  # every task of the step (the ranks), 120 s before the end
    assert '"$PY" -m chatkit.launch "$RECIPE" --mode slurm' in text
    assert subprocess.run(["bash", "-n", str(REPO / "training" / "slurm.sbatch")]).returncode == 0


def test_the_kubeflow_trainjob_runs_the_launcher_in_torchrun_mode():
    job = yaml.safe_load((REPO / "training" / "kubeflow-trainjob.yaml").read_text())
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}  # fmt: skip
    trainer = spec["trainer"]
    assert trainer["numNodes"] >= 2 and "nvidia.com/gpu" in trainer["resourcesPerNode"]["limits"]
    command = " ".join(trainer["command"])
    assert "-m chatkit.launch" in command and "--mode torchrun" in command
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    pod = pod["template"]["spec"]["template"]["spec"]
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    mount = pod["containers"][0]["volumeMounts"][0]
    assert pod["containers"][0]["name"] == "node" and mount["name"] == pod["volumes"][0]["name"] and claim
    assert f"output_dir={mount['mountPath']}/" in command  # the run's folder on the shared volume


def test_readme_has_a_section_per_launch_mode():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Launch modes\n", 1)[1].split("\n### ", 1)[0]
    for needle in ("--mode torchrun", "--mode slurm", "--mode mpi", "--mode deepspeed", "training/slurm.sbatch",
                   "training/kubeflow-trainjob.yaml", "sbatch training/slurm.sbatch", "SSH"):  # fmt: skip
        assert needle in section, needle


# --- the tiny recipe through each mode, step for step (slow) ---------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A tiny base and data, tokenized, and the DeepSpeed runner's run of them (`deepspeed/`)."""
    root = tmp_path_factory.mktemp("modes")
    _tiny_base_and_data(root)
    code, output = _run(_launch_cmd(root, "deepspeed"))
    assert code == 0, output[-4000:]
    return root


def _overrides(root: Path, name: str) -> list[str]:
    return [
        f"model={root / 'base'}", f"train_files=[{root / 'train.jsonl'}]", f"output_dir={root / name}",
        f"cache_dir={root / 'cache'}", "max_steps=3", "log_every=1", "warmup_steps=0", "learning_rate=2e-3",
        "max_length=128",
    ]  # fmt: skip


def _launch_cmd(root: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", *_overrides(root, mode),
            "--cpu-ranks", "2", "--master-port", "0", "--mode", mode]  # fmt: skip


def _same_steps(runs: Path, name: str) -> None:
    ref, run = losses(runs / "deepspeed"), losses(runs / name)
    assert sorted(run) == sorted(ref) == [1, 2, 3]
    assert run == pytest.approx(ref, abs=1e-6)


NO_MPIRUN = pytest.mark.skipif(
    shutil.which("mpirun") is None, reason="no mpirun (Debian: apt-get install openmpi-bin)"
)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["torchrun", pytest.param("mpi", marks=NO_MPIRUN)])
def test_torchrun_and_mpirun_take_the_deepspeed_runner_s_steps(runs, mode):
    code, output = _run(_launch_cmd(runs, mode))
    assert code == 0, output[-4000:]
    assert f"launch: mode {mode} (--mode {mode})" in output
    _same_steps(runs, mode)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_on_two_nodes_meets_at_node_0_and_takes_the_same_steps(runs, tmp_path):
    """Two launches as two nodes on loopback (one rank each, the hostfile's slots), meeting through
    torchrun's c10d rendezvous on node 0's port: no SSH, one launch per node, one run."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(launch.free_port())
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", *_overrides(runs, "torchrun-nodes"),
            "--mode", "torchrun", "--hostfile", str(hosts), "--node-rank", str(node), "--master-addr",
            "127.0.0.1", "--master-port", port,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert all("launch: mode torchrun (--mode torchrun)" in out for out in outs)
    # c10d's rendezvous numbers the nodes as they arrive: rank 0, which logs, is on either node
    assert "2 rank(s)" in outs[0] + outs[1], outs[0][-3000:] + outs[1][-3000:]
    _same_steps(runs, "torchrun-nodes")


def _job_with_a_free_port() -> str:
    """A Slurm job id whose derived port (chatkit.train.distributed.slurm_port) is free here now."""
    for job in range(os.getpid() % 20000, os.getpid() % 20000 + 20000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(str(job))))
            except OSError:
                continue
        return str(job)
    raise AssertionError("no free port")


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_started_as_srun_starts_them_take_the_same_steps(runs):
    """No srun here: the two ranks are started with the variables srun sets for a 2-task step on one
    node; node 0 comes from the node list, the port from the job id."""
    job = _job_with_a_free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED_PREFIXES) and k not in CLEARED}
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
             "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost"}  # fmt: skip
    cmd = [sys.executable, TRAIN, "--config", "config/tiny.yaml", *_overrides(runs, "slurm")]
    start = time.monotonic()
    ranks = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert time.monotonic() - start < 300
    _same_steps(runs, "slurm")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["torchrun", pytest.param("mpi", marks=NO_MPIRUN)])
def test_a_preemption_signal_reaches_ranks_in_process_groups_of_their_own(runs, mode):
    """torchrun and mpirun start each rank in a process group of its own: SIGUSR1 to the launcher still
    reaches them, and the run saves, exits 0 and names the command that goes on."""
    out = runs / f"preempted-{mode}"
    cmd = [*_launch_cmd(runs, mode), f"output_dir={out}", "max_steps=1000"]
    env = {k: v for k, v in os.environ.items() if k not in ("CHATKIT_CPU_RANKS", "MASTER_PORT")}
    log = runs / f"preempted-{mode}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=150) == 0, log.read_text()[-4000:]
        finally:
            proc.kill()
            proc.wait()
    assert f"launch: SIGUSR1: the run saved {out / 'checkpoints'}/step" in log.read_text()
