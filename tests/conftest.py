"""Shared pytest fixtures.

Tests never touch the user's caches: every test session gets its own
NEMO_RL_CACHE_DIR (and Megatron checkpoint cache) under pytest's tmp root.
"""

from __future__ import annotations

import os

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


@pytest.fixture
def megatron_single_process():
    """torch.distributed (gloo, world size 1) + megatron-core model parallel state in this process.

    Made by the first test that asks and kept for the ones after it; a test whose in-process policy
    worker made and ended a world of its own (``MegatronPolicyWorker.in_process``) leaves none, and
    the next test that asks gets a new one.
    """
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_rl.distributed.worker_process_group import free_port
    from nemo_rl.models.megatron.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1234)
