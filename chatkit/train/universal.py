"""Resume a checkpoint at another layout: another number of ranks, another ZeRO stage, another pipeline.

DeepSpeed's own checkpoints hold each rank's partition of the weights and the optimizer, so they load
only at the layout that wrote them ("The checkpoint being loaded used a DP world size of 2 but the
current world size is 3"). DeepSpeed's universal checkpoint is the layout-free form: one folder per
parameter with its fp32 weights and Adam moments (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`), which
any ZeRO stage 1-3 engine at any world size slices its partition from (`load_universal` in the
DeepSpeed config). chatkit records each checkpoint's layout in its `chatkit.json`; a resume at another
layout converts the checkpoint once, with DeepSpeed's `ds_to_universal`, into `stepN/universal/`, and
loads that. The data position needs no conversion: a step's rows depend only on the global batch
(chatkit.data.Batches.stream), which a resume must keep (checkpoint.check_data_position).

The conversion runs in a child process on rank 0 while the other ranks wait for its folder outside
any collective (a 20B checkpoint takes minutes; a barrier would trip the hang doctor). DeepSpeed reads
checkpoint files with `weights_only=False`; the child and the universal load read them through
`load_weights_only`, so a tampered checkpoint runs no code here either, and the universal folder gets a
manifest of its own, checked before every load.

Pipeline checkpoints (ZeRO stage 0: the optimizer is not partitioned, and DeepSpeed's conversion needs
partitioned optimizer files) and ZeRO-0 runs are converted by chatkit itself into the same format
(`pipeline_to_universal`), with parameter names mapped to the model's own, so a pipeline run resumes
on fewer stages or without a pipeline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from chatkit.io import atomic_open, read_meta
from chatkit.train.context import RunError
from chatkit.train.manifest import check_manifest, write_manifest

FOLDER = "universal"
"""The converted checkpoint, inside the checkpoint it was made from (pruned with it)."""
READY = ".universal-ready"
"""Rank 0's answer, in the checkpoint, for the ranks waiting on the conversion: its token, and
the one-line reason when it failed."""
POLL_S = 0.5


def layout_of(engine, dp_world: int) -> dict[str, int]:
    """What a DeepSpeed checkpoint's files depend on: ranks, pipeline stages, ZeRO stage."""
    import torch.distributed as dist

    world = dist.get_world_size()
    return {
        "world": world,
        "data_parallel": dp_world,
        "pipeline_stages": world // dp_world,
        "zero_stage": int(engine.zero_optimization_stage()),
    }


def describe(layout: dict[str, int]) -> str:
    stages = layout["pipeline_stages"]
    pipe = f"{stages} pipeline stages x " if stages > 1 else ""
    return f"{pipe}{layout['data_parallel']} data-parallel rank(s), ZeRO-{layout['zero_stage']}"


def saved_layout(folder: Path) -> dict[str, int] | None:
    """The layout a checkpoint was saved at; None for one saved before layouts were recorded."""
    return read_meta(folder).get("layout")


def cannot_resume(saved: dict[str, int], now: dict[str, int]) -> str | None:
    """Why a checkpoint saved at `saved` cannot continue at `now`, in one line; None when it can."""
    if now["zero_stage"] == 0 and now["pipeline_stages"] == 1:
        return (
            f"it was saved at {describe(saved)} and this run is ZeRO-0 ({describe(now)}): DeepSpeed loads a "
            "checkpoint at another layout into ZeRO stages 1-3 only; resume with deepspeed=zero2 or zero3"
        )
    if now["pipeline_stages"] > 1:
        return (
            f"it was saved at {describe(saved)} and this run is a pipeline ({describe(now)}): a pipeline "
            f"resumes only at the layout it was saved at; resume with pipeline_stages={saved['pipeline_stages']} "
            f"on {saved['world']} ranks, or without a pipeline (deepspeed=zero2 or zero3)"
        )
    return None


