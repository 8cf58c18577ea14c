"""Start training/train.py under the DeepSpeed launcher on whatever this machine has.

GPUs when torch sees them, otherwise CPU ranks (DS_ACCELERATOR=cpu, gloo); never a hard-coded count.
Several nodes go through DeepSpeed's hostfile; one node rendezvouses on a free port. Every problem
found before the launch is reported at once, one `error:` line each, and nothing starts. `--dry-run`
prints the resolved config, the plan (world size, batch, memory per GPU or rank, and warnings: a batch
other than the recipe's, memory beyond a rank's; chatkit/plan.py) and the exact command instead of
running it; a launch prints the plan's warnings. DeepSpeed's launcher logs only what is critical
(--verbose or CHATKIT_VERBOSE=1: all of it). `--tiny` runs the recipe's tiny variant: the same recipe on
the tiny model of the same architecture and the demo data, for a few steps, so every recipe can be
tried on a laptop.

Once the checks pass, the launcher tokenizes the data the cache lacks, with a progress bar (each
node's launcher into its cache_dir; over a shared one, what another node has finished is found), so the
ranks only map the cached arrays and none waits in a collective while another tokenizes
(chatkit.train.data). A --dry-run tokenizes nothing; tools/tokenize_data.py does this step alone.

Which GPUs: those of CUDA_VISIBLE_DEVICES when it is set (passed on as DeepSpeed's `--include
localhost:4,5,...`: given `--num_gpus`, DeepSpeed's runner drops the variable and takes GPUs 0..N-1),
or those of `--include`, in DeepSpeed's syntax. A machine with GPUs whose torch cannot use them is
refused instead of trained on CPU ranks, unless CPU ranks are asked for (`--num-gpus 0`, `--cpu-ranks N`).
Several nodes: one launch per node, each given the same --hostfile, --master-addr and --master-port and
its own --node-rank; the ranks then check that output_dir is one folder every node sees
(chatkit.train.distributed.check_shared_output_dir).

SIGTERM or SIGUSR1 (preemption) asks the ranks to save a checkpoint after their current step and
stop; the launch then exits 0 and prints the command that resumes (run_group, chatkit.train.preemption).
Ctrl-C stops the run at once, as before.

--mode torchrun, slurm or mpi starts the ranks with torchrun, srun or mpirun instead of DeepSpeed's
runner, and `auto` (the default) picks Slurm inside an allocation and torchrun under Kubeflow Trainer
(chatkit.launch_modes); a --dry-run prints every mode's command.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from chatkit import launch_modes
from chatkit.architectures import ARCHITECTURES
from chatkit.config import ConfigError, TrainConfig, config_error, read_config
from chatkit.models import spec_for_path
from chatkit.plan import World, base_config, ds_preset, plan_lines
from chatkit.train import preemption
from chatkit.train.distributed import SHARED_DIR_ENV, VERBOSE_ENV, verbose

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
STOP_GRACE_S = 10.0  # after a forwarded signal, how long the run has to exit before SIGKILL (preemption:
# SIGTERM, SIGUSR1 ask the ranks to save, and the run has the recipe's preempt_grace_s; see run_group)
DEFAULT_MASTER_PORT = 29500  # DeepSpeed's and torch's: several nodes must agree on a port
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
NVIDIA_DEVICE = Path("/dev/nvidia0")  # the first GPU's device node, there while the NVIDIA driver is loaded
GPU_INSTALL = (
    "install a CUDA build of torch (README, section GPUs: "
    "make install TORCH_INDEX=https://download.pytorch.org/whl/cu128)"
)
NCCL_HELP = """\
NCCL settings (GPU runs; export them before each node's launch, the ranks inherit them):
  NCCL_SOCKET_IFNAME=eth0   the network interface NCCL bootstraps and (without InfiniBand) sends over;
                            set it when a node has several (docker0, lo, a second NIC) and NCCL picks one
                            the other nodes cannot reach: the run hangs at its first collective.
                            `^docker0,lo` excludes instead.
  NCCL_IB_DISABLE=1         do not use InfiniBand/RoCE: for nodes with IB adapters that are not cabled or
                            configured (errors from ibv_*, or hangs). Leave it unset on a working fabric.
  NCCL_DEBUG=INFO           NCCL logs its setup: interfaces, transports (NET/IB, NET/Socket, P2P), rings;
                            the first thing to read when a multi-node run hangs or fails to connect
                            (NCCL_DEBUG_SUBSYS=INIT,NET narrows it).
  TORCH_NCCL_ASYNC_ERROR_HANDLING=1
                            a rank whose collective fails or times out aborts NCCL and exits instead of
                            hanging, so the launcher sees the failure. torch's default is 3 (exit without
                            aborting NCCL); NCCL_ASYNC_ERROR_HANDLING is its older name (torch < 2.2).
  DEEPSPEED_TIMEOUT=30      minutes a collective may wait before it fails (DeepSpeed's default 10): the
                            timeout of torch's process group, which deepspeed.init_distributed sets. Raise
                            it when one rank works alone for long while the others wait. Tokenization no
                            longer does: the launcher tokenizes before the ranks start.
"""


def count_gpus() -> int:
    """GPUs torch can use here (those CUDA_VISIBLE_DEVICES shows); 0 without a CUDA build of torch."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def torch_build() -> tuple[str, str | None]:
    """(torch's version, the CUDA version it was built for, None for a CPU-only build)."""
    import torch

    return torch.__version__, torch.version.cuda


def gpu_evidence() -> str | None:
    """What says this machine has NVIDIA GPUs whatever torch says, or None: `nvidia-smi -L` listing
    any (it ignores CUDA_VISIBLE_DEVICES), else the driver's device node."""
    if smi := shutil.which("nvidia-smi"):
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            out = None
        listed = out.stdout.splitlines() if out is not None and out.returncode == 0 else []
        if n := sum(line.startswith("GPU ") for line in listed):
            return f"nvidia-smi lists {n} GPU(s)"
    return f"{NVIDIA_DEVICE} exists" if NVIDIA_DEVICE.exists() else None


def visible_devices() -> list[str] | None:
    """The GPU indices CUDA_VISIBLE_DEVICES shows, in its order; None when it is unset or empty (as
    DeepSpeed's runner, which then ignores it). CUDA ignores the list from its first negative entry on.

    Raises ValueError (one line) for UUIDs or MIG names: DeepSpeed's --include takes indices only."""
    value = os.environ.get(VISIBLE_ENV, "").strip()
    if not value:
        return None
    shown = []
    for entry in (e.strip() for e in value.split(",")):
        if not re.fullmatch(r"-?\d+", entry):
            raise ValueError(
                f"{VISIBLE_ENV}={value}: DeepSpeed's --include takes GPU indices only (`nvidia-smi -L` lists "
                "them); set it to indices, or name the GPUs with --include localhost:0,1"
            )
        if int(entry) < 0:
            break
        shown.append(str(int(entry)))
    return shown


DEMO_TRAIN = "data/demo/files/train.jsonl"
DEMO_PAIRS = "data/demo/files/pairs_train.jsonl"
"""The tiny variant's data: the demo's conversations, or its preference pairs for method=dpo."""


def gpus_per_node(args: argparse.Namespace) -> int:
    return count_gpus() if args.num_gpus is None else args.num_gpus


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile, read as DeepSpeed reads it: `host slots=N` a line, `#` comments.

    Raises ValueError (one line) where DeepSpeed would not launch as asked: a missing file makes its
    runner fall back to this machine alone, with a warning, and exit 0 after a one-node run."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"--hostfile: no such file {path!r}") from None
    except OSError as e:
        raise ValueError(f"--hostfile: cannot read {path!r} ({e.strerror})") from None
    hosts: dict[str, int] = {}
    for line in (ln.strip() for ln in lines):
        if not line or line.startswith("#"):
            continue
        match = re.match(r"(\S+)\s+slots=(\d+)", line)
        if not match:
            raise ValueError(f"--hostfile: {path}: bad line {line!r} (expected `host slots=N`)")
        if match[1] in hosts:
            raise ValueError(f"--hostfile: {path}: {match[1]} is listed twice")
        hosts[match[1]] = int(match[2])
    if not hosts:
        raise ValueError(f"--hostfile: {path} lists no host (expected `host slots=N` lines)")
    return list(hosts.items())


def parse_include(spec: str) -> dict[str, list[int]]:
    """DeepSpeed's --include, `host[:slot,...][@host...]`, as host -> slots ([]: all the host's slots).

    As DeepSpeed's runner reads it (deepspeed/launcher/runner.py, parse_node_config_list: a host named
    twice has its slots merged); raises ValueError (one line) where that would fail or mean nothing."""
    hosts: dict[str, set[int]] = {}
    for node in spec.split("@"):
        host, colon, slots = node.partition(":")
        if not host or (colon and not re.fullmatch(r"\d+(,\d+)*", slots)):
            raise ValueError(
                f"--include: bad node {node!r} in {spec!r} (expected host or host:0,1, nodes joined by @)"
            )
        hosts.setdefault(host, set()).update(int(i) for i in slots.split(",") if colon)
    return {host: sorted(slots) for host, slots in hosts.items()}


def nodes_of(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(host, ranks) of each node the launch starts, in DeepSpeed's order (the hostfile's): the hostfile's
    hosts and slots, narrowed by --include; without a hostfile, `localhost` and --include's GPUs.

    Raises ValueError (one line) where DeepSpeed's runner would raise, with a traceback, after the launch."""
    pool: dict[str, int | None] = dict(read_hostfile(args.hostfile)) if args.hostfile else {"localhost": None}
    if not args.include:
        return [(host, n or 0) for host, n in pool.items()]
    include = parse_include(args.include)
    where = args.hostfile or "this machine (no --hostfile: only localhost)"
    for host, slots in include.items():
        if host not in pool:
            raise ValueError(f"--include: {host} is not a host of {where}")
        n = pool[host]
        if n is None and not slots:
            raise ValueError(f"--include: name {host}'s GPUs, e.g. {host}:0,1")
        if n is not None and slots and slots[-1] >= n:
            raise ValueError(
                f"--include: {host} has {n} slot(s) in {args.hostfile}, numbered from 0: no {slots[-1]}"
            )
    return [(host, len(include[host]) or n or 0) for host, n in pool.items() if host in include]


def world_of(args: argparse.Namespace) -> World:
    """Ranks the launch will start: GPUs (or CPU ranks) per node x the hostfile's nodes and slots, or
    --include's GPUs."""
    gpus = gpus_per_node(args)
    gpu = gpus > 0 or bool(args.include)
    per_node = gpus or args.cpu_ranks
    if not (args.hostfile or args.include):
        return World(per_node, 1, per_node, gpu)
    try:
        slots = [n for _, n in nodes_of(args)]
    except ValueError:  # reported by node_problems
        return World(per_node, 1, per_node, gpu)
    return World(sum(slots), len(slots), slots[0], gpu)


def _divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def tiny_overrides(cfg: TrainConfig, recipe: str, ranks: int, gpu: bool) -> list[str]:
    """Overrides that turn a recipe into its tiny variant; everything else (template, LoRA, QLoRA,
    ZeRO stage, pipeline) stays as the recipe has it, so the variant exercises the same code."""
    base = base_config(cfg.model)  # the registry entry's family, else the folder's config.json's
    arch = ARCHITECTURES.get(base["model_type"] if base else "", ARCHITECTURES["gpt_neox"])
    tiny = arch.tiny
    out = [
        f"model=pretrained/{tiny}/model", f"train_files=[{DEMO_PAIRS if cfg.method == 'dpo' else DEMO_TRAIN}]",
        "val_files=[]", "eval_prompts=[]",
        f"output_dir=outputs/{Path(recipe).stem}-tiny", "max_steps=4", f"max_length={min(cfg.max_length, 256)}",
        "micro_batch_size=2", f"gradient_accumulation_steps={min(cfg.gradient_accumulation_steps, 2)}",
        "intended_batch=0",
        "warmup_steps=1", "save_every=0", "eval_every=0", "log_every=1", "resume=", "train_log_backend=[loguru]",
    ]  # fmt: skip
    if not gpu and cfg.precision != "fp32":
        out.append("precision=fp32")
    deepspeed = cfg.deepspeed.removesuffix("_offload")  # offload presets: their stage without offload
    stages = _divisor_at_most(ranks, cfg.pipeline_stages)
    if stages != cfg.pipeline_stages:
        out.append(f"pipeline_stages={stages}")
        if stages == 1 and deepspeed == "pipeline":
            deepspeed = "zero0"
    if deepspeed != cfg.deepspeed:
        out.append(f"deepspeed={deepspeed}")
    return out


def tiny_inputs(cfg: TrainConfig) -> set[str]:
    """The inputs of `cfg` that `ensure_tiny_inputs` builds when they are missing."""
    built = {DEMO_TRAIN, DEMO_PAIRS} & set(cfg.train_files)
    built |= {cfg.model} & {f"pretrained/{arch.tiny}/model" for arch in ARCHITECTURES.values()}
    return built


def ensure_tiny_inputs(cfg: TrainConfig) -> None:
    """Write the demo data and build the tiny base the tiny variant uses, when they are missing."""
    tiny_bases = {f"pretrained/{arch.tiny}/model" for arch in ARCHITECTURES.values()}
    needed = {DEMO_TRAIN, DEMO_PAIRS} & set(cfg.train_files) or (
        {DEMO_TRAIN} if cfg.model in tiny_bases else set()
    )
    if any(not Path(p).is_file() for p in needed):
        from chatkit.conversation import write_conversations
        from chatkit.datasets.synthetic import make_preference_pairs, make_splits
        from chatkit.io import write_jsonl

        train, heldout = make_splits(20000, 100)  # data/demo/prepare.py's defaults
        if not Path(DEMO_TRAIN).is_file():
            write_conversations(DEMO_TRAIN, train)
            write_conversations(Path(DEMO_TRAIN).with_name("heldout.jsonl"), heldout)
        if DEMO_PAIRS in needed and not Path(DEMO_PAIRS).is_file():
            pairs, held_pairs = make_preference_pairs(10000, heldout, 1)  # as tools/demo_dpo.sh writes them
            write_jsonl(DEMO_PAIRS, (p.to_dict() for p in pairs))
            write_jsonl(Path(DEMO_PAIRS).with_name("pairs_heldout.jsonl"), (p.to_dict() for p in held_pairs))
        print(f"wrote the demo data to {Path(DEMO_TRAIN).parent}/", file=sys.stderr)
    for arch in ARCHITECTURES.values():
        path = f"pretrained/{arch.tiny}/model"
        if cfg.model == path and not Path(path, "config.json").is_file():
            from chatkit.pretrained import prepare_tiny

            n = prepare_tiny([DEMO_TRAIN], path, arch=arch.model_type)
            print(f"built the tiny {arch.model_type} base ({n:,} parameters) in {path}", file=sys.stderr)


# --- what is known before the launch ----------------------------------------------------------------


def looks_like_a_path(model: str) -> bool:
    """Whether `model` names a local folder rather than a Hugging Face hub id (`org/name`)."""
    if model.startswith((".", "/", "~", "pretrained/", "outputs/")) or Path(model).exists():
        return True
    parent = Path(model).parent
    return parent != Path(".") and parent.is_dir()  # e.g. checkpoints/step9/hf, its folder here


def model_context(model: str) -> tuple[int, str] | None:
    """The base's context (max_position_embeddings) and where it was read: the folder's config.json
    when the folder has one, else the registry entry's shape; None when neither says."""
    path = Path(model) / "config.json"
    if path.is_file():
        try:
            n = json.loads(path.read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            return None
        return (n, str(path)) if isinstance(n, int) and not isinstance(n, bool) else None
    spec = spec_for_path(model)
    n = spec.config.get("max_position_embeddings") if spec else None
    return (n, f"the {spec.name} entry of chatkit.models") if isinstance(n, int) else None


def _model_problem(model: str) -> str | None:
    if not looks_like_a_path(model):
        return None  # a hub id: the ranks download it (or find it in the Hugging Face cache)
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        return None
    if path.is_dir():
        return f"model: {model!r} has no config.json (not a Hugging Face model folder)"
    if path.exists():
        return f"model: {model!r} is not a folder"
    hint = ""
    if path.name == "model" and (script := path.parent / "prepare.py").is_file():
        hint = f" ({script} prepares it)"
    return f"model: no such folder {model!r}{hint}"


def is_loopback(host: str) -> bool:
    """Whether `host` names the machine it is read on (localhost, 127.x, ::1)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_problems(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(problems of the nodes as given, settings this node's launch lacks), one line each.

    With a hostfile each node runs its own launch (DeepSpeed's --no_ssh), so each must be told which
    line of the hostfile it is and where node 0 listens: DeepSpeed's runner would otherwise ssh to the
    first host to ask (`hostname -I`), and the old default here, 127.0.0.1, made node 0 wait alone while
    every other node waited for a node 0 on itself. A --dry-run only warns of the missing settings (it
    plans the whole launch, not one node's)."""
    errors, unset = [], []
    try:
        nodes = nodes_of(args) if (args.hostfile or args.include) else []
    except ValueError as e:
        errors.append(str(e))
        nodes = []
    if not args.hostfile:
        if given := [
            f
            for f, v in (("--node-rank", args.node_rank), ("--master-addr", args.master_addr))
            if v is not None
        ]:
            errors.append(
                f"{' and '.join(given)}: for several nodes, with --hostfile (one node needs neither)"
            )
        return errors, unset
    if args.master_addr is None:
        unset.append(
            "--master-addr: required with --hostfile: the address of node 0 that every node reaches, the "
            "same in every node's launch"
        )
    elif is_loopback(args.master_addr) and (away := [h for h, _ in nodes if not is_loopback(h)]):
        errors.append(
            f"--master-addr: {args.master_addr} is each machine's own loopback and {args.hostfile} lists "
            f"other machines ({', '.join(away[:3])}): they would wait for node 0 on themselves; give "
            "node 0's address"
        )
    if args.node_rank is None:
        unset.append(
            f"--node-rank: required with --hostfile: this node's place among {args.hostfile}'s hosts, from 0 "
            "(the node at --master-addr)"
        )
    elif nodes and not 0 <= args.node_rank < len(nodes):
        errors.append(
            f"--node-rank: {args.node_rank} is not one of the {len(nodes)} node(s) 0-{len(nodes) - 1}"
        )
    return errors, unset


def visible_problems(args: argparse.Namespace, world: World) -> list[str]:
    """What stops CUDA_VISIBLE_DEVICES from meaning, for this launch, what it says (one line each)."""
    if not world.gpu or args.include:  # CPU ranks ignore it; --include names physical GPUs itself
        return []
    try:
        shown = visible_devices()
    except ValueError as e:
        return [str(e)]
    if shown is None:
        return []
    value, n = os.environ[VISIBLE_ENV], gpus_per_node(args)
    if not args.hostfile:
        return (
            [f"--num-gpus: {n} GPU(s) asked for and {VISIBLE_ENV}={value} shows {len(shown)}"]
            if len(shown) < n
            else []
        )
    # DeepSpeed's per-node launcher sets CUDA_VISIBLE_DEVICES to the node's slots, 0..N-1 of a hostfile's
    # `slots=N` (launcher/launch.py, set_visible_devices_envs): other GPUs named in it would be ignored.
    slots = hostfile_slots(args)
    if slots and shown[:slots] != [str(i) for i in range(slots)]:
        return [
            f"{VISIBLE_ENV}={value}: with --hostfile DeepSpeed gives each node its GPUs 0-{slots - 1} "
            "whatever this says; name the GPUs with --include, the same on every node (e.g. "
            "host-a:4,5@host-b:4,5, with the hostfile's slots counting every GPU of a node)"
        ]
    return []


def torch_problem(args: argparse.Namespace, world: World, dry_run: bool) -> str | None:
    """Why this machine's torch cannot run the launch as planned, in one line; None when it can.

    A CPU-only torch on a machine with GPUs once trained on CPU ranks without a word. CPU ranks asked for
    (--num-gpus 0, or --cpu-ranks on the command line; not $CHATKIT_CPU_RANKS, a standing default) are
    left alone. A --dry-run may plan for GPUs this machine lacks (--num-gpus N): it is told only of GPUs
    here that torch cannot use."""
    have = count_gpus()
    asked = "--include" if args.include else f"--num-gpus {args.num_gpus}"
    if have > 0:
        single = not (args.hostfile or args.include or os.environ.get(VISIBLE_ENV, "").strip())
        if not dry_run and single and world.gpu and world.per_node > have:
            return f"{asked}: torch sees {have} GPU(s) on this machine"
        return None
    if not world.gpu and (args.num_gpus == 0 or args.cpu_ranks_given):
        return None
    seen = gpu_evidence()
    if seen is None:
        return None if dry_run or not world.gpu else f"{asked}: torch sees no GPU on this machine"
    version, cuda = torch_build()
    if cuda is None:
        why, fix = f"torch {version} is a CPU-only build", GPU_INSTALL
    else:
        why = f"torch {version} sees no GPU (torch.cuda.is_available() is False)"
        shown = os.environ.get(VISIBLE_ENV, "unset")
        fix = f"check {VISIBLE_ENV} ({shown}) and that the driver supports CUDA {cuda}"
    what = f"{asked} needs GPUs that torch can use" if world.gpu else "this launch would train on CPU ranks"
    cpu = "or ask for CPU ranks with --num-gpus 0 or --cpu-ranks N"
    return f"{why} and this machine has GPUs ({seen}): {what}; {fix}, {cpu}"


def hostfile_slots(args: argparse.Namespace) -> int:
    """This node's slots in the hostfile; 0 when that is not known (no valid hostfile or node rank)."""
    try:
        nodes = read_hostfile(args.hostfile)
    except ValueError:
        return 0
    rank = args.node_rank
    return nodes[rank][1] if rank is not None and 0 <= rank < len(nodes) else 0


def launch_problems(
    cfg: TrainConfig, world: World, to_build: set[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """What stops this launch, found before anything starts: (problems of the launch as planned, which a
    --dry-run reports as errors too; files this machine lacks, which a --dry-run only warns of, as it
    plans without weights or data). One line each, naming the setting. Paths in `to_build`
    (`tiny_inputs`, which the launch builds when they are missing) are not reported missing. The
    hostfile is `hostfile_problems`'s."""
    errors, missing = [], []
    where = f"{world.ranks} {'GPU' if world.gpu else 'CPU'} rank(s)"
    if cfg.precision == "fp16" and not world.gpu:
        errors.append(
            f"precision: fp16 needs GPUs and this launch starts {where} (DeepSpeed's CPU accelerator has "
            "no fp16); use bf16 or fp32, or plan for GPUs with --num-gpus N"
        )
    stages = cfg.pipeline_stages
    if stages > 1 and world.ranks % stages:
        errors.append(
            f"pipeline_stages: {stages} stages need a multiple of {stages} ranks and this launch starts "
            f"{where}; set pipeline_stages, or plan for other hardware with --num-gpus N"
        )
    context = model_context(cfg.model)
    if context and cfg.max_length > context[0]:
        errors.append(
            f"max_length: {cfg.max_length} exceeds the model's context of {context[0]} tokens "
            f"(max_position_embeddings in {context[1]})"
        )
    if cfg.model not in to_build and (problem := _model_problem(cfg.model)):
        missing.append(problem)
    from chatkit.data import DataSource

    for name in ("train_files", "val_files"):
        paths = [DataSource.parse(spec).path for spec in getattr(cfg, name)]
        gone = [path for path in paths if path not in to_build and not Path(path).is_file()]
        if gone:
            more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
            missing.append(f"{name}: no such file {', '.join(map(repr, gone[:3]))}{more}")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_dir():
        missing.append(f"resume: no checkpoint folder {cfg.resume!r} (give one, or resume=auto)")
    return errors, missing


def tokenize_data(cfg: TrainConfig) -> None:
    """Tokenize what the cache lacks, here, before the ranks start; a bad line, an unreadable file or a
    tokenizer that does not load stops the launch with one `error:` line (exit status 2)."""
    from chatkit.train.context import RunError
    from chatkit.train.data import prepare_data

    try:
        lines = prepare_data(cfg)
    except RunError as e:
        refuse([str(e)])
    except KeyboardInterrupt:
        print("launch: interrupted while tokenizing; nothing was started", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    for line in lines:
        print(line, file=sys.stderr)


def refuse(problems: list[str]) -> None:
    """Stop before anything starts: one `error:` line a problem, exit status 2."""
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)


def free_port() -> int:
    """A TCP port the OS says is free now: a single-node launch's default (parallel or repeated launches
    on one machine would otherwise collide on one port), or `--master-port 0`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prebuild_cpu_adam(cfg: TrainConfig, gpu: bool) -> None:
    """Compile DeepSpeed's CPU Adam here, once, before the ranks start, when the run will need it.

    ZeRO-Offload steps the optimizer with DeepSpeed's CPU Adam, which torch JIT-compiles on first use
    under a lock file. Built by the launcher, the ranks only load it, and a lock left behind by a run
    killed mid-build (which would make every rank wait forever) is reported instead of waited on.
    """
    zero = ds_preset(cfg.deepspeed).get("zero_optimization", {})
    if "offload_optimizer" not in zero or cfg.optim == "adamw8bit":
        return
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("cpu_adam", verbose=False)) / "lock"
    if lock.exists():
        sys.exit(
            f"error: {lock} exists: a build of DeepSpeed's CPU Adam is running or was killed. If no "
            "other training run is starting, delete that file and launch again."
        )
    print("loading DeepSpeed's CPU Adam (compiled once, on the first offload run)", file=sys.stderr)
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # as the ranks will see it: the CPU build of the op
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("CPUAdamBuilder").load(verbose=False)


def device_flags(args: argparse.Namespace, gpus: int, env: dict[str, str]) -> list[str]:
    """The runner's flags that choose each node's GPUs (or CPU ranks); drops from `env` what they replace.

    DeepSpeed's runner (deepspeed/launcher/runner.py, main(), alike in 0.19.8 and deepspeedai/DeepSpeed
    master) turns CUDA_VISIBLE_DEVICES into `--include localhost:<its list>` only when it is given none of
    --include, --exclude, --num_gpus, --num_nodes; given one, it prints that it ignores the variable.
    Either way it deletes the variable, and its per-node launcher sets it for each rank from the
    resolved slots. `--num_gpus N` means GPUs 0..N-1 of each node, and --include with --num_gpus is
    refused ("Cannot specify num_nodes/gpus with include/exclude"). Hence: the visible list (its first N
    with --num-gpus N) goes as --include, physical indices, and never with --num_gpus. A hostfile's
    `slots=N` means GPUs 0..N-1 too, and the runner leaves CUDA_VISIBLE_DEVICES alone then (it reads
    the variable only without a hostfile): --include names others there."""
    if gpus == 0 and not args.include:  # CPU ranks: DeepSpeed's CPU accelerator counts --num_gpus as ranks
        return [] if args.hostfile else ["--num_gpus", str(args.cpu_ranks)]
    if args.include:
        env.pop(VISIBLE_ENV, None)  # --include names physical GPUs; the runner would only say it ignores it
        return ["--include", args.include]
    if args.hostfile:
        return []
    shown = visible_devices()  # readable: visible_problems has checked
    if not shown:
        return ["--num_gpus", str(gpus)]
    env.pop(VISIBLE_ENV)
    return ["--include", "localhost:" + ",".join(shown[:gpus])]


def build_command(
    args: argparse.Namespace, overrides: list[str] | None = None, shared_dir: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """DeepSpeed's runner command for this node, and its environment. `shared_dir`: the output folder of
    a launch over several nodes, which the ranks check every node sees (SHARED_DIR_ENV)."""
    env = dict(os.environ)
    gpus = gpus_per_node(args)
    # DeepSpeed's runner and per-node launcher log at INFO: the hostfile fallback, world-info dicts, the
    # visible devices (CUDA_VISIBLE_DEVICES on a CPU machine too), every spawned command, and an ERROR
    # line repeating a failed rank's command. The ranks say what matters themselves, and `run_group`'s
    # caller names a rank killed by a signal, so they log only what is critical unless asked (--verbose).
    level = "info" if verbose() else "critical"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", level]
    if gpus == 0 and not args.include:
        env["DS_ACCELERATOR"] = "cpu"
        # One thread per rank by default: ranks share the cores instead of fighting over them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.cpu_ranks)))
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile, "--no_ssh"]
        if args.node_rank is not None:  # a dry run may lack them (and warns); a launch does not
            cmd += ["--node_rank", str(args.node_rank)]
        if args.master_addr is not None:
            cmd += ["--master_addr", args.master_addr]
    cmd += device_flags(args, gpus, env)
    cmd += ["--master_port", str(args.master_port)]
    cmd += [str(TRAIN_SCRIPT), "--config", args.recipe, *(args.overrides if overrides is None else overrides)]
    if shared_dir:
        env[SHARED_DIR_ENV] = shared_dir
    return cmd, env


def command_line(cmd: list[str], env: dict[str, str]) -> str:
    """`cmd` as a shell line, after the variables the launch sets or removes: what a --dry-run prints."""
    unset = [f"-u {k}" for k in (VISIBLE_ENV,) if k in os.environ and k not in env]
    keys = ("DS_ACCELERATOR", "OMP_NUM_THREADS", SHARED_DIR_ENV)
    extra = [f"{k}={shlex.quote(env[k])}" for k in keys if k in env]
    return " ".join([*(["env", *unset] if unset else []), *extra, *map(shlex.quote, cmd)])


# --- running it ------------------------------------------------------------------------------------


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: ask the kernel (zombies count)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _stop_group(pgid: int, grace: float) -> None:
    """SIGTERM what is left of the group, then SIGKILL what is still there after `grace` seconds."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        _signal_group(pgid, signum)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # not print(): a handler may interrupt one
        os.write(sys.stderr.fileno(), f"{line}\n".encode())


def _preemption(env: dict[str, str] | None) -> tuple[Path | None, float]:
    """(the launch folder the ranks register in, the preemption grace) that `env` names; (None, 0)
    when it names none: SIGTERM and SIGUSR1 then stop the group as SIGINT does."""
    folder = (env or {}).get(preemption.LAUNCH_DIR_ENV)
    if not folder:
        return None, 0.0
    return Path(folder), float((env or {}).get(preemption.GRACE_ENV) or 120)


def _tell_ranks(pgid: int, folder: Path, signum: int, told: set[int]) -> None:
    """Send `signum` to the ranks registered in `folder` and not yet told; a pid that is not in the
    run's process group (any more) is left alone."""
    for pid in preemption.rank_pids(folder):
        if pid in told:
            continue
        told.add(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if launch_modes.in_run(pid, pgid):  # torchrun's and mpirun's ranks: children of the group
                os.kill(pid, signum)


def _ignore_preemption_signals() -> None:
    """In DeepSpeed's runner, before it execs (and so in its per-node launcher, which inherits it): a
    SIGTERM or SIGUSR1 sent to every process of the job (Slurm signals a job step so) leaves both
    alone; the ranks set handlers of their own. The per-node launcher still sets its SIGTERM handler."""
    for signum in preemption.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def run_group(cmd: list[str], env: dict[str, str] | None, grace: float = STOP_GRACE_S) -> int:
    """Run `cmd` (DeepSpeed's runner) in a session and process group of its own, which its launcher and
    ranks join, and return its exit status; nothing it started outlives this call.

    SIGINT, SIGHUP (and SIGTERM, SIGUSR1 without preemption) to this process go to the whole group (a
    Ctrl-C on the terminal reaches this process only, as the group has left the terminal's); the run
    then has `grace` seconds before the group is killed (a second signal kills it at once), and the
    status is 128 + the signal.

    Preemption, when `env` names a launch folder and a grace (chatkit.train.preemption; main does):
    SIGTERM and SIGUSR1 go to the ranks registered there, and only to them (DeepSpeed's per-node
    launcher would kill them 30 s later and exit 1); they finish their step, save and exit 0. The run
    has the preemption grace before the group is killed, repeats of these signals change nothing, and
    the status is 0 when the run saved (or finished), else 128 + the signal."""
    folder, preempt_grace = _preemption(env)
    received: list[int] = []
    stops: list[int] = []  # signals that stop the group, as opposed to asking the ranks to save
    told: set[int] = set()
    proc: subprocess.Popen | None = None

    def on_signal(signum: int, frame) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if folder is not None and signum in preemption.SIGNALS and not stops:
            if proc is not None:
                _tell_ranks(proc.pid, folder, signum, told)
            if len(received) == 1:
                _say(
                    f"launch: {name}: asking the run to save a checkpoint and stop (killed in "
                    f"{preempt_grace:.0f} s otherwise: preempt_grace_s)"
                )
            return
        stops.append(signum)
        if proc is not None:
            again = len(stops) > 1
            _signal_group(proc.pid, signal.SIGKILL if again else signum)
            _say(f"launch: {name}: {'killing' if again else 'stopping'} the run (process group {proc.pid})")

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(
            cmd, env=env, cwd=os.getcwd(), start_new_session=True,
            preexec_fn=_ignore_preemption_signals if folder is not None else None,
        )  # fmt: skip
        if stops:  # a signal came before the group existed
            _signal_group(proc.pid, stops[0])
        deadline = None
        while True:
            try:
                status = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and not stops:  # preemption: the ranks registered since are told too
                _tell_ranks(proc.pid, folder, received[0], told)
            if received and deadline is None:
                deadline = time.monotonic() + (grace if stops else preempt_grace)
            if stops and deadline is not None:
                deadline = min(deadline, time.monotonic() + grace)
            if deadline is not None and time.monotonic() > deadline:
                _signal_group(proc.pid, signal.SIGKILL)
        _stop_group(proc.pid, grace)  # ranks the runner left behind (killed, or it crashed)
    finally:
        if proc is not None and proc.poll() is None:  # an exception here: take the group down with us
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received and not stops and (status == 0 or preemption.stopped(folder)):
        return 0  # saved (a failure the per-node launcher reports, when it was signalled too, is none)
    if received:
        return 128 + received[0]
    return status if status >= 0 else 128 - status  # killed by a signal from elsewhere: as a shell says


def failure_line(status: int) -> str | None:
    """What to say when the run ends with `status` that no rank has explained.

    A rank killed by a signal leaves no Python error behind; DeepSpeed's launcher then exits with minus
    the signal (256 - N as a status), and its own line about it is silenced with the rest of its log.
    Other statuses come from the ranks, which said why (one `error:` line, or a traceback)."""
    if not 256 - 64 < status < 256:
        return None
    try:
        name = signal.Signals(256 - status).name
    except ValueError:
        return None
    why = " (the system kills the largest process when memory runs out)" if name == "SIGKILL" else ""
    return f"error: a training rank was killed by {name}{why}; {VERBOSE_ENV}=1 shows DeepSpeed's launcher log"


def plan_warnings(cfg: TrainConfig, world: World) -> list[str]:
    """The plan's warnings (global batch, memory, LoRA targets), which a launch prints too."""
    try:
        return [line for line in plan_lines(cfg, world) if line.startswith("warning: ")]
    except Exception as e:  # a plan is advice: it never stops a launch
        return [f"warning: no plan ({type(e).__name__}: {e})"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=NCCL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", help="YAML recipe, e.g. config/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value settings passed to the trainer")
    p.add_argument(
        "--num-gpus",
        type=int,
        help=f"GPUs per node (default: all torch sees, those of ${VISIBLE_ENV} when set; 0 forces CPU)",
    )
    p.add_argument(
        "--include",
        help="the GPUs to use, in DeepSpeed's syntax, physical indices: localhost:4,5 on one node, "
        f"host-a:0,1@host-b:0 with --hostfile (a host alone: all its slots); overrides ${VISIBLE_ENV}",
    )
    p.add_argument(
        "--cpu-ranks",
        type=int,
        help="ranks when there is no GPU (default 2, or $CHATKIT_CPU_RANKS); given here, it also asks for "
        "CPU ranks on a machine with GPUs that torch cannot use",
    )
    p.add_argument("--hostfile", help="DeepSpeed hostfile for several nodes (run once per node)")
    p.add_argument("--node-rank", type=int, help="this node's rank, from 0 (required with --hostfile)")
    p.add_argument(
        "--master-addr", help="address of node 0, reachable from every node (required with --hostfile)"
    )
    p.add_argument(
        "--master-port",
        type=int,
        default=int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None,
        help=f"rendezvous port of node 0 (default $MASTER_PORT; else on one node a free port, so that runs "
        f"side by side do not collide, and with --hostfile {DEFAULT_MASTER_PORT}: every node must be given "
        "the same port, so give one; 0 picks a free one, one node only)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help=f"show DeepSpeed's launcher log (world info, spawned commands; also {VERBOSE_ENV}=1)",
    )
    p.add_argument(
        "--mode",
        choices=("auto", *launch_modes.MODES),
        default="auto",
        help="what starts the ranks: DeepSpeed's runner, torchrun, Slurm's srun or mpirun (default auto: "
        "slurm inside a Slurm allocation, torchrun where Kubeflow has set PET_NNODES, else deepspeed)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, plan and command (every mode's) only",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="run the recipe's tiny variant: tiny model of the same architecture, demo data, 4 steps",
    )
    args = p.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    args.cpu_ranks_given = args.cpu_ranks is not None
    if args.cpu_ranks is None:
        args.cpu_ranks = int(os.environ.get("CHATKIT_CPU_RANKS") or 2)
    if args.num_gpus is not None and args.num_gpus < 0:
        p.error("--num-gpus must be 0 or more")
    if args.cpu_ranks < 1:
        p.error("--cpu-ranks must be at least 1")
    mode, why = launch_modes.choose(args.mode)
    args.port_given = args.master_port is not None  # srun's ranks derive one from the job id otherwise
    if args.master_port == 0 and args.hostfile:
        p.error("--master-port 0 works on one node only: every node must be given the same port")
    if args.master_port is None:
        args.master_port = DEFAULT_MASTER_PORT if args.hostfile else 0
    if args.master_port == 0:
        args.master_port = free_port()
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # DeepSpeed's launcher log, here and in the ranks

    world = launch_modes.world_for(mode, world_of(args))
    overrides = list(args.overrides)
    errors, unset = node_problems(args)
    errors += launch_modes.mode_problems(mode, args.include, args.hostfile)
    unset += launch_modes.missing_tools(mode)
    if args.include and args.num_gpus is not None:
        errors.append(
            "--include and --num-gpus: give one (DeepSpeed's runner refuses both; --include names the GPUs)"
        )
    errors += visible_problems(args, world)
    if problem := torch_problem(args, world, args.dry_run):
        unset.append(problem)
    early = [] if args.dry_run else unset  # refused before the config is read: a dry run's are warnings
    try:  # fail here, once, rather than in every rank after the launch
        if args.tiny:
            recipe, invalid, _ = read_config(args.recipe, overrides, check_files=False)
            if invalid:  # the variant is made from the recipe's settings: they must be usable first
                refuse([*errors, config_error(args.recipe, invalid), *early])
            overrides = tiny_overrides(recipe, args.recipe, world.per_node, world.gpu) + overrides
        cfg, invalid, unread = read_config(args.recipe, overrides, check_files=False)  # files: below
    except ConfigError as e:  # the recipe or an override could not be read at all
        refuse([*errors, str(e), *early])
    # Every problem at once: the settings', then the launch's (what a setting given a value that could
    # not be read, and so left at its default, would cause is not reported), then this node's and machine's.
    planned, missing = launch_problems(cfg, world, to_build=tiny_inputs(cfg))
    missing = [*unset, *missing]
    if invalid:
        errors.append(config_error(args.recipe, invalid))
    errors += [problem for problem in planned if problem.split(":")[0] not in unread]
    if args.dry_run:  # it plans without the weights and data: what this machine lacks is a warning
        for problem in missing:
            print(f"warning: {problem}; a launch here would stop on it", file=sys.stderr)
        missing = []
    if errors or missing:
        refuse([*errors, *missing])
    if not args.dry_run:  # the tiny bases and the demo data, when named and missing; then checked too
        ensure_tiny_inputs(cfg)
        if problems := sum(launch_problems(cfg, world), []):
            refuse(problems)
    shared = str(Path(cfg.output_dir).resolve()) if world.nodes > 1 else None
    cmd, env = build_command(args, overrides, shared)
    deepspeed_line = shown = command_line(cmd, env)
    spec = launch_modes.Spec(
        args.recipe, tuple(overrides), world, cfg.output_dir, args.master_port, args.port_given,
        args.master_addr, args.node_rank, shared,
    )  # fmt: skip
    if mode != "deepspeed":
        cmd, env = launch_modes.command(mode, spec)
        shown = launch_modes.command_line(cmd, env)
    if args.dry_run:
        print("# resolved config")
        print(yaml.safe_dump(asdict(cfg), sort_keys=False), end="")
        print("# plan")
        print("\n".join(plan_lines(cfg, world)))
        print("# launch mode")
        print(f"{mode} ({why})")
        print("# command")
        print(shown)
        print("# commands by launch mode")
        print("\n".join(launch_modes.commands_by_mode(spec, deepspeed_line)))
        return
    for line in plan_warnings(cfg, world):
        print(line, file=sys.stderr)
    tokenize_data(cfg)
    prebuild_cpu_adam(cfg, world.gpu)
    print(f"launch: mode {mode} ({why})", file=sys.stderr)  # once the ranks are about to start
    folder = launch_modes.launch_folder(mode, cfg.output_dir)  # where the ranks register (preemption)
    env[preemption.LAUNCH_DIR_ENV], env[preemption.GRACE_ENV] = str(folder), str(cfg.preempt_grace_s)
    try:
        status = run_group(cmd, env)
        stopped = preemption.stopped(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if stopped:
        print(resume_line(stopped, sys.argv[1:] if argv is None else argv), file=sys.stderr)
    if line := failure_line(status):
        print(line, file=sys.stderr)
    sys.exit(status)


def resume_line(stopped: dict, argv: list[str]) -> str:
    """What a launch that stopped on a preemption signal says: where the checkpoint is, how to go on."""
    again = [a for a in argv if not a.startswith("resume=")] + ["resume=auto"]
    return (
        f"launch: {stopped['signal']}: the run saved {stopped['checkpoint']} after step {stopped['step']} and "
        f"stopped; to continue: python -m chatkit.launch {shlex.join(again)}"
    )


if __name__ == "__main__":
    main()
