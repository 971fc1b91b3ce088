"""The converted-checkpoint cache: naming by override hash, reuse, force, atomicity, locking."""

from __future__ import annotations

import json
import multiprocessing as mp
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, Qwen2ForCausalLM

from nemo_rl.models.megatron import checkpoint_cache
from nemo_rl.models.megatron.hf_weights import hf_to_megatron
from nemo_rl.rope.canonical import overrides_hash
from tests.helpers import tiny_qwen2_config


def _yarn(factor=4.0):
    return {
        "rope_scaling": {
            "rope_type": "yarn",
            "rope_theta": 10000,
            "factor": factor,
            "original_max_position_embeddings": 64,
            "truncate": True,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1,
            "mscale_all_dim": 0,
        }
    }


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = tiny_qwen2_config()
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def test_directory_name_carries_the_override_hash(tmp_path):
    name = checkpoint_cache.cache_dir_name("Qwen/Qwen3-0.6B", _yarn())
    assert re.fullmatch(r"Qwen__Qwen3-0\.6B__hfovr_[0-9a-f]{12}", name)
    assert name.endswith(overrides_hash(_yarn()))
    assert checkpoint_cache.cache_dir_name("m", _yarn(4.0)) != checkpoint_cache.cache_dir_name("m", _yarn(2.0))
    assert checkpoint_cache.cache_dir_name("m", _yarn(4)) == checkpoint_cache.cache_dir_name("m", _yarn(4.0))
    assert checkpoint_cache.cache_dir_name("m", None) == "m"


def test_convert_reuse_and_force(hf_dir, tmp_path):
    path, converted = checkpoint_cache.ensure_converted(hf_dir, "tiny", _yarn(), 256, root=tmp_path)
    assert converted and checkpoint_cache.is_complete(path)
    manifest = json.loads((path / checkpoint_cache.MANIFEST_FILE).read_text())
    assert manifest["overrides_hash"] == overrides_hash(_yarn())
    # The cached config carries the overrides: what the trainer builds is what the exporter writes.
    from transformers import AutoConfig

    cached = AutoConfig.from_pretrained(path)
    assert cached.rope_parameters["rope_type"] == "yarn" and cached.rope_parameters["factor"] == 4.0
    assert cached.max_position_embeddings == 256
    weights = load_file(str(path / checkpoint_cache.WEIGHTS_FILE))
    reference = hf_to_megatron(checkpoint_cache.load_hf_state_dict(hf_dir), cached)
    assert set(weights) == set(reference) and all(torch.equal(weights[k], reference[k]) for k in reference)

    again, converted = checkpoint_cache.ensure_converted(hf_dir, "tiny", _yarn(), 256, root=tmp_path)
    assert again == path and not converted
    assert json.loads((path / checkpoint_cache.MANIFEST_FILE).read_text())["created_unix"] == manifest["created_unix"]

    forced, converted = checkpoint_cache.ensure_converted(
        hf_dir, "tiny", _yarn(), 256, force_reconvert=True, root=tmp_path
    )
    assert forced == path and converted
    assert json.loads((path / checkpoint_cache.MANIFEST_FILE).read_text())["created_unix"] > manifest["created_unix"]
    other, _ = checkpoint_cache.ensure_converted(hf_dir, "tiny", _yarn(2.0), 128, root=tmp_path)
    assert other != path and checkpoint_cache.is_complete(path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted([path.name, other.name])


def test_changed_source_weights_are_converted_again(tmp_path):
    source = tmp_path / "hf"
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_qwen2_config()).save_pretrained(source)
    path, converted = checkpoint_cache.ensure_converted(source, "tiny", _yarn(), 256, root=tmp_path / "cache")
    assert converted
    # The same directory re-written with other weights (a rebuilt built-in, a re-exported run).
    torch.manual_seed(1)
    Qwen2ForCausalLM(tiny_qwen2_config()).save_pretrained(source)
    again, converted = checkpoint_cache.ensure_converted(source, "tiny", _yarn(), 256, root=tmp_path / "cache")
    assert again == path and converted
    weights = load_file(str(path / checkpoint_cache.WEIGHTS_FILE))
    expected = hf_to_megatron(checkpoint_cache.load_hf_state_dict(source), AutoConfig.from_pretrained(path))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not checkpoint_cache.ensure_converted(source, "tiny", _yarn(), 256, root=tmp_path / "cache")[1]


def test_crash_during_conversion_leaves_nothing_usable(hf_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_cache, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_cache.ensure_converted(hf_dir, "tiny", _yarn(), 256, root=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    path, converted = checkpoint_cache.ensure_converted(hf_dir, "tiny", _yarn(), 256, root=tmp_path)
    assert converted and checkpoint_cache.is_complete(path)


def _convert_in_process(args):
    hf_dir, root = args
    return checkpoint_cache.ensure_converted(hf_dir, "tiny", _yarn(), 256, root=root)[1]


def test_concurrent_workers_convert_once(hf_dir, tmp_path):
    with mp.get_context("spawn").Pool(2) as pool:
        converted = pool.map(_convert_in_process, [(hf_dir, tmp_path)] * 2)
    assert sorted(converted) == [False, True]
