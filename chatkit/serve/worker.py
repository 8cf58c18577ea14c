"""The generation worker: one thread runs one generation at a time, in arrival order.

The model is not safe to run from several threads at once, and interleaving two generations would
only slow both; a single queue also gives every client its own, unmixed answer. Pieces travel back
to the request's event loop through an asyncio queue, so the loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chatkit.chat import StreamInfo
from chatkit.serve.protocol import ApiError

_END = object()  # a job's last queue item

Run = Callable[..., Iterator[str]]
"""A generation, called on the worker thread as run(info=..., cancel=...): `ChatEngine.stream` or
`ChatEngine.complete` with everything else already bound."""


@dataclass
class Job:
    """One request's generation: its pieces (or its exception) arrive on `out`; `cancel` stops it."""

    run: Run
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    info: StreamInfo = field(default_factory=StreamInfo)

    def put(self, item: Any) -> None:
        """Hand an item to the request's event loop (called on the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancel.set()

    async def items(self) -> AsyncIterator[str | Exception]:
        """The pieces as they come, then the exception if generation failed."""
        try:
            while (item := await self.out.get()) is not _END:
                yield item
        finally:  # the client went away (or we are done): stop generating for it
            self.cancel.set()


class Worker:
    """One thread, one generation at a time, jobs in arrival order; at most `max_queue` waiting."""

    def __init__(self, max_queue: int = 64) -> None:
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.pending = 0
        self._count = threading.Lock()  # `pending` changes on both threads
        self.thread = threading.Thread(target=self._loop, name="chatkit-generation", daemon=True)
        self.thread.start()

    def start(self, run: Run) -> Job:
        """Queue a generation for the calling request, or refuse it with a 503 when `max_queue`
        already wait: a client told to retry later beats one left waiting without bound."""
        if self.pending >= self.max_queue:
            raise ApiError(503, f"the server is busy ({self.pending} requests waiting); retry later")
        job = Job(run, asyncio.get_running_loop())
        self.submit(job)
        return job

    def submit(self, job: Job) -> None:
        with self._count:
            self.pending += 1
        self.jobs.put(job)

    def close(self) -> None:
        """Let the thread end once the jobs already queued are done."""
        self.jobs.put(None)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if not job.cancel.is_set():
                    for piece in job.run(info=job.info, cancel=job.cancel):
                        job.put(piece)
            except Exception as e:  # reported to that request only; the server goes on
                job.put(e)
            finally:
                with self._count:
                    self.pending -= 1
                job.put(_END)
