"""Small builders shared by tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def gloo_loop_threads(pid: int | str = "self") -> int:
    """A process's gloo event-loop threads: each gloo TCP device runs one, named ``gloo_tcp_loop`` (read from /proc)."""
    tasks = f"/proc/{pid}/task"
    return sum(open(f"{tasks}/{tid}/comm").read().strip() == "gloo_tcp_loop" for tid in os.listdir(tasks))


def yarn_block(**changes) -> dict:
    """A complete, valid YaRN block (4x a 256-token window) with ``changes`` applied."""
    block = {
        "rope_type": "yarn",
        "rope_theta": 10000,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "truncate": True,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1,
        "mscale_all_dim": 0,
    }
    block.update(changes)
    return block


def tiny_qwen2_config(**changes):
    """A Qwen2 config small enough for per-test models (2 heads of 32, GQA, tied embeddings)."""
    from transformers import Qwen2Config

    fields = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }
    return Qwen2Config(**(fields | changes))


SFT_YAML = Path(__file__).resolve().parents[1] / "examples" / "configs" / "sft.yaml"

# Python code that makes Ray and vLLM unimportable (None in sys.modules fails the import): what a lone GPU
# machine lacks (tools/gpu_check.sh ships the rest as wheels). Run it before anything imports them.
WITHOUT_RAY_OR_VLLM = "import sys; sys.modules['ray'] = sys.modules['vllm'] = None"


def sft_config(*overrides: str):
    """The validated default SFT config with Hydra-style ``overrides``."""
    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_sft_config

    return validate_sft_config(resolve_config(load_config(SFT_YAML, list(overrides))))


@contextmanager
def local_ray(num_cpus: int, megatron_cache: Path) -> Iterator[None]:
    """A local Ray cluster advertising ``num_cpus`` (one per CPU worker) and an isolated conversion cache."""
    import ray

    from nemo_rl.distributed.ray_init import init_ray

    os.environ["NRL_MEGATRON_CHECKPOINT_DIR"] = str(megatron_cache)
    init_ray(num_cpus=num_cpus)
    try:
        yield
    finally:
        ray.shutdown()
        del os.environ["NRL_MEGATRON_CHECKPOINT_DIR"]


@contextmanager
def running_policy(policy_cfg, workers: int, seed: int = 0, **policy_kwargs: Any) -> Iterator[Any]:
    """A Policy of the tiny built-in model on ``workers`` workers, shut down afterwards."""
    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.policy.lm_policy import Policy

    cluster = RayVirtualCluster(workers)
    policy = Policy(cluster, policy_cfg, resolve_model_path("tiny-qwen2"), seed=seed, **policy_kwargs)
    try:
        yield policy
    finally:
        policy.shutdown()
        cluster.shutdown()


def streamed_hf_weights(policy, bucket_bytes: int = 64 * 1024) -> dict[str, Any]:
    """What a refit sends (``Policy.stream_hf_weights``, small buckets), fetched back here to be compared.

    Checks on the way that every bucket holds the tensors it names and that no tensor is sent twice.
    """
    import ray
    from safetensors.torch import load

    weights: dict[str, Any] = {}
    for bucket in policy.stream_hf_weights(bucket_bytes):
        tensors = load(ray.get(bucket.blob))
        assert set(tensors) == set(bucket.names) and not weights.keys() & tensors.keys()
        weights |= tensors
    return weights


def entry_main(script: str):
    """The ``main`` of ``examples/<script>.py`` (entry scripts are files, not package modules)."""
    return _script_main("examples", script)


def load_tool(script: str):
    """The ``main`` of ``tools/<script>.py``."""
    return _script_main("tools", script)


def _script_main(folder: str, script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(script, Path(__file__).resolve().parents[1] / folder / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def build_qwen2_100m(out_dir: Path) -> tuple[Path, int]:
    """A Qwen2 of ~100M parameters with the tiny model's tokenizer and window (nothing downloaded); its bytes."""
    from nemo_rl.models.tiny_model import build_tokenizer, save_initialized, tiny_qwen2_config

    tokenizer = build_tokenizer()
    config = tiny_qwen2_config(tokenizer, num_hidden_layers=9)
    config.update(
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 128,
        }
    )
    save_initialized(config, tokenizer, out_dir, seed=0)
    num_bytes = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return out_dir, num_bytes


@contextmanager
def refit_pair(model_dir: Path, megatron_cache: Path) -> Iterator[tuple[Any, Any]]:
    """A forward-only Megatron policy of ``model_dir`` (no optimizer state) and one vLLM engine of it: what a
    refit measurement moves weights between.

    The model's own window and one short sequence at a time keep the engine's
    start-up profiling small; the engine starts first, so vLLM's start-up
    overlaps the policy's checkpoint conversion.
    """
    import ray

    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
    from nemo_rl.models.generation.vllm_worker import VllmGenerationWorker
    from nemo_rl.models.policy.lm_policy import Policy

    cfg = sft_config(
        f"policy.model_name={model_dir}", "~policy.hf_config_overrides", "policy.max_total_sequence_length=256"
    )
    with local_ray(2, megatron_cache):
        engine = (
            ray.remote(VllmGenerationWorker)
            .options(num_cpus=0)
            .remote(cfg.policy, str(model_dir), {"max_num_seqs": 1, "max_num_batched_tokens": 256})
        )
        cluster = RayVirtualCluster(1)
        policy = Policy(cluster, cfg.policy, model_dir, seed=0, trainable=False)
        try:
            ray.get(engine.__ray_ready__.remote())
            yield policy, engine
        finally:
            ray.get(engine.shutdown.remote())
            ray.kill(engine)
            policy.shutdown()
            cluster.shutdown()
