"""Checkpoints that survive crashes, with retention and `resume=auto`.

A checkpoint is written under a temporary tag, then renamed to `stepN` and only then recorded in
`latest` (itself replaced atomically): a crash at any point leaves `latest` on the previous complete
checkpoint. Resuming restores weights, optimizer, scheduler, random state and the position in the
data stream, so an interrupted run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from chatkit.config import TrainConfig, save_config
from chatkit.convert.safe import load_weights_only
from chatkit.io import atomic_open, write_json

STEP_DIR = re.compile(r"^step(\d+)$")


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def find_resume(cfg: TrainConfig) -> tuple[Path, str] | None:
    """(root, tag) to resume from, or None to start fresh."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        root = checkpoint_root(cfg)
        latest = root / "latest"
        return (root, latest.read_text().strip()) if latest.is_file() else None
    path = Path(cfg.resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir():
        return path.parent, path.name
    raise FileNotFoundError(f"resume: no checkpoint at {cfg.resume!r}")


def _fault(point: str, step: int) -> None:
    """Fault injection for tests: CHATKIT_FAULT=<point>:<step> kills this process with SIGKILL there."""
    if os.environ.get("CHATKIT_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), 9)


def save(
    engine,
    cfg: TrainConfig,
    tokenizer,
    step: int,
    rank: int,
    extra: dict[str, Any],
    model_config=None,
    meta=None,
) -> Path:
    """Write `checkpoints/stepN` (DeepSpeed shards plus what export and chat need) atomically.

    `model_config` is needed when the engine's module is not a transformers model (a PipelineModule).
    """
    import torch.distributed as dist

    root = checkpoint_root(cfg)
    tmp, final = f".tmp-step{step}", f"step{step}"
    if rank == 0:
        shutil.rmtree(root / tmp, ignore_errors=True)  # left by a crash during an earlier save
        (root / tmp).mkdir(parents=True)
        tokenizer.save_pretrained(root / tmp)
        (model_config or _model_config(engine.module)).save_pretrained(root / tmp)
        info = {"template": cfg.template, "base_model": cfg.model, "step": step, **(meta or {})}
        write_json(root / tmp / "chatkit.json", info)
        save_config(cfg, root / tmp / "train_config.yaml")
    dist.barrier()
    state = {"step": step, "torch_rng": torch.get_rng_state(), **extra}
    engine.save_checkpoint(str(root), tag=tmp, client_state=state, save_latest=False)
    (root / tmp).mkdir(parents=True, exist_ok=True)  # ranks that wrote no DeepSpeed file, on other nodes
    torch.save(rng_state(), rng_file(root / tmp, dist.get_rank()))
    save_adapter(engine.module, root / tmp, rank)
    dist.barrier()
    _fault("save", step)
    if rank == 0:
        if (root / final).exists():
            shutil.rmtree(root / final)
        os.replace(root / tmp, root / final)
        with atomic_open(root / "latest") as f:
            f.write(final)
        prune(root, cfg.keep_checkpoints)
    dist.barrier()
    return root / final


def _model_config(module):
    """The transformers config of a plain or PEFT-wrapped model."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return base.config


def save_adapter(module, folder: Path, rank: int) -> None:
    """LoRA runs also get `adapter_model.safetensors` (PEFT's format); a collective under ZeRO-3."""
    if not hasattr(module, "peft_config"):
        return
    import deepspeed
    from peft import get_peft_model_state_dict

    trainable = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable):
        state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}
    if rank == 0:
        module.save_pretrained(folder, state_dict=state, safe_serialization=True)


def prune(root: Path, keep: int) -> None:
    """Delete the oldest `stepN` folders beyond `keep` (0 keeps all); never the one `latest` names."""
    if keep <= 0:
        return
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, path in steps[: max(0, len(steps) - keep)]:
        if path.name != latest:
            shutil.rmtree(path)
            logger.info(f"removed old checkpoint {path} (keep_checkpoints={keep})")


# bitsandbytes saves a quantized weight's state next to it (4-bit: absmax, quant_map, ...; 8-bit: SCB,
# weight_format). The resumed run quantized the same frozen base the same way, so it holds that state.
QUANT_STATE_KEY = re.compile(
    r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$|\.(SCB|weight_format)$"
)


def _load_quantized_module(src: dict[str, Any], dst: torch.nn.Module) -> None:
    """A strict load that accepts only bitsandbytes' quantization state as extra keys."""
    result = dst.load_state_dict(src, strict=False)
    extra = [k for k in result.unexpected_keys if not QUANT_STATE_KEY.search(k)]
    if result.missing_keys or extra:
        raise RuntimeError(
            f"the checkpoint does not match the model: missing {result.missing_keys[:5]}, unexpected {extra[:5]}"
        )


def load(engine, root: Path, tag: str, quantized: bool = False) -> dict[str, Any]:
    """Restore a checkpoint into the engine; returns its client state (step, data position, ...).

    DeepSpeed's checkpoint engine reads its files with `weights_only=False`, so a tampered checkpoint
    could run code on resume; every file this engine reads goes through `load_weights_only` instead.
    A quantized base (QLoRA) is loaded strictly except for bitsandbytes' quantization state.
    """
    engine.checkpoint_engine.load = load_weights_only
    path, state = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        custom_load_fn=_load_quantized_module if quantized else None,
    )
    if path is None:
        raise FileNotFoundError(f"resume: {root / tag} could not be loaded")
    import torch.distributed as dist

    mine = rng_file(root / tag, dist.get_rank())
    if mine.is_file():
        set_rng_state(load_weights_only(mine))
    else:  # saved by a run with fewer ranks: dropout masks will differ from an uninterrupted run
        logger.warning(f"resume: no {mine.name} in {root / tag}; using rank 0's random state")
        torch.set_rng_state(state["torch_rng"])
    return state


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_rank{rank}.pt"


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's random state. Per rank: ranks see rows of different widths, so their dropout draws
    differ, and DeepSpeed keeps the client state of rank 0 only (ZeRO 0-2, pipeline)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
