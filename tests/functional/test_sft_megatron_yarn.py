"""The default SFT recipe end to end on CPU: Ray + Megatron worker + YaRN at 4x the window."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import validate_sft_config
from nemo_rl.rope.canonical import overrides_hash
from nemo_rl.utils.logger import read_metrics

pytestmark = pytest.mark.functional

BASE = Path(__file__).resolve().parents[2] / "examples" / "configs" / "sft.yaml"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from nemo_rl.distributed.ray_init import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


# Every leg uses the same LR schedule length, so a resumed run can be compared with a straight one.
SCHEDULE = "policy.megatron_cfg.scheduler.lr_decay_iters=8"


def _config(tmp: Path, *overrides: str):
    resolved = resolve_config(
        load_config(
            BASE,
            [
                f"logger.log_dir={tmp / 'logs'}",
                f"checkpointing.checkpoint_dir={tmp / 'ckpt'}",
                f"sft.export_hf_dir={tmp / 'hf'}",
                "logger.tensorboard_enabled=false",
                SCHEDULE,
                *overrides,
            ],
        )
    )
    return validate_sft_config(resolved), resolved


def _train(tmp: Path, *overrides: str, keep_open: bool = False):
    from nemo_rl.algorithms.sft import SFTRun

    cfg, resolved = _config(tmp, *overrides)
    run = SFTRun(cfg, resolved)
    try:
        result = run.train()
    except BaseException:
        run.close()
        raise
    if keep_open:
        return run, result
    run.close()
    return result


def _losses(tmp: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(tmp / "logs", "train")}


def test_sft_trains_caches_resumes_and_exports(ray_local, tmp_path):
    # 1) Eight steps in two legs: 4 steps, then a resumed run to step 8.
    first = _train(tmp_path / "a", "sft.max_num_steps=4", "checkpointing.save_period=2", "sft.val_period=4")
    assert first.final_step == 4
    name = first.converted_checkpoint.name
    cfg, _ = _config(tmp_path / "a")
    assert re.fullmatch(r"tiny-qwen2__hfovr_[0-9a-f]{12}", name)
    assert name.endswith(overrides_hash(cfg.policy.effective_hf_config_overrides))
    assert (tmp_path / "a" / "logs" / "config.yaml").is_file()
    from nemo_rl.models.long_context import RECEIPT_NAME, verify_receipt

    receipt = tmp_path / "a" / "logs" / RECEIPT_NAME
    assert verify_receipt(receipt)
    stamped = json.loads(receipt.read_text())["long_context"]
    assert (stamped["factor"], stamped["original_max_position_embeddings"], stamped["new_max_position_embeddings"]) == (
        4,
        256,
        1024,
    )
    assert stamped["attn_factor"] == pytest.approx(0.1 * math.log(4) + 1)
    assert sorted(p.name for p in (tmp_path / "a" / "ckpt").iterdir()) == ["step_2", "step_4"]

    run, resumed = _train(
        tmp_path / "a", "sft.max_num_steps=8", "checkpointing.save_period=2", "sft.val_period=4", keep_open=True
    )
    try:
        assert resumed.final_step == 8
        assert not run.policy.converted_now, "the second run must reuse the cached conversion"
        losses = _losses(tmp_path / "a")
        assert sorted(losses) == list(range(1, 9)), "the resumed run continues at step 5, no step twice"
        # Training on sequences beyond the original window lowers the loss.
        assert losses[8] < losses[1] - 0.5, losses
        assert resumed.last_validation is not None and resumed.last_validation["loss"] < losses[1]

        # 2) The exported HF model computes what the Megatron worker computes, beyond the original window.
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "hf", dtype=torch.float32).eval()
        assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["factor"] == 4.0
        ids = torch.randint(0, hf.config.vocab_size, (1, 900), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = hf(ids).logits
        got = run.policy.get_logits(ids)
        # float32, same weights, different kernels (fused QKV/MLP): observed max |diff| ~1e-5.
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    finally:
        run.close()

    # The step_8 training checkpoint exports, on its own, to the same HF model as the end-of-run export.
    from safetensors.torch import load_file

    from nemo_rl.models.megatron.hf_export import export_training_checkpoint

    exported = export_training_checkpoint(tmp_path / "a" / "ckpt" / "step_8", tmp_path / "from_ckpt")
    final, again = (
        load_file(str(tmp_path / "a" / "hf" / "model.safetensors")),
        load_file(str(exported / "model.safetensors")),
    )
    assert set(final) == set(again) and all(torch.equal(final[k], again[k]) for k in final)
    assert json.loads((exported / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"

    # ...and the evaluation command accepts the checkpoint directly.
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_eval", BASE.parents[1] / "run_long_context_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "eval"
    assert (
        module.main(
            [
                f"model_dir={tmp_path / 'a' / 'ckpt' / 'step_8'}",
                f"output_dir={out}",
                "long_context_eval.lengths=[300]",
                "long_context_eval.passkey_lengths=[]",
            ]
        )
        == 0
    )
    report = json.loads((out / "long_context_eval.json").read_text())
    assert report["original_window"] == 256 and report["perplexity"][0]["num_documents"] > 0
    # Each leg evaluated its export (sft.yaml's long_context_eval): report files in the log dir, metrics logged.
    logs = tmp_path / "a" / "logs"
    written = {p.name for p in logs.iterdir()}
    assert {"long_context_eval.json", "passkey_heatmap.png", "perplexity_vs_length.png"} <= written
    evaluations = read_metrics(logs, "long_context_eval")
    assert evaluations[-1]["step"] == 8
    names = {"perplexity@512", "passkey@512/depth0.5", "passkey@512"}
    names |= {"ruler/niah_multikey@512", "ruler/variable_tracking@512"}
    assert all(names <= set(row) for row in evaluations)
    assert math.isfinite(evaluations[-1]["perplexity@512"])

    # 3) An uninterrupted 8-step run gives the same loss curve as the 4 + 4 resumed run.
    straight = _train(tmp_path / "b", "sft.max_num_steps=8", "checkpointing.enabled=false", "sft.val_period=4")
    assert straight.final_step == 8
    torch.testing.assert_close(
        torch.tensor(list(_losses(tmp_path / "b").values())), torch.tensor(list(losses.values())), rtol=1e-5, atol=1e-5
    )


def test_force_reconvert_rebuilds_the_cache(ray_local, tmp_path):
    from nemo_rl.models.megatron.checkpoint_cache import MANIFEST_FILE

    first = _train(
        tmp_path / "c",
        "sft.max_num_steps=1",
        "checkpointing.enabled=false",
        "sft.val_period=0",
        "sft.export_hf_dir=null",
    )
    stamp = (first.converted_checkpoint / MANIFEST_FILE).read_text()
    again = _train(
        tmp_path / "d",
        "sft.max_num_steps=1",
        "checkpointing.enabled=false",
        "sft.val_period=0",
        "sft.export_hf_dir=null",
        "policy.megatron_cfg.force_reconvert_from_hf=true",
    )
    assert again.converted_checkpoint == first.converted_checkpoint
    assert (again.converted_checkpoint / MANIFEST_FILE).read_text() != stamp
