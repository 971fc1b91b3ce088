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


def test_a_yarn_block_over_a_base_models_own_rope_scaling_is_refused_before_anything_starts(
    tmp_path, capsys, monkeypatch
):
    """A Llama 3.x base ships llama3 x32 RoPE; the default recipe's YaRN block would silently replace it."""
    from transformers import LlamaConfig

    from nemo_rl.models.real_shape_models import REAL_SHAPES

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "llama"
    shape = REAL_SHAPES["llama-3.2-1b-shape"].config().to_dict()
    LlamaConfig.from_dict(shape | {"num_hidden_layers": 1}).save_pretrained(model)
    code = _main()([f"policy.model_name={model}", f"logger.log_dir={tmp_path / 'logs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "rope_type: 'yarn' would replace the RoPE scaling policy.model_name" in err
    assert "rope_type 'llama3', factor 32, original_max_position_embeddings 8192" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"], "nothing may be written"
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
