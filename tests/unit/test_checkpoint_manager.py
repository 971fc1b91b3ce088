"""Atomic step directories and resume selection."""

from __future__ import annotations

from nemo_rl.utils.checkpoint import TRAINING_INFO, CheckpointManager, RunIdentity


def _write(manager: CheckpointManager, step: int) -> None:
    tmp = manager.begin(step)
    (tmp / "policy.pt").write_bytes(b"weights")
    manager.commit(tmp, step, {"step": step})


def test_commit_renames_tmp_into_place(tmp_path):
    manager = CheckpointManager(tmp_path)
    tmp = manager.begin(3)
    assert tmp.name == "tmp_step_3" and manager.latest() is None
    (tmp / "policy.pt").write_bytes(b"x")
    final = manager.commit(tmp, 3, {"step": 3, "dataloader": {"epoch": 0}})
    assert final == tmp_path / "step_3" and not tmp.exists()
    assert manager.latest() == final
    assert CheckpointManager.training_info(final)["dataloader"] == {"epoch": 0}


def test_interrupted_save_is_never_resumed_and_is_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path)
    _write(manager, 2)
    crashed = manager.begin(4)  # a run killed while writing step 4
    (crashed / "policy.pt").write_bytes(b"half")
    # A step dir without training_info.json (e.g. copied by hand, partially) is not complete either.
    (tmp_path / "step_6").mkdir()
    assert manager.latest() == tmp_path / "step_2"
    manager.clean_incomplete()
    assert not crashed.exists()
    assert (tmp_path / "step_2" / "policy.pt").read_bytes() == b"weights"


def test_keep_top_k_keeps_most_recent(tmp_path):
    manager = CheckpointManager(tmp_path, keep_top_k=2)
    for step in (1, 2, 3, 10):
        _write(manager, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_3"]
    assert manager.latest().name == "step_10"  # numeric, not lexical, order


def test_each_step_records_the_identity_of_the_run_that_wrote_it(tmp_path):
    resolved = {"sft": {"seed": 1, "max_num_steps": 4}, "policy": {"lr": 1e-3}, "logger": {"log_dir": "logs"}}
    identity = RunIdentity.of(resolved)
    assert identity.config == {"sft": {"seed": 1}, "policy": {"lr": 1e-3}}, "resume-safe fields are no part of it"
    manager = CheckpointManager(tmp_path, identity=identity)
    _write(manager, 1)
    assert RunIdentity.read(tmp_path / "step_1") == identity
    assert (tmp_path / "step_1" / TRAINING_INFO).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"], "nothing is written beside the steps"
    _write(CheckpointManager(tmp_path), 2)  # a manager that knows no identity records none
    assert RunIdentity.read(tmp_path / "step_2") is None
