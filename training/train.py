"""Fine-tune a chat model with DeepSpeed. Start it through the deepspeed launcher, e.g.

    training/finetune_tiny.sh                       # picks GPUs or CPU ranks for you
    deepspeed --num_gpus 2 training/train.py --config config/tiny.yaml max_steps=100 precision=bf16

Settings come from the YAML recipe, then `key=value` overrides (see chatkit/config.py for every field).
"""

import argparse
import os
import sys
import warnings

from chatkit.config import ConfigError, load_config
from chatkit.train.context import RunError
from chatkit.train.distributed import shutdown_distributed
from chatkit.train.preflight import BackendTimeout
from chatkit.train.run import train

# torch's gloo path warns on every collective DeepSpeed makes; the message is not actionable here.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
# PEFT's get_peft_model reads transformers' deprecated `is_gradient_checkpointing` on every LoRA run (chatkit
# enables checkpointing by its new name, chatkit.train.adapters.enable_checkpointing): not the user's to act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe in config/")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the recipe")
    p.add_argument(
        "--train-log-backend",
        help="loguru, wandb or loguru,wandb (OpenChatKit's flag; same as train_log_backend=...)",
    )
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args()
    try:
        extra = [f"train_log_backend={args.train_log_backend}"] if args.train_log_backend else []
        cfg = load_config(args.config, [*args.overrides, *extra])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    try:
        train(cfg)
    except RunError as e:
        if not e.all_ranks or int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, BackendTimeout):  # its all-reduce is still pending: teardown would wait on it
            os._exit(1)
        if e.all_ranks:  # every rank is here: leave the process group together
            shutdown_distributed()
        sys.exit(1)
    except RuntimeError as e:  # a collective whose peer is gone: that rank said why, above
        if not any(s in str(e) for s in ("closed by peer", "reset by peer")):
            raise
        print(
            f"error: rank {os.environ.get('RANK', '?')}: another rank stopped (its error is above)",
            file=sys.stderr,
        )
        sys.exit(1)
    shutdown_distributed()
    # Skip interpreter teardown once the run is complete and the group is left: C++ threads (gloo's,
    # DeepSpeed's) destroyed in whatever order Python's teardown picks now and then abort a rank
    # ("terminate called without an active exception", exit 250) after a run that finished and saved,
    # and the launcher would report the whole run as failed.
    from loguru import logger

    logger.remove()  # closes (and flushes) train.log
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
