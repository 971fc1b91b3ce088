"""Recipe loading: `defaults:` chains, Hydra-syntax overrides, resolvers, save/reload."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_rl.config.loader import load_config, parse_args, resolve_config, save_config
from nemo_rl.utils.errors import ConfigError

SFT_YAML = Path(__file__).resolve().parents[2] / "examples" / "configs" / "sft.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ----------------------------------------------------------------------------
# ConfigError
# ----------------------------------------------------------------------------
def test_config_error_lists_every_message_one_per_line():
    err = ConfigError(["a: bad", "b: worse"])
    assert err.messages == ["a: bad", "b: worse"]
    assert str(err) == "a: bad\nb: worse"
    assert isinstance(err, ValueError)
    assert ConfigError("single").messages == ["single"]


# ----------------------------------------------------------------------------
# defaults chaining
# ----------------------------------------------------------------------------
def test_single_default_relative_to_the_including_file(tmp_path):
    write(tmp_path / "base.yaml", "a: 1\nb: {c: 2, d: 3}\n")
    leaf = write(tmp_path / "recipes" / "leaf.yaml", "defaults: ../base.yaml\nb: {c: 20}\n")
    cfg = load_config(leaf)
    assert OmegaConf.to_container(cfg) == {"a": 1, "b": {"c": 20, "d": 3}}
    assert "defaults" not in cfg


def test_list_defaults_merge_in_order_later_wins(tmp_path):
    write(tmp_path / "one.yaml", "x: one\ny: one\n")
    write(tmp_path / "sub" / "two.yaml", "y: two\nz: two\n")
    leaf = write(tmp_path / "leaf.yaml", "defaults: [one.yaml, sub/two.yaml]\nz: leaf\n")
    assert OmegaConf.to_container(load_config(leaf)) == {"x": "one", "y": "two", "z": "leaf"}


def test_defaults_are_composed_depth_first(tmp_path):
    # top -> [left, right]; left -> [deep]. Merge order must be deep, left, right, top.
    write(tmp_path / "deep.yaml", "by_deep: deep\nleft_over_deep: deep\nright_over_deep: deep\n")
    write(tmp_path / "left.yaml", "defaults: [deep.yaml]\nleft_over_deep: left\nright_over_left: left\n")
    write(tmp_path / "right.yaml", "right_over_deep: right\nright_over_left: right\ntop_over_right: right\n")
    top = write(tmp_path / "top.yaml", "defaults: [left.yaml, right.yaml]\ntop_over_right: top\n")
    assert OmegaConf.to_container(load_config(top)) == {
        "by_deep": "deep",
        "left_over_deep": "left",
        "right_over_deep": "right",
        "right_over_left": "right",
        "top_over_right": "top",
    }


def test_nested_defaults_paths_are_relative_to_each_file(tmp_path):
    write(tmp_path / "a" / "b" / "root.yaml", "v: root\n")
    write(tmp_path / "a" / "mid.yaml", "defaults: b/root.yaml\nw: mid\n")
    leaf = write(tmp_path / "c" / "leaf.yaml", "defaults: ../a/mid.yaml\n")
    assert OmegaConf.to_container(load_config(leaf)) == {"v": "root", "w": "mid"}


def test_diamond_defaults_are_not_a_cycle(tmp_path):
    write(tmp_path / "common.yaml", "c: 1\n")
    write(tmp_path / "l.yaml", "defaults: common.yaml\nl: 1\n")
    write(tmp_path / "r.yaml", "defaults: common.yaml\nr: 1\n")
    top = write(tmp_path / "top.yaml", "defaults: [l.yaml, r.yaml]\n")
    assert OmegaConf.to_container(load_config(top)) == {"c": 1, "l": 1, "r": 1}


def test_defaults_cycle_is_reported_with_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(tmp_path / "a.yaml")
    message = str(info.value)
    assert "a.yaml -> " in message and "b.yaml -> " in message


def test_self_include_is_a_cycle(tmp_path):
    write(tmp_path / "self.yaml", "defaults: self.yaml\nx: 1\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_missing_default_names_the_file_and_its_includer(tmp_path):
    leaf = write(tmp_path / "leaf.yaml", "defaults: nowhere.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(leaf)
    assert "nowhere.yaml: config file not found" in str(info.value)
    assert "leaf.yaml" in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_non_string_defaults_entry_is_rejected(tmp_path):
    leaf = write(tmp_path / "leaf.yaml", "defaults: [{group: option}]\n")
    with pytest.raises(ConfigError, match="list of paths"):
        load_config(leaf)


def test_interpolations_follow_values_changed_by_a_child(tmp_path):
    write(tmp_path / "base.yaml", "n: 8\nhalf: ${div:${n},2}\n")
    leaf = write(tmp_path / "leaf.yaml", "defaults: base.yaml\nn: 20\n")
    assert resolve_config(load_config(leaf)) == {"n": 20, "half": 10.0}


# ----------------------------------------------------------------------------
# overrides
# ----------------------------------------------------------------------------
@pytest.fixture
def simple(tmp_path) -> Path:
    return write(
        tmp_path / "simple.yaml",
        """\
        model:
          name: tiny
          layers: 2
          lr: 1.0e-3
          opts: {a: 1}
          tags: [x]
          maybe: null
        other: 5
        """,
    )


def test_change_override_keeps_hydra_typing(simple):
    cfg = load_config(
        simple,
        [
            "model.layers=4",
            "model.lr=0.5",
            "model.name=big",
            "model.tags=[1,2.5,true]",
            "model.maybe={k: v}",
            "other=null",
        ],
    )
    assert cfg.model.layers == 4 and isinstance(cfg.model.layers, int)
    assert cfg.model.lr == 0.5 and isinstance(cfg.model.lr, float)
    assert cfg.model.name == "big"
    assert list(cfg.model.tags) == [1, 2.5, True]
    assert dict(cfg.model.maybe) == {"k": "v"}
    assert cfg.other is None


def test_quoted_override_value_stays_a_string(simple):
    cfg = load_config(simple, ["model.name='123'", "model.layers=true"])
    assert cfg.model.name == "123"
    assert cfg.model.layers is True


def test_interpolation_override_stays_an_interpolation(simple):
    cfg = load_config(simple, ["model.layers=${other}"])
    assert OmegaConf.is_interpolation(cfg.model, "layers")
    # Hydra's grammar needs quotes around a resolver call with commas; it stays an interpolation.
    cfg = load_config(simple, ["model.layers='${mul:${other},3}'", "other=7"])
    assert resolve_config(cfg)["model"]["layers"] == 21


def test_change_of_missing_key_suggests_the_nearest_key(simple):
    with pytest.raises(ConfigError) as info:
        load_config(simple, ["model.layrs=3"])
    message = str(info.value)
    assert "model.layrs: no such key" in message
    assert "did you mean model.layers?" in message
    assert "+model.layrs=3" in message


def test_add_override(simple):
    cfg = load_config(simple, ["+model.dropout=0.1", "+extra.nested.deep=1"])
    assert cfg.model.dropout == 0.1
    assert cfg.extra.nested.deep == 1


def test_add_override_refuses_existing_key(simple):
    with pytest.raises(ConfigError, match=r"\+model.layers: key already exists"):
        load_config(simple, ["+model.layers=3"])


def test_force_add_override_adds_or_changes(simple):
    cfg = load_config(simple, ["++model.layers=9", "++model.new=x"])
    assert cfg.model.layers == 9
    assert cfg.model.new == "x"


def test_delete_override(simple):
    cfg = load_config(simple, ["~model.opts", "~other"])
    assert "opts" not in cfg.model
    assert "other" not in cfg


def test_delete_with_value_checks_the_current_value(simple):
    assert "layers" not in load_config(simple, ["~model.layers=2"]).model
    with pytest.raises(ConfigError, match="current value is 2, not 3"):
        load_config(simple, ["~model.layers=3"])


def test_delete_of_missing_key_is_an_error_with_suggestion(simple):
    with pytest.raises(ConfigError) as info:
        load_config(simple, ["~model.optz"])
    assert "~model.optz: no such key to delete (did you mean model.opts?)" in str(info.value)


def test_every_bad_override_is_reported_at_once(simple):
    with pytest.raises(ConfigError) as info:
        load_config(simple, ["model.nme=x", "+other=1", "~nothing", "model.layers=3"])
    assert len(info.value.messages) == 3


def test_unparseable_override_is_a_config_error(simple):
    with pytest.raises(ConfigError, match="cannot parse override"):
        load_config(simple, ["model.layers=[1,2"])


def test_sweeps_are_refused(simple):
    with pytest.raises(ConfigError, match="sweeps"):
        load_config(simple, ["model.layers=1,2"])


def test_overrides_on_the_real_sft_recipe():
    cfg = load_config(SFT_YAML, ["policy.megatron_cfg.optimizer.lr=3e-4", "policy.max_total_sequence_length=2048"])
    resolved = resolve_config(cfg)
    assert resolved["policy"]["megatron_cfg"]["optimizer"]["lr"] == 3e-4
    assert resolved["policy"]["hf_config_overrides"]["rope_scaling"]["factor"] == 8.0


# ----------------------------------------------------------------------------
# resolvers
# ----------------------------------------------------------------------------
def test_div_factor_in_the_real_sft_recipe_is_4_0():
    factor = resolve_config(load_config(SFT_YAML))["policy"]["hf_config_overrides"]["rope_scaling"]["factor"]
    assert factor == 4.0 and isinstance(factor, float)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("${div:7,2}", 3.5),
        ("${div:8,2}", 4.0),
        ("${mul:3,4}", 12),
        ("${mul:3,0.5}", 1.5),
        ("${add:1,2,3}", 6),
        ("${add:1,0.5}", 1.5),
        ("${max:3,9,4}", 9),
        ("${max:1.5,1}", 1.5),
    ],
)
def test_resolvers(expression, expected):
    value = resolve_config(OmegaConf.create({"v": expression}))["v"]
    assert value == expected
    assert type(value) is type(expected)


def test_resolver_rejects_bools_and_strings_naming_the_key():
    cfg = OmegaConf.create({"a": {"b": "${mul:2,true}"}, "c": "${add:1,abc}", "ok": "${add:1,2}"})
    with pytest.raises(ConfigError) as info:
        resolve_config(cfg)
    assert [m.split(":")[0] for m in info.value.messages] == ["a.b", "c"]


def test_division_by_zero_names_the_key():
    with pytest.raises(ConfigError, match=r"^x: .*divides by zero"):
        resolve_config(OmegaConf.create({"x": "${div:1,0}"}))


def test_broken_interpolations_and_missing_values_are_all_reported():
    cfg = OmegaConf.create({"a": "${nope}", "b": {"c": "???"}, "d": ["${also.nope}"], "e": 1})
    with pytest.raises(ConfigError) as info:
        resolve_config(cfg)
    assert [m.split(":")[0] for m in info.value.messages] == ["a", "b.c", "d.0"]


def test_resolver_registration_is_idempotent():
    # In a subprocess: reloading here would leave other modules holding a stale ConfigError class.
    code = (
        "import importlib; import nemo_rl.config.loader as c; importlib.reload(c); importlib.reload(c); "
        "from omegaconf import OmegaConf; print(c.resolve_config(OmegaConf.create({'v': '${div:1,4}'}))['v'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.25"


# ----------------------------------------------------------------------------
# save / reload, entry-script arguments
# ----------------------------------------------------------------------------
def test_save_and_reload_keeps_interpolations(tmp_path):
    cfg = load_config(SFT_YAML)
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    reloaded = load_config(out)
    assert OmegaConf.to_container(reloaded) == OmegaConf.to_container(cfg)
    assert OmegaConf.is_interpolation(reloaded.policy.hf_config_overrides.rope_scaling, "factor")


def test_save_and_reload_a_resolved_dict(tmp_path):
    resolved = resolve_config(load_config(SFT_YAML))
    out = tmp_path / "resolved.yaml"
    save_config(resolved, out)
    assert resolve_config(load_config(out)) == resolved


def test_parse_args_defaults_and_overrides():
    assert parse_args([], default_config="base.yaml") == (Path("base.yaml"), [])
    path, overrides = parse_args(["a.b=1", "--config", "r.yaml", "+c=2", "~d"], default_config="base.yaml")
    assert path == Path("r.yaml")
    assert overrides == ["a.b=1", "+c=2", "~d"]
