"""Checkpoints that survive crashes, with retention and `resume=auto`.

A checkpoint is written under a temporary tag, recorded in a manifest (each file's size and sha256),
renamed to `stepN` and only then recorded in `latest` (itself replaced atomically): a crash at any
point leaves `latest` on a complete checkpoint. Resuming verifies the manifest and falls back to the
newest complete checkpoint, saying why. Resuming restores weights, optimizer, scheduler, random state and the position in the
data stream, so an interrupted run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from chatkit.config import TrainConfig, save_config
from chatkit.convert.safe import UnsafeFileError, load_weights_only
from chatkit.io import atomic_open, read_meta, write_json
from chatkit.train import universal
from chatkit.train.context import RunError
from chatkit.train.manifest import MANIFEST, check_manifest, write_manifest

STEP_DIR = re.compile(r"^step(\d+)$")


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def find_resume(cfg: TrainConfig) -> tuple[Path, str] | None:
    """(root, tag) of the newest complete checkpoint to resume from, or None to start fresh.

    `resume=auto` and a checkpoints folder take the tag `latest` names when it is complete (every file
    as its manifest recorded), else the newest complete `stepN`, saying why; a tag folder given by
    path must be complete itself. No collectives: rank 0 decides (see `choose_resume`).
    """
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        root = checkpoint_root(cfg)
        return newest_complete(root) if root.is_dir() else None
    path = Path(cfg.resume)
    if (path / "latest").is_file() or _step_dirs(path):
        found = newest_complete(path)
        if found is None:
            raise RunError(f"resume: no checkpoint in {path}")
        return found
    if path.is_dir():
        problem = check_manifest(path)
        if problem:
            raise RunError(f"resume: checkpoint {path} is damaged: {problem}")
        return path.parent, path.name
    raise RunError(f"resume: no checkpoint at {cfg.resume!r}")


def _step_dirs(root: Path) -> list[Path]:
    """`stepN` folders, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def finish_interrupted_save(root: Path) -> None:
    """Complete a save that a crash cut short between its renames (see `publish`): a `.tmp-stepN`
    with a verified manifest becomes `stepN`; a `.replaced-stepN` goes back if `stepN` is gone."""
    for tmp in root.glob(".tmp-step*"):
        final = root / tmp.name.removeprefix(".tmp-")
        if not final.exists() and (tmp / MANIFEST).is_file() and check_manifest(tmp) is None:
            os.replace(tmp, final)
            logger.warning(f"resume: completed the interrupted save of {final.name}")
    for old in root.glob(".replaced-step*"):
        final = root / old.name.removeprefix(".replaced-")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def newest_complete(root: Path) -> tuple[Path, str] | None:
    """The tag `latest` names if it is complete, else the newest complete `stepN`; None if none exist."""
    finish_interrupted_save(root)
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else ""
    tags = ([latest] if latest else []) + [p.name for p in _step_dirs(root) if p.name != latest]
    problems = []
    for tag in tags:
        problem = check_manifest(root / tag)
        if problem is None:
            if problems:
                logger.warning(f"resume: {'; '.join(problems)}; resuming from {tag} instead")
            return root, tag
        problems.append(f"checkpoint {tag} is damaged: {problem}")
    if problems:
        raise RunError(f"resume: no complete checkpoint in {root}: {'; '.join(problems)}")
    return None


DATA_POSITION = ("max_length", "pack", "seed", "train_files")
"""Settings that fix which rows step N reads: a resume with other values would continue elsewhere.
With them, the global batch (micro_batch_size x gradient_accumulation_steps x data-parallel ranks):
step N reads the rows N*G..(N+1)*G of the epoch's plan whatever the split (chatkit.data.Batches), so
a resume on other ranks continues on the same rows when it keeps G."""


def data_position(cfg: TrainConfig, dp_world: int) -> dict[str, Any]:
    return {
        **{k: getattr(cfg, k) for k in DATA_POSITION},
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "data_parallel": dp_world,
        "global_batch": cfg.micro_batch_size * cfg.gradient_accumulation_steps * dp_world,
    }


