"""Launch modes beside DeepSpeed's runner: torchrun, Slurm's srun and MPI's mpirun, each starting
training/train.py unchanged (chatkit.launch --mode; README, section Launch modes).

    python -m chatkit.launch config/tiny.yaml --mode torchrun --dry-run   # every mode's command

The launcher does the same work in every mode (checks, tokenizing, preemption); only the program that
starts the ranks differs. torchrun and DeepSpeed's runner set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT themselves; the ranks of srun and mpirun read theirs from what those set
(chatkit.train.distributed.launcher_rank_env). None of them needs SSH between nodes: DeepSpeed's
runner and torchrun run once per node (--no_ssh; a rendezvous on node 0), srun starts every node's
ranks through Slurm's daemons, and mpirun is used on one node or inside a Slurm allocation, where Open
MPI starts its remote daemons through Slurm too.

`auto` picks Slurm inside an allocation (the batch script, or an salloc shell; not a task of an srun
step, which is one node's launch), torchrun where Kubeflow Trainer's torch runtime has set PET_NNODES
and its siblings, else DeepSpeed's runner.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from chatkit.plan import World
from chatkit.train.distributed import SHARED_DIR_ENV, VERBOSE_ENV

MODES = ("deepspeed", "torchrun", "slurm", "mpi")
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train.py"
PET_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
"""What torchrun reads as its flags' defaults, and Kubeflow Trainer's torch runtime sets in every pod."""
SLURM_STEP_ENV = ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")
"""Set in the tasks of an srun step, not in the batch script or an salloc shell."""
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
"""The signals torchrun turns into stopping its workers (TORCHELASTIC_SIGNALS_TO_HANDLE): not SIGTERM,
so that a preemption's SIGTERM leaves it alone (the launcher starts it ignoring SIGTERM and SIGUSR1)
while the launcher asks the ranks to save; its default would stop them, and kill them 30 s later."""
MPI_FORWARDED = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    SHARED_DIR_ENV,
    VERBOSE_ENV,
)
"""What mpirun passes (-x) to ranks on other nodes, when set; ranks on this node inherit everything.
Not the launch folder (chatkit.train.preemption): it is this node's."""


@dataclass(frozen=True)
class Spec:
    """What every mode's command is made of: the run, its world, and where node 0 listens."""

    recipe: str
    """The YAML recipe, as given to the launcher."""
    overrides: tuple[str, ...]
    """key=value settings passed to the trainer (a --tiny launch's included)."""
    world: World
    """Ranks, nodes, ranks per node, GPUs or CPU ranks."""
    output_dir: str
    """The run's output folder: names the torchrun rendezvous, holds a Slurm launch's folder."""
    master_port: int
    """node 0's rendezvous port (a free one on one node when none was given)."""
    port_given: bool = False
    """Whether the port was asked for (--master-port, $MASTER_PORT): srun's ranks derive one otherwise."""
    master_addr: str | None = None
    """node 0's address (--master-addr), None when not given."""
    node_rank: int | None = None
    """this node's rank (--node-rank), None when not given."""
    shared: str | None = None
    """The output folder every node must see (launches over several nodes), checked by the ranks."""


# --- which mode ------------------------------------------------------------------------------------


def detect(env: dict[str, str] | None = None) -> tuple[str, str]:
    """(mode, why) for `--mode auto`, from the environment alone."""
    env = dict(os.environ if env is None else env)
    job, nodes = env.get("SLURM_JOB_ID"), env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    in_step = any(k in env for k in SLURM_STEP_ENV)
    if job and (nodes or env.get("SLURM_NTASKS")) and not in_step:
        return "slurm", f"inside Slurm job {job} ({nodes or '?'} node(s)): srun starts every node's ranks"
    if pet := [k for k in PET_ENV if k in env]:
        return "torchrun", f"{', '.join(pet)} set (Kubeflow Trainer's torch runtime)"
    if job and in_step:
        return (
            "deepspeed",
            f"a task of Slurm job {job}'s step {env.get('SLURM_STEP_ID', '?')}: this node's launch",
        )
    return "deepspeed", "no Slurm allocation, no PET_* variables"


