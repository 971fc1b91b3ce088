"""A function run in a worker process of its own, with a per-call time limit that a hung call cannot escape.

Some inputs make a scoring library compute for minutes or hours (math-verify
comparing ``9^{9^{8}}`` with a number evaluates the power: 91 s; ``9^{9^{9}}``
much longer). Signal-based limits, what math-verify ships, are SIGALRM
handlers that only the main thread may install (a threaded Ray actor or a
thread pool is not that thread) and that a computation inside one long C call
does not notice. A process can always be stopped: when a call overruns, its
worker is killed and a new one started. One worker serves every call, so its
start-up (importing the library) is paid once, not per call, and never counts
against a call's limit.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar

R = TypeVar("R")

# Importing a scoring library can take seconds on a busy machine (math-verify: ~2 s, sympy and antlr);
# a worker still not ready after this long is broken, not slow.
WORKER_START_TIMEOUT_S = 120.0
_READY = "ready"


class TimeLimitedWorker(Generic[R]):
    """``function(*args)`` in a spawned worker process; ``None`` when it gave no result within ``timeout_s``.

    ``function`` must be importable by name (a module-level function), as
    spawn requires. ``warm_up`` are arguments the worker calls it with once
    before it reports ready, so lazy imports and caches are not charged to the
    first real call's limit.
    """

    def __init__(self, function: Callable[..., R], timeout_s: float, warm_up: tuple[Any, ...] = ()):
        self.function, self.timeout_s, self.warm_up = function, timeout_s, warm_up
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy a Ray worker's threads and held locks
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_conn, self.function, self.warm_up), name="time-limited-worker", daemon=True
        )
        self._process.start()
        child_conn.close()
        self._ready = False

    def __call__(self, *args: Any) -> R | None:
        """The function's result, or None when the call overran the limit or its worker died during it.

        Either way the worker is replaced, so the next call is served (and timed) by a fresh one.
        """
        self._ensure_ready()
        try:
            self._conn.send(args)
            if self._conn.poll(self.timeout_s):
                return self._conn.recv()
        except (EOFError, OSError):  # the worker died mid-call (e.g. killed for its memory): no result either
            pass
        self._restart()
        return None

    def _ensure_ready(self) -> None:
        """Wait for the worker's start-up (not charged to any call); a worker found dead is replaced first."""
        if self._ready and not self._process.is_alive():
            self._restart()
        if self._ready:
            return
        try:
            if not self._conn.poll(WORKER_START_TIMEOUT_S):
                raise RuntimeError(f"{self._describe()} did not start within {WORKER_START_TIMEOUT_S:.0f} s")
            self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"{self._describe()} exited while starting (exit code {self._process.exitcode})"
            ) from None
        self._ready = True

    def _describe(self) -> str:
        return f"the worker process for {self.function.__module__}.{self.function.__qualname__}"

    def _restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        """Kill the worker (mid-call or idle) and wait until it is gone."""
        self._process.kill()
        self._process.join()
        self._conn.close()


def _serve(conn: Connection, function: Callable[..., Any], warm_up: tuple[Any, ...]) -> None:
    """The worker: ``function(*args)`` for every ``args`` received, until the parent closes the pipe."""
    _die_with_parent()
    if warm_up:
        function(*warm_up)
    conn.send(_READY)
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        conn.send(function(*args))


def _die_with_parent() -> None:
    """On Linux the kernel kills this worker when the thread that started it dies, even mid-call.

    A parent killed outright (``ray.kill`` of the actor, an OOM kill) runs no clean-up, and a worker
    stuck in a call never reads the closed pipe: without this it would compute on, orphaned, for hours.
    """
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
