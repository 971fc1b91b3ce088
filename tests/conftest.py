"""Shared pytest fixtures.

Tests never touch the user's caches: every test session gets its own
NEMO_RL_CACHE_DIR (and Megatron checkpoint cache) under pytest's tmp root.
"""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemo_rl_cache")
    old = {k: os.environ.get(k) for k in ("NEMO_RL_CACHE_DIR", "NRL_MEGATRON_CHECKPOINT_DIR")}
    os.environ["NEMO_RL_CACHE_DIR"] = str(root)
    os.environ.pop("NRL_MEGATRON_CHECKPOINT_DIR", None)
    yield root
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed (gloo, world size 1) + megatron-core model parallel state in this process."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_rl.models.megatron.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
