"""Ray actors known by role, rank, node and pid, so that a dead one stops the run by name.

When a worker process dies (OOM-killed, a segfault in a kernel, a node lost),
Ray reports "The actor died unexpectedly" with an actor id; a user needs which
part of the run it was (a policy worker, a vLLM engine, an environment), its
rank and its node. Its peers meanwhile may wait in a collective for it forever
(gloo's default timeout is 30 minutes), so results are collected as they
arrive and the first death raises at once, and a group with a dead member is
killed rather than asked to shut down.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from nemo_rl.distributed.virtual_cluster import alive_nodes
from nemo_rl.utils.errors import WorkerDied

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seat:
    """Where one actor of a group runs."""

    rank: int
    node: str
    pid: int


def _whereabouts(_actor_self: Any) -> tuple[str, int]:
    return ray.get_runtime_context().get_node_id(), os.getpid()


class ActorRoster:
    """The actors of one role (``policy worker``, ``vLLM engine``, ``math environment``), rank = list index."""

    def __init__(self, role: str, actors: Sequence[Any]):
        """Asks every actor where it runs; call it once their constructors have finished (``wait_until_ready``)."""
        self.role = role
        self.actors = list(actors)
        self.dead: Seat | None = None
        self.seats = [Seat(rank, "unknown", -1) for rank in range(len(self.actors))]
        whereabouts = self.get([actor.__ray_call__.remote(_whereabouts) for actor in self.actors])
        nodes = {node.node_id: node.describe() for node in alive_nodes()}
        self.seats = [
            Seat(rank, nodes.get(node_id, f"id {node_id[:8]}"), pid) for rank, (node_id, pid) in enumerate(whereabouts)
        ]
        logger.info("%s", self.describe())

    def describe(self) -> str:
        return f"{self.role}s: " + ", ".join(f"rank {s.rank} on node {s.node} (pid {s.pid})" for s in self.seats)

    def get(self, refs: Sequence[ray.ObjectRef], ranks: Iterable[int] | None = None) -> list[Any]:
        """``ray.get(refs)`` (``refs[i]`` a call on actor ``ranks[i]``, by default actor ``i``), raising
        ``WorkerDied`` as soon as one of those actors is dead, however long the others would wait."""
        rank_of = dict(zip(refs, range(len(refs)) if ranks is None else ranks, strict=True))
        results: dict[ray.ObjectRef, Any] = {}
        pending = list(refs)
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                results[ready] = ray.get(ready)
            except RayActorError as err:
                raise self._died(rank_of[ready], err) from None
        return [results[ref] for ref in refs]

    def explain(self, err: RayActorError) -> WorkerDied | None:
        """The named failure for ``err`` if the dead actor is one of this roster's (a death met outside ``get``)."""
        ids = [actor._actor_id.hex() for actor in self.actors]
        return self._died(ids.index(err.actor_id), err) if getattr(err, "actor_id", None) in ids else None

    def _died(self, rank: int, err: RayActorError) -> WorkerDied:
        seat = self.dead = self.seats[rank]
        return WorkerDied(
            f"{self.role} rank {seat.rank} on node {seat.node} (pid {seat.pid}) died ({_exit_detail(err)}). "
            "The run stopped; its last complete checkpoint is intact and the same command resumes from it. "
            "Why it died (a signal, the OOM killer, a crash) is in its own log: the lines above, or Ray's session "
            "logs on that node."
        )

    def kill_all(self) -> None:
        kill(self.actors)
        self.actors = []

    def shutdown(self, method: str = "shutdown", timeout_s: float = 60.0) -> None:
        """Ask each actor to release what it holds, then kill them all; with a dead member (whose peers may be
        stuck waiting for it) or after ``timeout_s`` without an answer, kill them at once."""
        try:
            if self.dead is None and self.actors:
                refs = [getattr(actor, method).remote() for actor in self.actors]
                _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
                if unfinished:
                    logger.warning(
                        "%d %s(s) did not shut down within %.0f s; killed", len(unfinished), self.role, timeout_s
                    )
                else:
                    self.get(refs)
        finally:
            self.kill_all()


def kill(actors: Sequence[Any], timeout_s: float = 30.0) -> None:
    """``ray.kill`` every actor, then return once Ray reports each one dead (warning after ``timeout_s``).

    ``ray.kill`` only sends the request: right after it returns the actor can still answer a call (5 times in
    30 on 2 CPU cores), and its process still holds its memory and its bundle. Whoever kills workers to say that
    none outlives a run's end or error waits here until a call on each fails with its death.
    """
    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + timeout_s
    for actor in actors:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=remaining)
            except RayActorError:
                break
            except GetTimeoutError:
                continue
            time.sleep(0.01)
        else:
            logger.warning("%d killed actor(s) not yet reported dead after %.0f s", len(actors), timeout_s)
            return


def _exit_detail(err: RayActorError) -> str:
    """Ray's words on how the process ended ("Worker exit type: ... exit detail: ..."), else its first line."""
    text = " ".join(str(err).split())
    start = text.find("Worker exit type")
    if start < 0:
        return text.split(". ")[0] or type(err).__name__
    end = text.find(". ", text.find("exit detail", start))
    return text[start : end if end > 0 else None]
