"""The one loader of pickled weights: `torch.load(weights_only=True)`, so no code from a file ever runs.

Every reader of `.pt`/`.pth`/`.bin` files goes through here: DeepSpeed checkpoints (export and resume),
Meta's consolidated files, old `pytorch_model.bin` folders. The only non-tensor classes DeepSpeed
pickles into its checkpoints (the ZeRO stage, fp16 loss scalers, ZeRO-1/2 parameter slices) are
allow-listed by name; anything else in a file is refused by torch before it can run.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's classes found in its checkpoint files; none when DeepSpeed is not installed."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class UnsafeFileError(ValueError):
    """A pickled file that holds more than tensors (code, or objects of unknown classes): refused."""


def _refused(path: str | Path, e: pickle.UnpicklingError) -> UnsafeFileError:
    """torch's message ends advising weights_only=False, the one thing not to do with such a file."""
    # torch names the refused global in one of its message's lines ("Unsupported global: GLOBAL x.y",
    # or "Trying to load unsupported GLOBAL x.y whose module x is blocked"), depending on the case
    what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
    return UnsafeFileError(
        f"{path}: refused: the file holds pickled objects that are not tensors"
        f"{f' ({what})' if what else ''}, which could run code; nothing from it was run"
    )


_TORCH_LOAD = torch.load
"""torch's own loader, kept here: chatkit.train.universal routes DeepSpeed's `torch.load` calls
through `load_weights_only`, which must still reach torch's."""


def load_weights_only(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Read a pickled checkpoint file without running any code from it (DeepSpeed's own load signature).

    DeepSpeed is imported (slow, and chatty on some machines) only when a file names its classes.
    """
    try:
        return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "deepspeed" not in str(e):
            raise _refused(path, e) from None
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from None


def torch_load_safe(path: str | Path) -> Any:
    """`load_weights_only` with mmap, so a file is paged in as tensors are read, not all at once."""
    try:
        return load_weights_only(path, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be mmapped
        return load_weights_only(path)