def choose(requested: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(mode, why): `requested` unless it is `auto`."""
    return detect(env) if requested == "auto" else (requested, f"--mode {requested}")


def slurm_nodes(env: dict[str, str]) -> int:
    return int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)


def world_for(mode: str, world: World, env: dict[str, str] | None = None) -> World:
    """The world `mode` starts from this launch: Slurm's allocation has SLURM_JOB_NUM_NODES nodes (for
    srun, and for mpirun inside it), Kubeflow's torch runtime PET_NNODES; per node, what this node has."""
    env = dict(os.environ if env is None else env)
    per_node = world.per_node
    if mode in ("slurm", "mpi") and env.get("SLURM_JOB_ID") and not any(k in env for k in SLURM_STEP_ENV):
        nodes = slurm_nodes(env)
    elif mode == "torchrun" and env.get("PET_NNODES"):
        nodes = int(env["PET_NNODES"])
        per_node = int(env["PET_NPROC_PER_NODE"]) if env.get("PET_NPROC_PER_NODE", "").isdigit() else per_node
    else:
        return world  # a hostfile's, or this node's
    return World(nodes * per_node, nodes, per_node, world.gpu)


def mode_problems(mode: str, include: str | None, hostfile: str | None) -> list[str]:
    """What `mode` cannot do as asked, one line each (the launcher refuses them with the others)."""
    problems = []
    if include and mode != "deepspeed":
        problems.append(
            f"--include: DeepSpeed's runner syntax; with --mode {mode} choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if hostfile and mode == "slurm":
        problems.append(
            "--hostfile: Slurm names the nodes (SLURM_JOB_NODELIST); leave it out with --mode slurm"
        )
    if hostfile and mode == "mpi":
        problems.append(
            "--hostfile: mpirun would start the other nodes' ranks over ssh; run --mode mpi inside a Slurm "
            "allocation instead (Open MPI then starts them through Slurm), or use --mode deepspeed/torchrun"
        )
    return problems


def missing_tools(mode: str) -> list[str]:
    """What this machine lacks to run `mode` (a dry run only warns of it), one line each."""
    if mode == "slurm" and not shutil.which("srun"):
        return ["--mode slurm: no srun here; run it inside an allocation (sbatch training/slurm.sbatch)"]
    if mode == "mpi" and not shutil.which("mpirun"):
        return ["--mode mpi: no mpirun here (Debian: apt-get install openmpi-bin; a cluster: its MPI module)"]
    return []


# --- the commands ----------------------------------------------------------------------------------


def rank_env(spec: Spec) -> dict[str, str]:
    """This environment plus what the ranks need whatever starts them: CPU ranks DeepSpeed's CPU
    accelerator and one share of the cores each (as the DeepSpeed mode sets them), the shared folder."""
    env = dict(os.environ)
    if not spec.world.gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.world.per_node)))
    if spec.shared:
        env[SHARED_DIR_ENV] = spec.shared
    return env


def _train(spec: Spec) -> list[str]:
    """training/train.py and its arguments (torchrun runs it with its own interpreter, this one)."""
    return [str(TRAIN_SCRIPT), "--config", spec.recipe, *spec.overrides]


def rendezvous_id(spec: Spec) -> str:
    """The torchrun rendezvous' name: the same in every node's launch (same recipe and output folder)."""
    return "chatkit-" + hashlib.sha1(f"{spec.recipe}\0{spec.output_dir}".encode()).hexdigest()[:10]


def torchrun_command(spec: Spec) -> tuple[list[str], dict[str, str]]:
    """torchrun on this node: --standalone on one node (a free port of its own); several nodes meet at
    node 0 in a c10d rendezvous, from Kubeflow's PET_* variables or --hostfile/--node-rank/--master-addr.
    Node 0 hosts the rendezvous (is_host) rather than guessing from host names, which in a pod may not
    match the address others reach it at."""
    env = rank_env(spec)
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    world = spec.world
    if world.nodes == 1:
        return [*cmd, "--standalone", "--nproc-per-node", str(world.per_node), *_train(spec)], env
    addr = env.get("PET_MASTER_ADDR") or spec.master_addr or "<node 0's address>"
    port = env.get("PET_MASTER_PORT") or str(spec.master_port)
    rank = env.get("PET_NODE_RANK") or (None if spec.node_rank is None else str(spec.node_rank))
    cmd += ["--nnodes", str(world.nodes), "--nproc-per-node", str(world.per_node), "--rdzv-backend", "c10d"]
    cmd += ["--rdzv-endpoint", f"{addr}:{port}", "--rdzv-id", rendezvous_id(spec)]
    if rank is not None:
        cmd += ["--rdzv-conf", f"is_host={'true' if rank == '0' else 'false'}"]
    return [*cmd, *_train(spec)], env


