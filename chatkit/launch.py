"""Start training/train.py under the DeepSpeed launcher on whatever this machine has.

GPUs when torch sees them, otherwise CPU ranks (DS_ACCELERATOR=cpu, gloo); never a hard-coded count.
Several nodes go through DeepSpeed's hostfile. `--dry-run` prints the resolved config, the plan (world
size, batch, memory per GPU; chatkit/plan.py) and the exact command instead of running it. `--tiny`
runs the recipe's tiny variant: the same recipe on the tiny model of the same architecture and the
demo data, for a few steps, so every recipe can be tried on a laptop.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from chatkit.architectures import ARCHITECTURES
from chatkit.config import ConfigError, TrainConfig, load_config
from chatkit.plan import World, base_config, ds_preset, plan_lines

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"


def count_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


DEMO_TRAIN = "data/demo/files/train.jsonl"


def gpus_per_node(args: argparse.Namespace) -> int:
    return count_gpus() if args.num_gpus is None else args.num_gpus


def world_of(args: argparse.Namespace) -> World:
    """Ranks the launch will start: GPUs (or CPU ranks) per node x the hostfile's nodes and slots."""
    gpus = gpus_per_node(args)
    per_node = gpus or args.cpu_ranks
    if not args.hostfile:
        return World(per_node, 1, per_node, gpus > 0)
    try:  # DeepSpeed's hostfile: `host slots=N` a line
        hosts = [
            ln.split() for ln in Path(args.hostfile).read_text().splitlines() if ln.split() and ln[0] != "#"
        ]
        slots = [int(h[1].partition("=")[2]) if len(h) > 1 else per_node for h in hosts]
        return World(sum(slots), len(slots), slots[0], gpus > 0)
    except (OSError, ValueError, IndexError):
        return World(per_node, 1, per_node, gpus > 0)


def _divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def tiny_overrides(cfg: TrainConfig, recipe: str, ranks: int, gpu: bool) -> list[str]:
    """Overrides that turn a recipe into its tiny variant; everything else (template, LoRA, QLoRA,
    ZeRO stage, pipeline) stays as the recipe has it, so the variant exercises the same code."""
    base = base_config(cfg.model)  # the registry entry's family, else the folder's config.json's
    arch = ARCHITECTURES.get(base["model_type"] if base else "", ARCHITECTURES["gpt_neox"])
    tiny = arch.tiny
    out = [
        f"model=pretrained/{tiny}/model", f"train_files=[{DEMO_TRAIN}]", "val_files=[]", "eval_prompts=[]",
        f"output_dir=outputs/{Path(recipe).stem}-tiny", "max_steps=4", f"max_length={min(cfg.max_length, 256)}",
        "micro_batch_size=2", f"gradient_accumulation_steps={min(cfg.gradient_accumulation_steps, 2)}",
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


def ensure_tiny_inputs(cfg: TrainConfig) -> None:
    """Write the demo data and build the tiny base the tiny variant uses, when they are missing."""
    if DEMO_TRAIN in cfg.train_files and not Path(DEMO_TRAIN).is_file():
        from chatkit.conversation import write_conversations
        from chatkit.datasets.synthetic import make_splits

        train, heldout = make_splits(20000, 100)  # data/demo/prepare.py's defaults
        write_conversations(DEMO_TRAIN, train)
        write_conversations(Path(DEMO_TRAIN).with_name("heldout.jsonl"), heldout)
        print(f"wrote the demo data to {Path(DEMO_TRAIN).parent}/", file=sys.stderr)
    for arch in ARCHITECTURES.values():
        path = f"pretrained/{arch.tiny}/model"
        if cfg.model == path and not Path(path, "config.json").is_file():
            from chatkit.pretrained import prepare_tiny

            n = prepare_tiny([DEMO_TRAIN], path, arch=arch.model_type)
            print(f"built the tiny {arch.model_type} base ({n:,} parameters) in {path}", file=sys.stderr)


def free_port() -> int:
    """A TCP port the OS says is free now, for `--master-port 0` (parallel or repeated launches)."""
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


def build_command(
    args: argparse.Namespace, overrides: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    gpus = gpus_per_node(args)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
        # One thread per rank by default: ranks share the cores instead of fighting over them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.cpu_ranks)))
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile, "--no_ssh", "--node_rank", str(args.node_rank)]
        cmd += ["--master_addr", args.master_addr]
    else:
        cmd += ["--num_gpus", str(gpus or args.cpu_ranks)]
    cmd += ["--master_port", str(args.master_port)]
    cmd += [str(TRAIN_SCRIPT), "--config", args.recipe, *(args.overrides if overrides is None else overrides)]
    return cmd, env


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe, e.g. config/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value settings passed to the trainer")
    p.add_argument("--num-gpus", type=int, help="GPUs per node (default: all torch sees; 0 forces CPU)")
    p.add_argument(
        "--cpu-ranks",
        type=int,
        default=int(os.environ.get("CHATKIT_CPU_RANKS", 2)),
        help="ranks when there is no GPU (default 2, or $CHATKIT_CPU_RANKS)",
    )
    p.add_argument("--hostfile", help="DeepSpeed hostfile for several nodes (run once per node)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (with --hostfile)")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (with --hostfile)")
    p.add_argument(
        "--master-port",
        type=int,
        default=int(os.environ.get("MASTER_PORT", 29500)),
        help="rendezvous port of node 0 (default 29500 or $MASTER_PORT; 0 picks a free one, single node)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, plan and command only")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="run the recipe's tiny variant: tiny model of the same architecture, demo data, 4 steps",
    )
    args = p.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    if args.master_port == 0:
        if args.hostfile:
            p.error("--master-port 0 works on one node only: every node must be given the same port")
        args.master_port = free_port()

    world = world_of(args)
    overrides = list(args.overrides)
    try:  # fail here, once, rather than in every rank after the launch
        if args.tiny:
            recipe = load_config(args.recipe, overrides, check_files=False)
            overrides = tiny_overrides(recipe, args.recipe, world.per_node, world.gpu) + overrides
            if not args.dry_run:
                ensure_tiny_inputs(load_config(args.recipe, overrides, check_files=False))
        cfg = load_config(args.recipe, overrides, check_files=not args.dry_run)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    cmd, env = build_command(args, overrides)
    if args.dry_run:
        print("# resolved config")
        print(yaml.safe_dump(asdict(cfg), sort_keys=False), end="")
        print("# plan")
        print("\n".join(plan_lines(cfg, world)))
        extra = {k: env[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS") if k in env}
        print("# command")
        print(" ".join([*(f"{k}={v}" for k, v in extra.items()), *map(shlex.quote, cmd)]))
        return
    prebuild_cpu_adam(cfg, world.gpu)
    sys.exit(subprocess.call(cmd, env=env, cwd=os.getcwd()))


if __name__ == "__main__":
    main()
