"""The hang doctor: a collective that waits longer than collective_timeout_s ends the run, after every
rank has written its Python stack and the name of its last collective to stderr and to
output_dir/hangs/rank<N>.txt.

Why not torch's own timeout: on gloo it raises in the one rank that timed out, with a C++ message
naming no Python line; the rank that caused the hang (stuck in compute, in I/O, or in another
collective) says nothing. Here:

- `torch.distributed`'s collectives, and the `wait()` of their asynchronous handles, are wrapped so
  that each rank knows which collective it is in and since when (`start`; a few attribute writes per
  call, from the main thread only);
- a thread on every rank checks once a second; past the timeout it dumps all of its threads' stacks
  (faulthandler, which needs no lock the stuck thread may hold) and sets a key in the run's rendezvous
  store (torch's TCPStore, served by a thread of rank 0, reachable while every main thread is stuck);
- every rank's thread polls that key and, once set, dumps its own stack too: the rank that never
  entered the collective is the one whose stack matters most. Then each exits with status 1.

Test hook: CHATKIT_TEST_STALL_RANK=R and CHATKIT_TEST_STALL_STEP=N make rank R sleep for good at the
start of step N, before the step's first collective (tests/test_preflight.py; for tests only).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

POLL_S = 1.0
"""How often each rank's thread looks at its collective."""
STORE_QPS = 500
"""At most this many store reads a second from all ranks together: large worlds poll it less often."""
HANG_KEY = "chatkit/hang"
WAITING = " (waiting on its result)"
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "_all_gather_base", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "broadcast",
    "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
)  # fmt: skip


class _Track:
    """The main thread's place among collectives (written by the wrappers, read by the watch thread)."""

    name = ""  # the last collective entered
    since: float | None = None  # when the one in flight was entered; None between collectives
    ended = 0.0  # when the last one returned
    depth = 0  # collectives call each other (all_gather_object calls all_gather)
    where = "start-up"  # the loop's place: "step 12", "saving step 12", ...


TRACK = _Track()
_MAIN = threading.main_thread().ident
_active: Watchdog | None = None


def _tracked(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != _MAIN:
            return fn(*args, **kwargs)
        t = TRACK
        if t.depth == 0:
            t.name, t.since = name, time.monotonic()
        t.depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            t.depth -= 1
            if t.depth == 0:
                t.since, t.ended = None, time.monotonic()

    call.__chatkit_tracked__ = True
    return call


def _wait_tracked(fn: Callable) -> Callable:
    """An asynchronous collective's `wait()`: in flight again, under the name of the last one started."""

    @functools.wraps(fn)
    def wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = TRACK.name.removesuffix(WAITING) + WAITING
        return _tracked(name, fn)(self, *args, **kwargs)

    wait.__chatkit_tracked__ = True
    return wait


def track_collectives() -> None:
    """Wrap torch.distributed's collectives (both module names DeepSpeed calls them by), once."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    for module in (dist, distributed_c10d):
        for name in COLLECTIVES:
            fn = getattr(module, name, None)
            if fn is not None and not getattr(fn, "__chatkit_tracked__", False):
                setattr(module, name, _tracked(name, fn))
    work = distributed_c10d.Work
    if not getattr(work.wait, "__chatkit_tracked__", False):
        work.wait = _wait_tracked(work.wait)


def at(where: str) -> None:
    """Where the loop is, for the hang report ("step 12", "saving step 12")."""
    TRACK.where = where


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, world: int, out: Path):
        self.timeout_s, self.rank, self.out = timeout_s, rank, out
        self.store_poll_s = max(POLL_S, world / STORE_QPS)
        self._next_poll = 0.0
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="chatkit-watchdog", daemon=True)
        self._store: Any = None

    def start(self) -> None:
        track_collectives()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * POLL_S)

    def _connect(self) -> Any:
        """A client of the rendezvous store of its own (the main thread's may be in use), or None."""
        import torch.distributed as dist

        try:
            return dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                timeout=timedelta(seconds=10), wait_for_workers=False,
            )  # fmt: skip
        except (KeyError, ValueError, RuntimeError):
            return None  # no env:// rendezvous: each rank reports its own timeout only

    def _watch(self) -> None:
        self._store = self._connect()
        while not self._stop.wait(POLL_S):
            since = TRACK.since
            if since is not None and time.monotonic() - since > self.timeout_s:
                why = f"{TRACK.name} has not completed after {self.timeout_s:.0f} s"
                self._report(f"rank {self.rank} ({self.host}): {why}", first=True)
            if news := self._news():
                self._report(news, first=False)

    def _news(self) -> str | None:
        """What another rank posted about a hang, if it did."""
        if self._store is None or time.monotonic() < self._next_poll:
            return None
        self._next_poll = time.monotonic() + self.store_poll_s
        try:
            if self._store.check([HANG_KEY]):
                return self._store.get(HANG_KEY).decode()
        except RuntimeError:  # the store is gone (rank 0 left): the run is over, not hung
            self._store = None
        return None

    def _report(self, cause: str, first: bool) -> None:
        """Post the cause (the first rank to find the hang), write this rank's stack, and exit 1."""
        if first and self._store is not None:
            with contextlib.suppress(RuntimeError):
                self._store.set(HANG_KEY, cause)
        head = hang_report(self.rank, self.host, cause, time.monotonic())
        stacks = _stacks()
        text = head + "\n" + stacks
        os.write(sys.stderr.fileno(), b"\n")  # off the line a progress bar may have left open
        for line in text.splitlines():  # one write a line: other ranks' lines interleave, never mix
            os.write(sys.stderr.fileno(), f"[rank {self.rank}] {line}\n".encode(errors="replace"))
        with contextlib.suppress(OSError):
            (self.out / "hangs").mkdir(parents=True, exist_ok=True)
            (self.out / "hangs" / f"rank{self.rank}.txt").write_text(text)
        time.sleep(2 * self.store_poll_s + 1)  # rank 0 serves the store the others read the news from
        os._exit(1)


def hang_report(rank: int, host: str, cause: str, now: float) -> str:
    """The first line of a rank's hang report: the cause, where the loop is, the last collective."""
    t = TRACK
    if t.since is not None:
        last = f"in {t.name} for {now - t.since:.0f} s"
    elif t.name:
        last = f"not in a collective; the last, {t.name}, returned {now - t.ended:.0f} s ago"
    else:
        last = "no collective yet"
    return (
        f"error: hang: {cause}. Rank {rank} ({host}) at {t.where}: {last}. "
        f"Its Python stack (every thread) follows; the run stops"
    )


def _stacks() -> str:
    """Every thread's Python stack, by faulthandler (into a real file: it writes to a descriptor)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


def start(timeout_s: float, rank: int, world: int, out: Path) -> None:
    """Watch this rank's collectives for the rest of the process (timeout_s 0: not at all)."""
    global _active
    if timeout_s > 0 and _active is None:
        _active = Watchdog(timeout_s, rank, world, out)
        _active.start()


def stop() -> None:
    """Stop watching (before leaving the process group: its end is not a hang)."""
    global _active
    if _active is not None:
        _active.stop()
        _active = None


def stall_for_tests(step: int, rank: int) -> None:
    """The test hook (module docstring): sleep for good on rank CHATKIT_TEST_STALL_RANK at step
    CHATKIT_TEST_STALL_STEP."""
    if os.environ.get("CHATKIT_TEST_STALL_STEP") == str(step) and os.environ.get(
        "CHATKIT_TEST_STALL_RANK"
    ) == str(rank):
        while True:
            time.sleep(3600)
