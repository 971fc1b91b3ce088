"""Document-mode SFT (continued pre-training) through examples/run_sft.py: a user's corpus by path, any layout.

Chunks of documents are ordinary SFT rows with a loss on every token, so a
tensor/sequence/context-parallel run over packed rows must compute what one
process computes, and the DTensor backend what the Megatron backend computes
(float32; same tolerances as tests/functional/test_megatron_parallel_parity.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_rl.data.python_stdlib import stdlib_documents
from nemo_rl.utils.logger import read_metrics
from tests.helpers import SFT_YAML, entry_main, local_ray

pytestmark = [pytest.mark.functional, pytest.mark.slow]

STEPS = 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A user's corpus: 40 standard-library files as {"text"} rows, most longer than one 512-token chunk."""
    rows = [r for r in stdlib_documents() if 2_000 < len(r["text"]) < 20_000][:40]
    root = tmp_path_factory.mktemp("corpus")
    for name, part in (("train.jsonl", rows[:32]), ("validation.jsonl", rows[32:])):
        (root / name).write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in part))
    return root / "train.jsonl", root / "validation.jsonl"


@pytest.fixture(scope="module")
def ray_four_workers(tmp_path_factory):
    with local_ray(4, tmp_path_factory.mktemp("mcore")):
        yield


def _losses(tmp_path: Path, corpus, name: str, *overrides: str) -> list[float]:
    train, val = corpus
    out = tmp_path / name
    status = entry_main("run_sft")(
        [
            f"--config={SFT_YAML}",  # the tiny model's base config, no blend: only the user's corpus is trained on
            "data.format=document",
            "data.dataset_name=my-corpus",
            f"data.train_data_path={train}",
            f"data.val_data_path={val}",
            "data.shuffle=false",
            f"sft.max_num_steps={STEPS}",
            "sft.val_period=0",
            "sft.export_hf_dir=null",
            "long_context_eval.enabled=false",
            "checkpointing.enabled=false",
            f"logger.log_dir={out / 'logs'}",
            "logger.tensorboard_enabled=false",
            "policy.max_grad_norm=1e9",
            "policy.megatron_cfg.scheduler.lr_warmup_iters=0",
            *overrides,
        ]
    )
    assert status == 0
    rows = read_metrics(out / "logs", "train")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # Loss on every token: every real token but each chunk's first (8 chunks a step) is a target.
    assert all(r["num_loss_tokens"] == r["input_tokens"] - 8 for r in rows)
    return [r["loss"] for r in rows]


def test_parallel_packed_documents_match_one_process(tmp_path, corpus, ray_four_workers):
    common = ["policy.max_total_sequence_length=512", "policy.sequence_packing.enabled=true"]
    single = _losses(tmp_path, corpus, "single", *common, "policy.train_micro_batch_size=1")
    parallel = _losses(
        tmp_path,
        corpus,
        "tp2_sp_cp2",
        *common,
        "cluster.gpus_per_node=4",
        "policy.megatron_cfg.tensor_model_parallel_size=2",
        "policy.megatron_cfg.sequence_parallel=true",
        "policy.megatron_cfg.context_parallel_size=2",
        "policy.train_micro_batch_size=1",
        "sft.val_micro_batch_size=1",
    )
    assert single[0] == pytest.approx(parallel[0], rel=1e-5)
    assert single[1] == pytest.approx(parallel[1], rel=1e-4)  # after one Adam step (see the parity test)
    assert single[1] < single[0]


def test_dtensor_backend_trains_documents_like_megatron(tmp_path, corpus, ray_four_workers):
    plain = ["~policy.hf_config_overrides", "policy.max_total_sequence_length=256", "policy.optimizer.kwargs.lr=3e-3"]
    megatron = _losses(tmp_path, corpus, "megatron", *plain, "policy.megatron_cfg.scheduler.lr_decay_style=constant")
    dtensor = _losses(
        tmp_path,
        corpus,
        "dtensor",
        *plain,
        "policy.dtensor_cfg.enabled=true",
        "policy.megatron_cfg.enabled=false",
        "cluster.gpus_per_node=2",
    )
    assert megatron[0] == pytest.approx(dtensor[0], rel=1e-5)
