"""The entry script refuses a bad recipe before anything is started or written."""

from __future__ import annotations

import sys

from tests.helpers import entry_main


def _main():
    return entry_main("run_sft")


def test_bad_recipe_fails_fast_with_every_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _main()(
        [
            "policy.hf_config_overrides.rope_scaling.factor=2",  # 2 * 256 < 1024
            "~policy.hf_config_overrides.rope_scaling.beta_fast",
            "policy.train_micro_batch_size=3",
            f"logger.log_dir={tmp_path / 'logs'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "policy.hf_config_overrides.rope_scaling.beta_fast: required for rope_type=yarn" in err
    assert "policy.train_micro_batch_size" in err
    assert list(tmp_path.iterdir()) == [], "nothing may be written for an invalid config"
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_unknown_override_key_suggests_the_nearest(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _main()(["policy.max_total_sequence_lenght=2048"]) == 2
    assert "policy.max_total_sequence_length" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_bad_data_row_is_one_clear_line_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "def f(): pass"}\n{"body": "no text here"}\n')
    code = _main()(
        [
            "data.dataset_name=my-corpus",
            f"data.train_data_path={data / 'train.jsonl'}",
            "data.blend=[]",
            f"logger.log_dir={tmp_path / 'logs'}",
            f"checkpointing.checkpoint_dir={tmp_path / 'checkpoints'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("Invalid data: ") and "train.jsonl: row 2: " in err and "data.input_key" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], "nothing may be written for bad data"
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
