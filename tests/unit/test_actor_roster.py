"""A dead actor stops a call at once, by role, rank, node and pid, while its peers would have waited.

Real Ray actors on a local cluster; the "peer in a collective" is an actor
sleeping far longer than the test allows, and the death is a SIGKILL of the
other actor's process, what the OOM killer does.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from nemo_rl.config.entry import run_entry
from nemo_rl.utils.errors import WorkerDied
from tests.helpers import SFT_YAML

pytestmark = pytest.mark.functional


class _Sleeper:
    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def two_actors():
    import ray

    from nemo_rl.distributed.actor_roster import ActorRoster
    from nemo_rl.distributed.ray_init import init_ray

    init_ray(num_cpus=2)
    try:
        actors = [ray.remote(_Sleeper).options(num_cpus=1).remote() for _ in range(2)]
        yield ActorRoster("test worker", actors)
    finally:
        ray.shutdown()


def test_roster_names_every_actor_and_collects_results_in_order(two_actors):
    import ray

    assert [s.rank for s in two_actors.seats] == [0, 1]
    node = ray.get_runtime_context().get_node_id()
    assert all(s.node.endswith(f"(id {node[:8]})") and s.pid > 0 for s in two_actors.seats)
    assert two_actors.describe().startswith("test workers: rank 0 on node ")
    refs = [a.nap.remote(s) for a, s in zip(two_actors.actors, [0.2, 0.0], strict=True)]
    assert two_actors.get(refs) == [0.2, 0.0]


def test_a_killed_actor_raises_at_once_by_name_and_the_group_is_killed(two_actors):
    import ray

    waiting, doomed = two_actors.actors
    refs = [waiting.nap.remote(600), doomed.nap.remote(600)]  # rank 0 would wait out the test
    time.sleep(1)
    os.kill(two_actors.seats[1].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDied) as died:
        two_actors.get(refs)
    assert time.monotonic() - start < 30
    message = str(died.value)
    seat = two_actors.seats[1]
    assert message.startswith(f"test worker rank 1 on node {seat.node} (pid {seat.pid}) died (Worker exit type")
    assert "resumes from it" in message and "\n" not in message
    start = time.monotonic()
    two_actors.shutdown()  # the dead member's peer is not asked (it may be stuck waiting): both are killed
    assert time.monotonic() - start < 5
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(waiting.nap.remote(0), timeout=60)


def test_an_entry_script_reports_a_dead_worker_in_one_line(capsys):
    def run(cfg, resolved) -> int:
        raise WorkerDied("policy worker rank 1 on node n2 (id 0123abcd) (pid 42) died (Worker exit type: SYSTEM_ERROR)")

    from nemo_rl.config.schema import validate_sft_config

    assert run_entry(["--config", str(SFT_YAML)], SFT_YAML, validate_sft_config, run) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "Run stopped: policy worker rank 1 on node n2 (id 0123abcd) (pid 42) died (Worker exit type: SYSTEM_ERROR)"
    ]


def test_a_node_too_small_for_its_workers_is_refused_at_once(two_actors):
    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster, alive_nodes
    from nemo_rl.utils.errors import ConfigError

    start = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"3 workers of \{'CPU': 1(\.0)?\} need 3 CPUs on one node, but Ray node .* has 2"
    ):
        RayVirtualCluster(3)
    assert time.monotonic() - start < 10  # not Ray's 300 s wait for a placement group that can never be placed
    (head,) = alive_nodes()
    assert head.is_head and head.cpus == 2


def test_killed_actors_are_reported_dead_when_kill_returns(two_actors):
    """``ray.kill`` alone returned with the actor still answering 5 times in 30; ``kill`` waits for the death."""
    import ray

    from nemo_rl.distributed.actor_roster import kill

    sleeper = ray.remote(_Sleeper).options(num_cpus=0)
    for _ in range(20):
        actor = sleeper.remote()
        ray.get(actor.nap.remote(0))
        kill([actor])
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=60)
    busy = sleeper.remote()
    busy.nap.remote(600)  # mid-task: a call queued behind it fails only with the death
    start = time.monotonic()
    kill([busy])
    assert time.monotonic() - start < 10
