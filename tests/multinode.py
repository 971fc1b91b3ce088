"""A real multi-node Ray cluster on this host: a head and more nodes, each started by ``ray start``.

Each node is its own raylet with its own CPUs and object store, joined over
the head's GCS port exactly as on a cluster of machines (token authentication
included); only the host is shared. The
nodes are named ``node0``, ``node1``... (``ray start --node-name``), so tests
and error messages can tell them apart although they share an IP address.
``ray start --block`` keeps each node's processes under one parent, which
stopping it takes down: other Ray clusters on the host are left alone (unlike
``ray stop``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from nemo_rl.distributed.worker_process_group import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([RAY, "start", *args, "--block"], stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_for_nodes(address: str, names: Sequence[str], nodes: Sequence[subprocess.Popen], logs: Sequence[Path]):
    import ray

    deadline = time.monotonic() + 180
    ray.init(address=address, log_to_driver=False)
    try:
        while True:
            alive = {n["NodeName"] for n in ray.nodes() if n["Alive"]}
            if set(names) <= alive:
                return
            for node, log in zip(nodes, logs, strict=True):
                if node.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {node.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {sorted(alive)} of {list(names)} joined within 180 s; logs in {logs[0].parent}"
                )
            time.sleep(1)
    finally:
        ray.shutdown()


@contextmanager
def ray_nodes(cpus_per_node: Sequence[int], log_dir: Path) -> Iterator[str]:
    """A cluster of ``len(cpus_per_node)`` nodes offering those CPUs; yields its address with ``RAY_ADDRESS``
    and the cluster's token set in this process's environment (runs started here join it), and stops it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    # The nodes and every driver use this user's token file (~/.ray/auth_token, made by the first Ray that
    # needs one): a process keeps the token it first loaded, so a fresh token per cluster would lock out a
    # test process that had started a local Ray before.
    os.environ["RAY_AUTH_MODE"] = "token"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    names = [f"node{i}" for i in range(len(cpus_per_node))]
    logs = [log_dir / f"ray-{name}.log" for name in names]
    common = ["--disable-usage-stats", "--object-store-memory=500000000"]
    head = ["--head", f"--port={port}", "--include-dashboard=false", f"--num-cpus={cpus_per_node[0]}"]
    nodes = [_start_node([*head, "--node-name=node0", *common], logs[0], env)]
    try:
        for i, cpus in enumerate(cpus_per_node[1:], start=1):
            args = [f"--address={address}", f"--num-cpus={cpus}", f"--node-name={names[i]}", *common]
            nodes.append(_start_node(args, logs[i], env))
        _wait_for_nodes(address, names, nodes, logs)
        os.environ["RAY_ADDRESS"] = address
        yield address
    finally:
        for node in reversed(nodes):
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def nodes_alive(address: str) -> list[str]:
    """The names of the cluster's live nodes, asked from a fresh driver process (this one may hold a connection)."""
    code = (
        f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(json.dumps(sorted(n['NodeName'] for n in ray.nodes() if n['Alive'])))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