def check_data_position(folder: Path, cfg: TrainConfig, dp_world: int) -> None:
    """Refuse a resume whose settings would read other rows than the interrupted run would have."""
    saved = read_meta(folder).get("data")
    if not saved:
        return  # saved before this was recorded
    now = data_position(cfg, dp_world)
    keys = [*DATA_POSITION, "global_batch"]
    if "global_batch" not in saved:  # saved before global batches were recorded: its split is known
        saved = {**saved, "global_batch": saved["micro_batch_size"] * saved["gradient_accumulation_steps"]
                 * saved["data_parallel"]}  # fmt: skip
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in keys if k in saved and saved[k] != now[k]]
    if changed:
        split = (
            f" (micro_batch_size {saved['micro_batch_size']} x gradient_accumulation_steps "
            f"{saved['gradient_accumulation_steps']} x {saved['data_parallel']} data-parallel rank(s) when "
            f"saved; now {now['micro_batch_size']} x {now['gradient_accumulation_steps']} x {dp_world})"
            if "global_batch" in [c.split()[0] for c in changed]
            else ""
        )
        raise RunError(
            f"resume: {folder.name} was saved with other data settings ({', '.join(changed)}){split}: the run "
            "would continue on other rows. Resume with the saved settings (on other ranks, choose "
            "micro_batch_size and gradient_accumulation_steps that keep the global batch), or start a new "
            "output_dir."
        )


def choose_resume(cfg: TrainConfig, rank: int, dp_world: int) -> tuple[Path, str] | None:
    """`find_resume` on rank 0, its answer (or its error) given to every rank: all resume alike."""
    import torch.distributed as dist

    answer: list[Any] = [None]
    if rank == 0:
        try:
            found = find_resume(cfg)
            if found:
                check_data_position(found[0] / found[1], cfg, dp_world)
            answer = [found]
        except RunError as e:
            answer = [str(e)]
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        raise RunError(answer[0], all_ranks=True)
    return answer[0]


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
    dp_world: int = 1,
    own_files: dict[str, Any] | None = None,
) -> Path:
    """Write `checkpoints/stepN` (DeepSpeed shards plus what export and chat need) atomically.

    `model_config` is needed when the engine's module is not a transformers model (a PipelineModule).
    `own_files`: JSON files this rank adds (a pipeline stage's parameter order, for a universal resume).
    """
    import torch.distributed as dist

    root = checkpoint_root(cfg)
    tmp, final = f".tmp-step{step}", f"step{step}"
    if rank == 0:
        shutil.rmtree(root / tmp, ignore_errors=True)  # left by a crash during an earlier save
        (root / tmp).mkdir(parents=True)
        tokenizer.save_pretrained(root / tmp)
        (model_config or _model_config(engine.module)).save_pretrained(root / tmp)
        info = {
            "template": cfg.template, "reasoning": cfg.reasoning, "base_model": cfg.model, "step": step,
            **(meta or {}),
        }  # fmt: skip
        if cfg.about:
            info["about"] = cfg.about
        info["data"] = data_position(cfg, dp_world)
        info["layout"] = universal.layout_of(engine, dp_world)
        write_json(root / tmp / "chatkit.json", info)
        save_config(cfg, root / tmp / "train_config.yaml")
    dist.barrier()
    state = {"step": step, "torch_rng": torch.get_rng_state(), **extra}
    try:
        engine.save_checkpoint(str(root), tag=tmp, client_state=state, save_latest=False)
        (root / tmp).mkdir(parents=True, exist_ok=True)  # ranks that wrote no DeepSpeed file, on other nodes
        torch.save(rng_state(), rng_file(root / tmp, dist.get_rank()))
        for name, value in (own_files or {}).items():
            write_json(root / tmp / name, value)
        save_adapter(engine.module, root / tmp, rank)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(root / tmp, ignore_errors=True)
        raise RunError(f"saving checkpoint {final} in {root} failed: {_why(root, e)}") from e
    dist.barrier()
    _fault("save", step)
    if rank == 0:
        _drop_unsafe_converters(root)
        write_manifest(root / tmp)
        publish(root, tmp, final, step)
        prune(root, cfg.keep_checkpoints)
    dist.barrier()
    return root / final


