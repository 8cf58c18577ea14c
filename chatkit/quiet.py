"""Keep dependencies' loader chatter and progress bars out of the user's terminal, errors kept.

    from chatkit.quiet import quiet_dependencies, no_progress_bars

    quiet_dependencies()        # once, before faiss / sentence-transformers / bitsandbytes are imported
    with no_progress_bars():    # transformers' progress bars off inside, as they were after
        model = SentenceTransformer(folder)

`quiet_dependencies()` is cheap (it imports none of them, it only configures the standard `logging`
loggers they use) and idempotent; chatkit.retrieval calls it when it is imported. What it quiets, and
why nothing that matters is lost:

- `faiss.loader` logs, at INFO, every instruction-set build it tries before the one that loads
  ("Loading faiss with AVX512 support.", "Could not load library with AVX512 support due to:
  ModuleNotFoundError(...)", ... "Successfully loaded faiss."): about ten lines that look like an
  install error wherever logging is configured at INFO (retrieval/build_index.py, the bot). Its level
  is raised to WARNING. When no build loads, faiss raises ImportError, which is untouched.
- `bitsandbytes.backends.cpu.ops` warns "Failed to load CPU gemm_4bit_forward from kernels-community:
  No module named 'kernels'" whenever bitsandbytes is imported on a CPU with AVX512-BF16 without the
  optional `kernels` package (peft imports it, and transformers imports peft while sentence-
  transformers loads; QLoRA imports it directly). bitsandbytes then uses its own CPU kernel. A filter
  drops that one message; every other bitsandbytes warning passes.
- `sentence_transformers` logs, at INFO, "Loading SentenceTransformer model from ..." and "Use
  pytorch device_name: cpu". Its level is raised to WARNING, unless a level was set on it already.

`no_progress_bars()` covers transformers' per-load "Loading weights" bar (a 22M-parameter encoder
loads in a blink; the bar is noise). Bars that measure work the user waits for stay: huggingface_hub's
download bars, and chatkit's own (embedding a corpus, indexing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_LOGGERS = ("faiss.loader", "sentence_transformers")
"""Loggers whose INFO chatter is hidden: their level goes to WARNING unless one was set already."""

DROPPED_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}
"""Logger name -> starts of the messages dropped from it (only these; the rest of it passes)."""


class DropMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_dependencies() -> None:
    """Quiet faiss's loader, bitsandbytes's missing-kernels notice and sentence-transformers' INFO
    lines (see the module's notes). Call it before those libraries are first imported; calling it
    again does nothing more."""
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    for name, prefixes in DROPPED_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off inside the block, and as they were after it.

    For loading small models (the "Loading weights" bar). The switch is process-wide, so a
    transformers bar that another thread shows meanwhile is hidden too."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
