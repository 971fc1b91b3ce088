"""The converted-checkpoint cache: naming by override hash, reuse, force, atomicity, locking."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

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


def _save_random_qwen2(path, seed: int) -> None:
    # Imported here, not at the top: the spawned conversion processes below import this module, and HF's
    # modeling code (seconds to import) is nothing a conversion needs.
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    Qwen2ForCausalLM(tiny_qwen2_config()).save_pretrained(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    _save_random_qwen2(path, seed=0)
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
    _save_random_qwen2(source, seed=0)
    path, converted = checkpoint_cache.ensure_converted(source, "tiny", _yarn(), 256, root=tmp_path / "cache")
    assert converted
    # The same directory re-written with other weights (a rebuilt built-in, a re-exported run).
    _save_random_qwen2(source, seed=1)
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


def test_a_killed_builders_leftovers_are_removed_by_the_next_build(hf_dir, tmp_path):
    """A builder killed outright (SIGKILL, node loss) cleans nothing up; the next one does, under the lock."""
    name = checkpoint_cache.cache_dir_name("tiny", _yarn())
    for leftover in (f"{name}.tmp-k1ll3d", f"{name}.stale-4242"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / checkpoint_cache.WEIGHTS_FILE).write_bytes(b"half a model")
    (tmp_path / f"{name}-other.tmp-x").mkdir()  # another entry's name: not this build's to remove
    path, converted = checkpoint_cache.ensure_converted(hf_dir, "tiny", _yarn(), 256, root=tmp_path)
    assert converted and checkpoint_cache.is_complete(path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [name, f"{name}-other.tmp-x"]


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _convert_when_the_peer_does(model_path, barrier, results, hold_lock_s: float) -> None:
    """One run's conversion of the built-in model into $NRL_MEGATRON_CHECKPOINT_DIR, started with its peer's.

    The conversion first sleeps ``hold_lock_s``: whichever process takes the lock holds it that long, so the
    other surely arrives while it is held, however the two are scheduled.
    """
    import hashlib
    import time

    messages = _Messages()
    logging.getLogger("nemo_rl").addHandler(messages)
    logging.getLogger("nemo_rl").setLevel(logging.INFO)
    convert = checkpoint_cache._convert_into
    checkpoint_cache._convert_into = lambda *args: (time.sleep(hold_lock_s), convert(*args))
    barrier.wait()
    start = time.monotonic()
    path, converted = checkpoint_cache.ensure_converted(model_path, "tiny-qwen2", _yarn(), 256)
    elapsed = time.monotonic() - start
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}
    results.put({"converted": converted, "path": path, "files": files, "messages": messages.messages, "s": elapsed})


def test_two_runs_converting_at_once_convert_once_and_the_second_waits_and_reuses(tmp_path, monkeypatch):
    """Two processes (as two runs on one node) ask for the same conversion at the same moment."""
    from nemo_rl.models.builtin_models import resolve_model_path

    monkeypatch.setenv("NRL_MEGATRON_CHECKPOINT_DIR", str(tmp_path / "mcore"))
    model_path = resolve_model_path("tiny-qwen2")
    hold_lock_s = 1.5
    spawn = mp.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    runs = [
        spawn.Process(target=_convert_when_the_peer_does, args=(model_path, barrier, results, hold_lock_s))
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    outcomes = [results.get(timeout=300) for _ in runs]
    for run in runs:
        run.join(timeout=60)
        assert run.exitcode == 0
    converter, reuser = sorted(outcomes, key=lambda outcome: not outcome["converted"])
    assert (converter["converted"], reuser["converted"]) == (True, False), "exactly one converts"
    assert any(m.startswith("Converted ") for m in converter["messages"])
    assert not any(m.startswith("Waiting for the lock") for m in converter["messages"])
    assert any(m.startswith("Waiting for the lock") for m in reuser["messages"]), reuser["messages"]
    assert any(m.startswith("Reusing converted Megatron checkpoint") for m in reuser["messages"])
    assert reuser["s"] >= hold_lock_s, "the second run waited for the first one's conversion"
    expected = tmp_path / "mcore" / checkpoint_cache.cache_dir_name("tiny-qwen2", _yarn())
    assert converter["path"] == reuser["path"] == expected and checkpoint_cache.is_complete(expected)
    assert converter["files"] == reuser["files"] and checkpoint_cache.WEIGHTS_FILE in converter["files"]
    assert sorted(p.name for p in (tmp_path / "mcore").iterdir()) == [expected.name, f"{expected.name}.lock"]
