"""GRPO and on-policy distillation as the 256k recipe runs them, in miniature: packing, CP2, YaRN at 4x.

The recipes put two policy workers at context parallelism 2 over packed rows
of 1024 tokens (4x the tiny model's 256-token window) and one vLLM engine on a
bundle of its own. Each rank holds one early and one late chunk of every
packed sample, so what is checked here is what that split could break:

* GRPO: the parity probe stays at 1.0 in every position bucket on every step
  (the log-prob passes of prompt + response rows under CP agree with vLLM, and
  every refit from the CP group landed), the loss is finite, the policy moves
  away from its reference, packing is reported, and sequences reach positions
  only YaRN covers;
* distillation: the teacher's top-k at CP2 equals transformers' (the check of
  ``test_distillation``), and the KL is finite in training (top-k fields split
  over CP with the packed rows) and in validation (``evaluate``).

The TP2 + sequence-parallel variant
(``grpo-tiny-qwen2-1n5cpu-megatron-yarn-4x-tp2sp-cp2-packed.yaml``) takes about
twice as long on two cores; ``test_recipes`` validates it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from nemo_rl.utils.logger import read_metrics
from tests.functional.test_distillation import train_checking_the_teacher
from tests.functional.test_grpo_math import _config
from tests.helpers import local_ray

pytestmark = [pytest.mark.functional, pytest.mark.slow]

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes" / "llm"
GRPO_RECIPE = RECIPES / "grpo-tiny-qwen2-1n3cpu-megatron-yarn-4x-cp2-packed.yaml"
DISTILLATION_RECIPE = RECIPES / "distillation-tiny-qwen2-1n3cpu-megatron-yarn-4x-cp2-packed.yaml"
BUNDLES = 3  # two policy workers and the engine's bundle
ORIGINAL_WINDOW = 256
PARITY_BOUND = 1.001  # float32 on both engines, as without CP: measured 1.0000002


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[None]:
    """One local Ray cluster and conversion cache for both runs: Ray's start and the student's conversion are
    a good share of a run this short."""
    with local_ray(BUNDLES, tmp_path_factory.mktemp("mcore")):
        yield


def assert_parity_packing_and_reach(train: list[dict]) -> None:
    """Every step matched vLLM in every position bucket, reported its packing; some sequence passed the window."""
    for m in train:
        parity = {k: v for k, v in m.items() if k.startswith("token_mult_prob_error")}
        assert all(1.0 <= v < PARITY_BOUND for v in parity.values()), parity
        assert 0.0 < m["packing_efficiency"] <= 1.0, m
    assert max(m["sequence_length_max"] for m in train) > ORIGINAL_WINDOW  # positions only YaRN covers


def test_grpo_cp2_packed_matches_vllm_every_step(tmp_path, ray_cluster):
    from nemo_rl.algorithms.grpo import run_grpo

    cfg, resolved = _config(
        GRPO_RECIPE, tmp_path / "run", "grpo.max_num_steps=3", "grpo.val_period=0", "checkpointing.enabled=false"
    )
    result = run_grpo(cfg, resolved)
    assert result.final_step == 3
    train = read_metrics(tmp_path / "run" / "logs", "train")
    assert [m["step"] for m in train] == [1, 2, 3]
    assert_parity_packing_and_reach(train)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in train), train
    assert train[1]["kl"] > 0  # the step-1 update reached every CP rank's tokens and the engine


def test_distillation_cp2_packed_teacher_topk_and_kl(tmp_path, ray_cluster):
    from nemo_rl.config.loader import load_config, resolve_config

    overrides = [
        f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard_enabled=false",
        "distillation.max_num_steps=2",
        "distillation.val_period=2",
        "checkpointing.enabled=false",
    ]
    resolved = resolve_config(load_config(DISTILLATION_RECIPE, overrides))
    result = train_checking_the_teacher(resolved)
    assert result.final_step == 2
    train = read_metrics(tmp_path / "logs", "train")
    assert [m["step"] for m in train] == [1, 2]
    assert_parity_packing_and_reach(train)
    assert all(math.isfinite(m["kl"]) and m["kl"] >= 0 for m in train), train
    (val,) = read_metrics(tmp_path / "logs", "validation")
    assert val["step"] == 2 and math.isfinite(val["kl"]) and val["kl"] >= 0, val
