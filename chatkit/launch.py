"""Start training/train.py under the DeepSpeed launcher on whatever this machine has.

GPUs when torch sees them, otherwise CPU ranks (DS_ACCELERATOR=cpu, gloo); never a hard-coded count.
Several nodes go through DeepSpeed's hostfile. `--dry-run` prints the resolved config and the exact
command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"


def count_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    gpus = count_gpus() if args.num_gpus is None else args.num_gpus
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
    cmd += [str(TRAIN_SCRIPT), "--config", args.recipe, *args.overrides]
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
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and command only")
    args = p.parse_intermixed_args(argv)  # flags and key=value overrides in any order

    from chatkit.config import ConfigError, load_config

    cmd, env = build_command(args)
    try:  # fail here, once, rather than in every rank after the launch
        cfg = load_config(args.recipe, args.overrides, check_files=not args.dry_run)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.dry_run:
        print("# resolved config")
        print(yaml.safe_dump(asdict(cfg), sort_keys=False), end="")
        extra = {k: env[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS") if k in env}
        print("# command")
        print(" ".join([*(f"{k}={v}" for k, v in extra.items()), *map(shlex.quote, cmd)]))
        return
    sys.exit(subprocess.call(cmd, env=env, cwd=os.getcwd()))


if __name__ == "__main__":
    main()
