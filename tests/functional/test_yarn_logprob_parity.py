"""One YaRN block, three engines: HF transformers, the Megatron policy worker and vLLM agree.

The tiny model's query/key projections are scaled up so attention is sharp and
position-dependent; a negative control (the same model without YaRN) shows the
comparison would catch a RoPE mismatch beyond the original window. The rollout
loop's parity probe, by position bucket, is run on the same sequence: a vLLM
engine given the same YaRN block passes it in every bucket, one whose block
differs in a single field (``truncate``, which vLLM 0.11 ignored) stops it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.rope.hf_config import apply_hf_config_overrides
from tests.helpers import yarn_block

pytestmark = [pytest.mark.functional, pytest.mark.slow]

MAX_LEN = 1024  # 4x the tiny model's original window of 256
OVERRIDES = {"rope_scaling": yarn_block()}
# float32 everywhere; the engines differ only in kernel order (fused QKV, vLLM's CPU attention).
# Measured max |diff| is 2.5e-6 in quiet runs; one run on a loaded machine saw 1.5e-3 at 3 of 999
# positions (Megatron). 1e-2 covers that and stays 100x below the no-YaRN control's gap (1.1).
ATOL = 1e-2


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharp") / "tiny-qwen2-sharp"
    shutil.copytree(resolve_model_path("tiny-qwen2"), path)
    weights = load_file(str(path / "model.safetensors"))
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] = weights[name] * 12.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, 550, (1, 1000), generator=torch.Generator().manual_seed(0))


def _logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | prefix) for t = 0..L-2."""
    return torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]


def _hf_logprobs(path: Path, ids: torch.Tensor, overrides) -> torch.Tensor:
    config = apply_hf_config_overrides(AutoConfig.from_pretrained(path), overrides, MAX_LEN)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return _logprobs_from_logits(model(ids).logits, ids)


def _megatron_logprobs(path: Path, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    import ray

    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_sft_config
    from nemo_rl.distributed.ray_init import init_ray
    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
    from nemo_rl.models.policy.lm_policy import Policy

    base = Path(__file__).resolve().parents[2] / "examples" / "configs" / "sft.yaml"
    cfg = validate_sft_config(resolve_config(load_config(base, [f"policy.model_name={path}"])))
    os.environ["NRL_MEGATRON_CHECKPOINT_DIR"] = str(tmp / "mcore")
    init_ray(num_cpus=2)
    cluster = RayVirtualCluster(1)
    policy = Policy(cluster, cfg.policy, path, seed=0)
    try:
        return _logprobs_from_logits(policy.get_logits(ids), ids)
    finally:
        policy.shutdown()
        cluster.shutdown()
        ray.shutdown()
        del os.environ["NRL_MEGATRON_CHECKPOINT_DIR"]


def _vllm_logprobs(path: Path, ids: torch.Tensor, overrides=OVERRIDES) -> torch.Tensor:
    from nemo_rl.evals.generators import VllmGenerator

    generator = VllmGenerator(path, overrides, MAX_LEN, AutoTokenizer.from_pretrained(path))
    try:
        return torch.tensor(generator.prompt_logprobs([ids[0].tolist()])[0], dtype=torch.float64)
    finally:
        generator.close()


@pytest.fixture(scope="module")
def megatron(sharp_model, tokens, tmp_path_factory) -> torch.Tensor:
    return _megatron_logprobs(sharp_model, tokens, tmp_path_factory.mktemp("megatron"))


@pytest.fixture(scope="module")
def vllm(sharp_model, tokens) -> torch.Tensor:
    return _vllm_logprobs(sharp_model, tokens)


def test_hf_megatron_and_vllm_agree_beyond_the_original_window(sharp_model, tokens, megatron, vllm):
    hf = _hf_logprobs(sharp_model, tokens, OVERRIDES)
    no_yarn = _hf_logprobs(sharp_model, tokens, None)
    beyond = slice(256, None)  # predictions at positions past the original window
    control_gap = (hf[beyond] - no_yarn[beyond]).abs().max().item()
    assert control_gap > 100 * ATOL, f"the model is not position-sensitive enough ({control_gap})"

    print(
        f"max |logprob diff| vs HF: megatron {(megatron - hf).abs().max():.2e} "
        f"(at {int((megatron - hf).abs().argmax())}), vllm {(vllm - hf).abs().max():.2e}; "
        f"no-YaRN control beyond the window {control_gap:.2e}"
    )
    torch.testing.assert_close(megatron, hf, rtol=0, atol=ATOL)
    torch.testing.assert_close(vllm.float(), hf.float(), rtol=0, atol=ATOL)


def _parity(generator: torch.Tensor, trainer: torch.Tensor):
    """The rollout loop's probe over the sequence's predicted tokens (column t: the token at position t)."""
    from nemo_rl.algorithms.logprob_parity import measure_parity

    pad = torch.zeros(1, dtype=torch.float64)
    rows = [torch.cat([pad, values.double()])[None] for values in (generator, trainer)]
    mask = torch.ones_like(rows[0])
    mask[0, 0] = 0  # the first token is never predicted
    return measure_parity(rows[0], rows[1], mask, window=256)


def test_parity_by_position_passes_the_same_yarn_and_stops_a_subtly_different_one(sharp_model, tokens, megatron, vllm):
    from nemo_rl.algorithms.logprob_parity import ParityError, check_first_step

    matched = _parity(vllm, megatron)
    different = _parity(_vllm_logprobs(sharp_model, tokens, {"rope_scaling": yarn_block(truncate=False)}), megatron)
    print("matched:", matched.metrics(), "\ntruncate off in vLLM only:", different.metrics())
    assert list(matched.buckets) == ["window", "1-2x", "2-4x"]
    for name, (_, agreement) in matched.buckets.items():
        assert 1.0 <= agreement.error <= 1.001 and agreement.kl < 1e-4, (name, agreement)
    check_first_step(matched, 1.001, long_context=True, section="grpo")

    errors = [agreement.error for _, agreement in different.buckets.values()]
    assert errors == sorted(errors), "the gap should grow with the position"  # measured 1.152, 1.240, 1.249
    with pytest.raises(ParityError, match=r"token_mult_prob_error/2-4x = .* at positions 512-1023"):
        check_first_step(different, 1.001, long_context=True, section="grpo")