def _why(root: Path, e: BaseException) -> str:
    """A full disk as such: torch reports it as `basic_ios::clear: iostream error`."""
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if getattr(e, "errno", None) == errno.ENOSPC or free < 64 * 1024**2:
        return (
            f"no space left on device ({free / 1024**2:.0f} MiB free); the last complete checkpoint is kept"
        )
    return f"{e}; the last complete checkpoint is kept"


def _drop_unsafe_converters(root: Path) -> None:
    """DeepSpeed copies its zero_to_fp32.py beside every save; that script unpickles with
    weights_only=False (a tampered checkpoint runs code). tools/convert_to_hf.py reads them safely."""
    for name in ("zero_to_fp32.py", "zero_to_torch.py"):
        (root / name).unlink(missing_ok=True)


def publish(root: Path, tmp: str, final: str, step: int) -> None:
    """Rename the complete `tmp` to `final`, then point `latest` at it. `latest` never names a deleted
    folder: a checkpoint saved again (a resumed run re-saving a step) is moved aside, not deleted,
    until the new one is in place; a crash between the renames is completed at resume."""
    old = root / f".replaced-{final}"
    if (root / final).exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(root / final, old)
        _fault("replace", step)
    os.replace(root / tmp, root / final)
    with atomic_open(root / "latest") as f:
        f.write(final)
    shutil.rmtree(old, ignore_errors=True)


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


def load(engine, root: Path, tag: str, quantized: bool = False, dp_world: int = 1) -> dict[str, Any]:
    """Restore a checkpoint into the engine; returns its client state (step, data position, ...).

    DeepSpeed's checkpoint engine reads its files with `weights_only=False`, so a tampered checkpoint
    could run code on resume; every file this engine reads goes through `load_weights_only` instead.
    A quantized base (QLoRA) is loaded strictly except for bitsandbytes' quantization state. A
    checkpoint saved at another layout (ranks, ZeRO stage, pipeline stages) goes through its universal
    form (chatkit.train.universal), or is refused in one line before any step when it cannot.
    """
    import torch.distributed as dist

    saved, now = universal.saved_layout(root / tag), universal.layout_of(engine, dp_world)
    if saved is not None and saved != now:
        problem = universal.cannot_resume(saved, now)
        if problem is None and quantized:
            problem = "a QLoRA run resumes only at the layout it was saved at"
        if problem:
            raise RunError(f"resume: {tag} cannot continue here: {problem}", all_ranks=True)
        if dist.get_rank() == 0:
            logger.info(
                f"resume: {tag} was saved at {universal.describe(saved)}; continuing at {universal.describe(now)}"
            )
        state = universal.load(engine, root, tag, dist.get_rank(), saved["pipeline_stages"] > 1)
        _restore_rng(root / tag, state, dist.get_rank(), saved["world"])
        return state
    engine.checkpoint_engine.load = load_weights_only
    try:
        path, state = engine.load_checkpoint(
            str(root),
            tag=tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=_load_quantized_module if quantized else None,
        )
    except UnsafeFileError as e:
        raise RunError(f"resume: {e}") from None
    if path is None:
        raise FileNotFoundError(f"resume: {root / tag} could not be loaded")
    _restore_rng(root / tag, state, dist.get_rank(), dist.get_world_size())
    return state


def _restore_rng(folder: Path, state: dict[str, Any], rank: int, saved_world: int) -> None:
    """This rank's saved random state; at another world size, that of saved rank `rank % saved_world`
    (dropout masks then differ from an uninterrupted run's, which no other choice avoids)."""
    mine = rng_file(folder, rank % saved_world)
    if mine.is_file():
        set_rng_state(load_weights_only(mine))
    else:  # saved before random states were kept per rank
        logger.warning(f"resume: no {mine.name} in {folder}; using rank 0's random state")
        torch.set_rng_state(state["torch_rng"])


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