def slurm_command(spec: Spec) -> tuple[list[str], dict[str, str]]:
    """srun from the batch host: every node's ranks at once, through Slurm's daemons. The ranks take
    RANK and the rest from srun's variables; node 0 is the step's first node, and the port the one
    given, else one derived from the job id (chatkit.train.distributed.slurm_port), so nothing is
    exported unless asked for. A rank that fails ends the step (--kill-on-bad-exit)."""
    env = rank_env(spec)
    if spec.port_given:
        env["MASTER_PORT"] = str(spec.master_port)
    if spec.master_addr:
        env["MASTER_ADDR"] = spec.master_addr
    world = spec.world
    cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={world.nodes}", f"--ntasks-per-node={world.per_node}"]
    return [*cmd, sys.executable, *_train(spec)], env


def mpi_flavor() -> str:
    """`openmpi` or `mpich` (Hydra's mpiexec, Intel MPI): they pass variables with different flags.
    Open MPI's when there is no mpirun here (a dry run planning for another machine)."""
    if not shutil.which("mpirun"):
        return "openmpi"
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "openmpi"
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out else "mpich"


def mpi_command(spec: Spec, flavor: str | None = None) -> tuple[list[str], dict[str, str]]:
    """mpirun with one rank per GPU (or CPU rank): on this node, or over a Slurm allocation's nodes
    (ppr: the same number on each). Node 0's address and port go to every rank as variables; ranks are
    not bound to cores (torch's threads, OMP_NUM_THREADS, share them out as under the other modes)."""
    env = rank_env(spec)
    world = spec.world
    env["MASTER_ADDR"] = spec.master_addr or ("127.0.0.1" if world.nodes == 1 else socket.gethostname())
    env["MASTER_PORT"] = str(spec.master_port)
    forwarded = [name for name in MPI_FORWARDED if name in env]
    if (flavor or mpi_flavor()) == "mpich":
        cmd = ["mpirun", "-np", str(world.ranks), "-ppn", str(world.per_node), "-bind-to", "none"]
        return [*cmd, "-genvlist", ",".join(forwarded), sys.executable, *_train(spec)], env
    cmd = ["mpirun", "-np", str(world.ranks), "--map-by", f"ppr:{world.per_node}:node", "--bind-to", "none"]
    if os.geteuid() == 0:  # containers often run as root, which Open MPI refuses unless told
        cmd.append("--allow-run-as-root")
    if not world.gpu and world.per_node > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")  # more CPU ranks than cores: Open MPI would refuse to start them
    for name in forwarded:
        cmd += ["-x", name]
    return [*cmd, sys.executable, *_train(spec)], env


BUILDERS = {"torchrun": torchrun_command, "slurm": slurm_command, "mpi": mpi_command}


def command(mode: str, spec: Spec) -> tuple[list[str], dict[str, str]]:
    """The command that starts the ranks in `mode` (not `deepspeed`: chatkit.launch.build_command), and
    its environment."""
    return BUILDERS[mode](spec)


def command_line(cmd: list[str], env: dict[str, str]) -> str:
    """`cmd` as a shell line, after the variables `env` sets, changes or removes from this one's."""
    unset = [f"-u {k}" for k in os.environ if k not in env]
    changed = [f"{k}={shlex.quote(v)}" for k, v in env.items() if os.environ.get(k) != v]
    return " ".join([*(["env", *unset] if unset else []), *changed, *map(shlex.quote, cmd)])


def commands_by_mode(spec: Spec, deepspeed_line: str) -> list[str]:
    """`mode: command` for every mode, this recipe and world: the "# commands by launch mode" section
    of a dry run."""
    lines = [f"deepspeed: {deepspeed_line}"]
    for mode in BUILDERS:
        world = world_for(mode, spec.world)
        lines.append(f"{mode}: {command_line(*command(mode, replace(spec, world=world)))}")
    return lines


# --- running it ------------------------------------------------------------------------------------


def launch_folder(mode: str, output_dir: str) -> Path:
    """Where the ranks register for preemption (chatkit.train.preemption.LAUNCH_DIR_ENV): this machine's
    temporary folder, except under srun, whose ranks on other nodes register too: a hidden folder in
    the output folder, which every node sees."""
    if mode != "slurm":
        return Path(tempfile.mkdtemp(prefix="chatkit-launch-"))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".chatkit-launch-", dir=output_dir))


def _parent(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def in_run(pid: int, pgid: int) -> bool:
    """Whether `pid` is a rank of the run whose process group is `pgid`: in that group (DeepSpeed's
    launcher keeps its ranks there), or a child of a process in it (torchrun and mpirun give each rank
    a process group of its own). A pid registered long ago and reused since is neither."""
    try:
        if os.getpgid(pid) == pgid:
            return True
        parent = _parent(pid)
        return parent is not None and os.getpgid(parent) == pgid
    except (ProcessLookupError, PermissionError):
        return False