def ensure_universal(folder: Path, rank: int, pipeline: bool) -> Path:
    """`folder/universal`, converted (or, when there, verified) by rank 0; every rank returns once it is
    ready, or raises rank 0's error.

    The other ranks poll for rank 0's answer instead of waiting in a collective, as ranks waiting for
    tokenization do (chatkit.train.data): a conversion can outlast any collective timeout. The answer
    file carries a token rank 0 sends first, so no rank takes an earlier attempt's answer."""
    import secrets

    import torch.distributed as dist

    out = folder / FOLDER
    token = [secrets.token_hex(8)]
    dist.broadcast_object_list(token, src=0)
    answer = folder / READY
    if rank == 0:
        try:
            if not _complete(out):
                convert(folder, out, pipeline)
        except RunError as e:
            _write_answer(answer, f"{token[0]} {e}")
            raise RunError(str(e), all_ranks=True) from None
        _write_answer(answer, token[0])
        return out
    while True:
        with contextlib.suppress(OSError):
            text = answer.read_text(encoding="utf-8")
            if text.startswith(token[0]):
                if text.strip() == token[0]:
                    return out
                raise RunError(text[len(token[0]) :].strip(), all_ranks=True)
        time.sleep(POLL_S)


def _write_answer(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def _complete(out: Path) -> bool:
    """Whether `out` is a whole conversion: its manifest, written last, matches every file."""
    return (out / "manifest.json").is_file() and check_manifest(out) is None


def convert(folder: Path, out: Path, pipeline: bool) -> None:
    """Write the universal form of checkpoint `folder` into `out` (atomically: a temporary folder,
    renamed when complete), in a child process; a failure is a RunError with the child's last line."""
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # an incomplete one (its manifest failed)
    logger.info(f"resume: converting {folder} to a universal checkpoint (once) for the new layout")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "chatkit.train.universal", str(folder), str(tmp)]
    if pipeline:
        cmd.append("--pipeline")
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [line for line in (r.stderr or r.stdout).strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit status {r.returncode}"
        raise RunError(f"resume: converting {folder} to a universal checkpoint failed: {why}")
    write_manifest(tmp)
    os.replace(tmp, out)
    logger.info(f"resume: universal checkpoint {out} written in {time.perf_counter() - start:.1f}s")


def _under_both_names(folder: Path) -> None:
    """The run's state (step, scheduler, client state) under the name each kind of engine reads.

    A universal load reads it from `zero_pp_rank_0_mp_rank_XX_model_states.pt` under ZeRO-3 and from
    `mp_rank_XX_model_states.pt` otherwise (DeepSpeedEngine._get_ckpt_name), and ds_to_universal keeps
    the source's names: a ZeRO-3 checkpoint resumed under ZeRO-2 would find none."""
    for zero3 in sorted(folder.glob("zero_pp_rank_0_mp_rank_*_model_states.pt")):
        plain = folder / zero3.name.removeprefix("zero_pp_rank_0_")
        if not plain.exists():
            shutil.copyfile(zero3, plain)
    for plain in sorted(folder.glob("mp_rank_*_model_states.pt")):
        zero3 = folder / f"zero_pp_rank_0_{plain.name}"
        if not zero3.exists():
            shutil.copyfile(plain, zero3)


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Every `torch.load` DeepSpeed makes inside the block goes through `load_weights_only` (weights
    only, DeepSpeed's own classes allowed by name): its universal-checkpoint code reads with
    weights_only=False."""
    from chatkit.convert.safe import load_weights_only

    real = torch.load

    def load(f: Any, map_location: Any = None, *args: Any, mmap: bool | None = None, **kwargs: Any) -> Any:
        return load_weights_only(f, map_location=map_location or "cpu", mmap=bool(mmap))

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real  # type: ignore[assignment]


def load(engine, root: Path, tag: str, rank: int, pipeline_saved: bool) -> dict[str, Any]:
    """Load checkpoint `root/tag` into `engine` through its universal form; returns its client state.

    DeepSpeed reads `load_universal` from its config at load time; the engine was built before the
    resume was chosen, so the flag is set on its config here, for this load only."""
    folder = ensure_universal(root / tag, rank, pipeline_saved)
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        with safe_torch_load():
            path, state = engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise RunError(f"resume: {folder} could not be loaded", all_ranks=True)
    return state


# --- the child process -------------------------------------------------------------------------------


def _deepspeed_convert(folder: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal (its command line's defaults, one worker: ranks are waiting anyway
    and the machine's cores are theirs) with its progress prints kept off the run's output."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(folder), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        sink = sys.stderr if os.environ.get("CHATKIT_VERBOSE") else stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(sink))
        ds_to_universal.main(args)


def _for_every_stage(folder: Path) -> None:
    """Make the optimizer's global state readable by the universal loaders of ZeRO-1/2 and of ZeRO-3.

    ds_to_universal writes `zero/optimizer_state.pt` in the source stage's shape: from ZeRO-3, the
    step inside `optimizer_state_dict` and no `ds_version` (ZeRO-1/2's loader asserts on it) nor
    per-parameter `step.pt` (which ZeRO-1/2's loader takes the Adam step from: without it Adam would
    restart its bias correction); from ZeRO-1/2, the reverse. Both shapes are written, from the same
    values, so a checkpoint of either stage resumes under the other."""
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM_GROUPS

    zero = folder / "zero"
    path = zero / "optimizer_state.pt"
    sd = torch.load(path)
    params = [p for p in sorted(zero.iterdir()) if p.is_dir()]
    if OPTIMIZER_STATE_DICT in sd:  # from ZeRO-3
        inner = sd[OPTIMIZER_STATE_DICT]
        step = inner["state"][0]["step"]
        sd.setdefault(PARAM_GROUPS, inner[PARAM_GROUPS])
    else:  # from ZeRO-1/2
        step = torch.load(next(p / "step.pt" for p in params if (p / "step.pt").is_file()))
        sd[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: sd[PARAM_GROUPS]}
    if not sd.get(DS_VERSION):
        states = sorted(folder.glob("*model_states.pt"))
        sd[DS_VERSION] = torch.load(states[0]).get(DS_VERSION) if states else None
        if not sd[DS_VERSION]:
            import deepspeed

            sd[DS_VERSION] = deepspeed.__version__
    shapes = _param_shapes(folder)
    for p in params:
        if not (p / "step.pt").is_file():
            torch.save(step, p / "step.pt")
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            state = torch.load(p / f"{key}.pt")
            if isinstance(state, torch.Tensor):  # ZeRO-3's flat tensor; ZeRO-1/2 read {"param": shaped}
                torch.save({"param": state.view(shapes[p.name])}, p / f"{key}.pt")
    torch.save(sd, path)
    _under_both_names(folder)


def _param_shapes(folder: Path) -> dict[str, torch.Size]:
    """Each parameter's shape, as DeepSpeed records it in every model-states file (`param_shapes`, one
    dict per parameter group)."""
    states = sorted(folder.glob("*model_states.pt"))
    groups = torch.load(states[0]).get("param_shapes") or [] if states else []
    groups = groups if isinstance(groups, list) else [groups]
    return {name: torch.Size(shape) for group in groups for name, shape in group.items()}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Convert a chatkit checkpoint to DeepSpeed's universal form.")
    p.add_argument("folder", type=Path, help="a checkpoint folder, checkpoints/stepN")
    p.add_argument("out", type=Path, help="where the universal checkpoint goes")
    p.add_argument("--pipeline", action="store_true", help="the checkpoint is a pipeline run's")
    args = p.parse_args(argv)
    import logging

    # DeepSpeed's log, errors only (as chatkit.train.distributed.quiet_deepspeed, which imports what
    # imports this module): its accelerator probe and loaders' info lines are not the user's
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    try:
        with safe_torch_load():
            if args.pipeline:
                from chatkit.train.pipeline_universal import pipeline_to_universal

                pipeline_to_universal(args.folder, args.out)
            else:
                _deepspeed_convert(args.folder, args.out)
            _for_every_stage(args.out)
    except Exception as e:  # the parent reports the last line
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
