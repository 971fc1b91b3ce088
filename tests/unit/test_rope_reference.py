"""Every engine computes the RoPE that ``nemo_rl.rope`` says a block means.

The project's RoPE math (``rope_frequencies``, float64) is the reference; the
installed transformers, megatron-core and vLLM are each compared with it, never
with one another, over a grid of head dims (64, 128, and 128 with
``partial_rotary_factor=0.5``), bases, factors (integer and not), original
windows, beta pairs, mscale pairs and ``truncate``.

Tolerances (all engines compute in float32, the reference in float64):

* inverse frequencies: relative ``(8 + 2 * factor) * 2**-23``. ``theta ** (2i/d)``
  is one float32 ``pow`` (exponent exact: d is a power of two; measured < 1 ulp),
  then a reciprocal and a division by ``factor``, each rounding once. YaRN's blend
  adds the one term that grows: the engines' float32 ramp is off by up to ~1 ulp
  absolute, and it weights ``f - f/factor``, so near the interpolated end
  (inv_freq ~ f/factor) that is ~``factor`` ulps relative (measured 16 ulps at
  factor 32).
* cos/sin: ``attention_factor * (|angle| * angle_rtol + 4 * 2**-23)``, where
  ``angle_rtol`` is the inv_freq tolerance plus 2 ulps. The angle
  ``position * inv_freq`` inherits the relative error of ``inv_freq`` plus the
  rounding of the product (and of ``position / factor`` where an engine scales
  positions), so the absolute error of cos/sin grows with the angle: at position
  10**6 a 1-ulp error in the highest frequency moves the angle by ~0.1 rad. Any
  semantic difference (a ramp bound, the attention factor, the base) shows at
  small angles or at position 0, where the bound is ~1e-6.
* attention factor: Python floats on every side, relative 1e-12.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from nemo_rl.rope.blocks import NTKAwareScaling, YarnScaling, rotary_dim
from nemo_rl.rope.megatron_config import megatron_rope_fields
from nemo_rl.rope.reference import dynamic_ntk_theta, rope_cos_sin, rope_frequencies, yarn_correction_range
from tests.helpers import yarn_block as shared_yarn_block

HEAD_DIMS = [(64, 1.0), (128, 1.0), (128, 0.5)]  # (head_dim, partial_rotary_factor)
BASES = [1e4, 1e6]
FACTORS = [1.6, 2.0, 4.0, 7.5, 32.0]
ORIGINALS = [256, 4096, 32768]
BETAS = [(32, 1), (16, 2)]
MSCALES = [(1, 0), (0.707, 0), (0, 0), (1, 1), (0.707, 0.707)]
TRUNCATE = [True, False]

EPS32 = 2.0**-23
ABS_TOL = 4 * EPS32
WINDOW = 64  # positions compared at each end of an engine's table

# Worst differences seen, per engine and quantity; printed at module teardown (pytest -s).
MEASURED: dict[str, float] = {}


def _record(key: str, value: float) -> None:
    MEASURED[key] = max(MEASURED.get(key, 0.0), float(value))


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    for key in sorted(MEASURED):
        print(f"rope reference max diff {key}: {MEASURED[key]:.3e}")


def yarn_block(base, factor, original, betas, mscales, truncate) -> dict:
    return {
        "rope_type": "yarn",
        "rope_theta": base,
        "factor": factor,
        "original_max_position_embeddings": original,
        "truncate": truncate,
        "beta_fast": betas[0],
        "beta_slow": betas[1],
        "mscale": mscales[0],
        "mscale_all_dim": mscales[1],
    }


def yarn_grid():
    return itertools.product(FACTORS, BETAS, MSCALES, TRUNCATE)


def extended(factor: float, original: int) -> int:
    return math.ceil(factor * original)


# ----------------------------------------------------------------------------
# Checks shared by all engines
# ----------------------------------------------------------------------------
def inv_freq_rtol(factor: float) -> float:
    """float32 rounding of an engine's inv_freq, relative (see the module docstring)."""
    return (8 + 2 * factor) * EPS32


def angle_rtol(factor: float) -> float:
    """inv_freq's error plus the rounding of position * inv_freq (and of position / factor)."""
    return inv_freq_rtol(factor) + 2 * EPS32


def assert_inv_freq(engine: str, got: torch.Tensor, want: torch.Tensor, factor: float, what: str) -> None:
    assert got.shape == want.shape, f"{engine} {what}: {got.shape[0]} rotated pairs, reference {want.shape[0]}"
    rel = ((got.double() - want) / want).abs().max().item()
    _record(f"{engine} inv_freq (relative)", rel)
    _record(f"{engine} inv_freq (diff / tolerance)", rel / inv_freq_rtol(factor))
    assert rel <= inv_freq_rtol(factor), (
        f"{engine} {what}: inv_freq relative difference {rel:.3e} > {inv_freq_rtol(factor):.3e}"
    )


def assert_attention_factor(engine: str, got: float, want: float, what: str) -> None:
    _record(f"{engine} attention factor (abs)", abs(got - want))
    assert math.isclose(got, want, rel_tol=1e-12), f"{engine} {what}: attention factor {got} != reference {want}"


def assert_cos_sin(engine, positions, cos, sin, inv_freq, attention_factor, factor, what) -> None:
    """cos/sin rows of an engine at ``positions`` ([n, pairs], any float dtype) against the reference."""
    want_cos, want_sin = rope_cos_sin(inv_freq, attention_factor, positions)
    angle = torch.outer(torch.as_tensor(positions, dtype=torch.float64), inv_freq)
    tol = attention_factor * (angle.abs() * angle_rtol(factor) + ABS_TOL)
    for name, got, want in (("cos", cos, want_cos), ("sin", sin, want_sin)):
        assert got.shape == want.shape, f"{engine} {what}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
        diff = (got.double() - want).abs()
        _record(f"{engine} {name} (abs)", diff.max().item())
        _record(f"{engine} {name} (diff / tolerance)", (diff / tol).max().item())
        worst = (diff - tol).argmax()
        row, col = divmod(worst.item(), diff.shape[1])
        assert (diff <= tol).all(), (
            f"{engine} {what}: {name} at position {positions[row]}, pair {col}: "
            f"{got[row, col].item()} vs reference {want[row, col].item()} (tolerance {tol[row, col].item():.2e})"
        )


def table_positions(length: int) -> list[int]:
    """Both ends of a table of ``length`` rows, plus a stride through the middle."""
    ends = list(range(min(WINDOW, length))) + list(range(max(length - WINDOW, WINDOW), length))
    middle = list(range(WINDOW, max(length - WINDOW, WINDOW), max(1, length // 64)))
    return sorted(set(ends + middle))


# ----------------------------------------------------------------------------
# Reference values
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "original", "factor", "truncate", "expected_range", "expected_factor"),
    [
        (1e6, 32768, 4.0, True, (23, 40), 1.1386),  # Qwen3
        (1e6, 32768, 4.0, False, (23.596, 39.651), 1.1386),
        (1e4, 4096, 16.0, True, (20, 46), 1.2773),  # Llama-2
        (1e4, 4096, 32.0, True, (20, 46), 1.3466),
    ],
)
def test_published_reference_values(base, original, factor, truncate, expected_range, expected_factor):
    block = yarn_block(base, factor, original, (32, 1), (1, 0), truncate)
    low, high = yarn_correction_range(YarnScaling.from_dict(block), 128)
    assert (low, high) == pytest.approx(expected_range, abs=5e-4)
    if truncate:
        assert isinstance(low, int) and isinstance(high, int)
    _, attention_factor = rope_frequencies(block, 128)
    assert attention_factor == pytest.approx(expected_factor, abs=5e-5)


def test_yarn_inv_freq_endpoints():
    """Pairs below the range keep their frequency, pairs above are divided by factor."""
    block = yarn_block(1e6, 4.0, 32768, (32, 1), (1, 0), True)
    inv_freq, _ = rope_frequencies(block, 128)
    plain, _ = rope_frequencies({"rope_type": "default", "rope_theta": 1e6}, 128)
    assert torch.equal(inv_freq[:23], plain[:23])
    assert torch.allclose(inv_freq[40:], plain[40:] / 4.0, rtol=1e-15, atol=0)


def test_ntk_aware_is_default_with_scaled_theta():
    params = NTKAwareScaling(1e4, 4.0, 128).to_block()
    assert params == {"rope_type": "default", "rope_theta": 1e4 * 4.0 ** (128 / 126)}
    # dynamic NTK at L = (s_ntk + s - 1) / s * L_orig uses the same base as static NTK with s_ntk
    theta = dynamic_ntk_theta(1e4, 2.0, 128, 4096, seq_len=int(4096 * (4.0 + 1.0) / 2.0))
    assert theta == pytest.approx(params["rope_theta"], rel=1e-14)


def test_reference_refuses_what_it_does_not_define():
    with pytest.raises(ValueError, match="longrope"):
        rope_frequencies({"rope_type": "longrope", "rope_theta": 1e4}, 64)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        rope_frequencies({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0}, 64)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_frequencies({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 64)


# ----------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    from transformers import GlmConfig, LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def config(head_dim, partial, params, max_position_embeddings):
        """Llama for full rotary; Glm, whose default RoPE honours partial_rotary_factor, for partial."""
        rope_parameters = dict(params)
        cls = LlamaConfig
        if partial != 1.0:
            cls = GlmConfig
            rope_parameters["partial_rotary_factor"] = partial
        return cls(
            head_dim=head_dim,
            hidden_size=4 * head_dim,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=max_position_embeddings,
            rope_parameters=rope_parameters,
        )

    def init(head_dim, partial, params, max_position_embeddings, **kwargs):
        cfg = config(head_dim, partial, params, max_position_embeddings)
        if params["rope_type"] == "default":
            rotary = GlmRotaryEmbedding if partial != 1.0 else LlamaRotaryEmbedding
            return rotary.compute_default_rope_parameters(cfg)
        return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", **kwargs)

    return SimpleNamespace(config=config, init=init)


@pytest.mark.parametrize(("head_dim", "partial"), HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("original", ORIGINALS)
def test_transformers_yarn(hf, head_dim, partial, base, original):
    for factor, betas, mscales, truncate in yarn_grid():
        block = yarn_block(base, factor, original, betas, mscales, truncate)
        what = f"yarn {block} head_dim={head_dim} partial={partial}"
        got_inv, got_factor = hf.init(head_dim, partial, block, extended(factor, original))
        want_inv, want_factor = rope_frequencies({**block, "partial_rotary_factor": partial}, head_dim)
        assert_inv_freq("transformers", got_inv, want_inv, factor, what)
        assert_attention_factor("transformers", got_factor, want_factor, what)


@pytest.mark.parametrize(("head_dim", "partial"), HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
def test_transformers_default_linear_ntk(hf, head_dim, partial, base):
    params = {"rope_type": "default", "rope_theta": base}
    blocks = [params] + [{"rope_type": "linear", "rope_theta": base, "factor": f} for f in FACTORS]
    blocks += [NTKAwareScaling(base, f, rotary_dim(head_dim, partial)).to_block() for f in FACTORS]
    for block in blocks:
        what = f"{block} head_dim={head_dim} partial={partial}"
        got_inv, got_factor = hf.init(head_dim, partial, block, 4096)
        want_inv, want_factor = rope_frequencies({**block, "partial_rotary_factor": partial}, head_dim)
        assert_inv_freq("transformers", got_inv, want_inv, block.get("factor", 1.0), what)
        assert_attention_factor("transformers", got_factor, want_factor, what)


@pytest.mark.parametrize(("head_dim", "partial"), HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
def test_transformers_dynamic(hf, head_dim, partial, base):
    for factor, original in itertools.product(FACTORS, ORIGINALS):
        block = {"rope_type": "dynamic", "rope_theta": base, "factor": factor}
        for seq_len in (None, original // 2, original, 2 * original, extended(factor, original)):
            what = f"{block} original={original} seq_len={seq_len} head_dim={head_dim} partial={partial}"
            # transformers reads the original window from config.max_position_embeddings
            got_inv, got_factor = hf.init(head_dim, partial, block, original, seq_len=seq_len)
            canonical = {**block, "original_max_position_embeddings": original, "partial_rotary_factor": partial}
            want_inv, want_factor = rope_frequencies(canonical, head_dim, seq_len=seq_len)
            assert_inv_freq("transformers", got_inv, want_inv, factor, what)
            assert_attention_factor("transformers", got_factor, want_factor, what)


# ----------------------------------------------------------------------------
# megatron-core
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def megatron():
    from nemo_rl.models.megatron.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as yarn_module
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return SimpleNamespace(yarn=yarn_module, RotaryEmbedding=RotaryEmbedding)


def megatron_yarn(megatron, kv_channels: int, base: float, fields: dict, rotary_percent: float = 1.0):
    """YarnRotaryEmbedding built the way the Megatron model builder builds it, from megatron_rope_fields."""
    return megatron.yarn.YarnRotaryEmbedding(
        kv_channels=kv_channels,
        rotary_percent=rotary_percent,
        rotary_base=base,
        use_cpu_initialization=True,
        scaling_factor=fields["yarn_rotary_scaling_factor"],
        original_max_position_embeddings=fields["yarn_original_max_position_embeddings"],
        beta_fast=fields["yarn_beta_fast"],
        beta_slow=fields["yarn_beta_slow"],
        mscale=fields["yarn_mscale"],
        mscale_all_dim=fields["yarn_mscale_all_dim"],
        correction_range_round_to_int=fields["yarn_correction_range_round_to_int"],
    )


def megatron_table(rope, length: int, pairs: int, mscale: float = 1.0):
    """(positions, cos, sin, inv_freq) from Megatron's own emb, at both ends of ``length`` rows.

    ``get_emb(n, offset)`` gives rows offset..offset+n-1 without building the whole
    table; cos/sin are taken as Megatron's cache takes them (``emb.cos() * mscale``
    in float32). Row 1 of the emb is 1 * inv_freq, i.e. exactly the inv_freq used.
    """
    head = min(WINDOW, length)
    tail_start = max(length - WINDOW, head)
    parts = [(0, head)] + ([(tail_start, length - tail_start)] if length > tail_start else [])
    positions, embs = [], []
    for offset, count in parts:
        emb = rope.get_emb(count, offset)
        emb = emb[0] if isinstance(emb, tuple) else emb
        emb = emb[:, 0, 0, :]
        assert torch.equal(emb[:, :pairs], emb[:, pairs:]), "Megatron emb is not (freqs, freqs)"
        positions += list(range(offset, offset + count))
        embs.append(emb[:, :pairs])
    emb = torch.cat(embs)
    return positions, emb.cos() * mscale, emb.sin() * mscale, emb[1]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("original", ORIGINALS)
def test_megatron_yarn(hf, megatron, head_dim, base, original):
    """cos/sin (with the concentration factor) up to factor * original, for every field combination.

    Constructing the module costs a cos/sin table of ``original`` rows, so the
    mscale pairs are cycled through the other combinations here; every
    (factor, mscale pair) is checked for the concentration factor below.
    """
    combos = list(itertools.product(FACTORS, BETAS, TRUNCATE))
    for i, (factor, betas, truncate) in enumerate(combos):
        mscales = MSCALES[i % len(MSCALES)]
        block = yarn_block(base, factor, original, betas, mscales, truncate)
        what = f"yarn {block} kv_channels={head_dim}"
        fields = megatron_rope_fields(hf.config(head_dim, 1.0, block, extended(factor, original)))
        rope = megatron_yarn(megatron, head_dim, base, fields)
        want_inv, want_factor = rope_frequencies(block, head_dim)
        _, mscale = rope.get_emb(1)
        assert_attention_factor("megatron-core", mscale, want_factor, what)
        positions, cos, sin, inv_freq = megatron_table(rope, extended(factor, original), head_dim // 2, mscale)
        assert_inv_freq("megatron-core", inv_freq, want_inv, factor, what)
        assert_cos_sin("megatron-core", positions, cos, sin, want_inv, want_factor, factor, what)


def test_megatron_concentration_factor(hf, megatron):
    """Both places Megatron computes the factor (rotary module, attention config) give the canonical one."""
    for factor, mscales in itertools.product(FACTORS, MSCALES):
        block = yarn_block(1e6, factor, 4096, (32, 1), mscales, True)
        fields = megatron_rope_fields(hf.config(128, 1.0, block, extended(factor, 4096)))
        want = YarnScaling.from_dict(block).attention_factor
        got = megatron.yarn._yarn_get_concentration_factor(
            fields["yarn_rotary_scaling_factor"], fields["yarn_mscale"], fields["yarn_mscale_all_dim"]
        )
        assert_attention_factor("megatron-core", got, want, f"{block}")
        from_config = megatron.yarn._yarn_get_concentration_factor_from_config(SimpleNamespace(**fields))
        assert_attention_factor("megatron-core", from_config, want, f"{block} (attention path)")


def test_megatron_reads_raw_mscale_pair_differently(megatron):
    """Why megatron_rope_fields translates the pair: fed raw, Megatron disagrees for (0.707, 0) and (0, 0)."""
    for mscales in [(0.707, 0), (0, 0)]:
        block = yarn_block(1e6, 4.0, 4096, (32, 1), mscales, True)
        raw = megatron.yarn._yarn_get_concentration_factor(4.0, *mscales)
        assert not math.isclose(raw, YarnScaling.from_dict(block).attention_factor, rel_tol=1e-6)


def test_megatron_refuses_partial_rotary_yarn(hf, megatron):
    """YarnRotaryEmbedding ignores rotary_percent, so partial rotary + yarn is refused for Megatron."""
    block = yarn_block(1e6, 4.0, 4096, (32, 1), (1, 0), True)
    with pytest.raises(ValueError, match=r"partial_rotary_factor=0\.5.*megatron-core"):
        megatron_rope_fields(hf.config(128, 0.5, block, 16384))
    # The disagreement the refusal guards against: 64 channels should rotate, Megatron rotates 128.
    fields = megatron_rope_fields(hf.config(128, 1.0, block, 16384))
    rope = megatron_yarn(megatron, 128, 1e6, fields, rotary_percent=0.5)
    emb, _ = rope.get_emb(4)
    assert emb.shape[-1] == 128 != rotary_dim(128, 0.5)


def test_megatron_refuses_dynamic_and_maps_linear_to_interpolation(hf):
    """Megatron builds one RoPE table, so per-length (dynamic) scaling is refused; linear is its interpolation."""
    from nemo_rl.rope.megatron_config import megatron_gpt_rope_kwargs

    dynamic = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ValueError, match="'dynamic' cannot be built by megatron-core"):
        megatron_rope_fields(hf.config(128, 1.0, dynamic, 4096))
    linear = hf.config(128, 1.0, {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, 4096)
    assert megatron_rope_fields(linear) == {}
    assert megatron_gpt_rope_kwargs(linear)["seq_len_interpolation_factor"] == 2.0
    assert megatron_gpt_rope_kwargs(linear)["position_embedding_type"] == "rope"


@pytest.mark.parametrize(("head_dim", "partial"), HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
def test_megatron_default_linear_ntk(megatron, head_dim, partial, base):
    """Plain RotaryEmbedding: default, linear via seq_len_interpolation_factor, static NTK via the base."""
    pairs = rotary_dim(head_dim, partial) // 2
    cases = [({"rope_type": "default", "rope_theta": base}, None)]
    cases += [({"rope_type": "linear", "rope_theta": base, "factor": f}, f) for f in FACTORS]
    cases += [(NTKAwareScaling(base, f, rotary_dim(head_dim, partial)).to_block(), None) for f in FACTORS]
    for block, interpolation in cases:
        what = f"{block} kv_channels={head_dim} rotary_percent={partial}"
        rope = megatron.RotaryEmbedding(
            kv_channels=head_dim,
            rotary_percent=partial,
            seq_len_interpolation_factor=interpolation,
            rotary_base=block["rope_theta"],
            use_cpu_initialization=True,
        )
        want_inv, want_factor = rope_frequencies({**block, "partial_rotary_factor": partial}, head_dim)
        positions, cos, sin, _ = megatron_table(rope, extended(interpolation or 4.0, 4096), pairs)
        assert_cos_sin("megatron-core", positions, cos, sin, want_inv, want_factor, interpolation or 1.0, what)


# ----------------------------------------------------------------------------
# vLLM
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_rope():
    """get_rope inside a default vLLM config (its CustomOps need one); the import takes ~15 s, once."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import rotary_embedding

    def build(head_dim, max_position, params):
        try:
            return rotary_embedding.get_rope(
                head_dim, max_position, is_neox_style=True, rope_parameters=params, dtype=torch.float32
            )
        finally:
            rotary_embedding._ROPE_DICT.clear()  # the memo would keep every table alive

    with set_current_vllm_config(VllmConfig()):
        yield build


def vllm_table(rope, pairs: int):
    cache = rope.cos_sin_cache
    assert cache.shape[1] == 2 * pairs, f"vLLM rotates {cache.shape[1] // 2} channels, reference {2 * pairs}"
    positions = table_positions(cache.shape[0])
    rows = cache[positions]
    return positions, rows[:, :pairs], rows[:, pairs:]


# vLLM builds its whole table up front (factor * original rows); the largest windows
# (32768 * 7.5 and * 32: 4-7 s each on 2 cores, ~2 GB for the largest) are left to
# transformers and Megatron, which are checked at those lengths.
VLLM_MAX_ROWS = 2**17


@pytest.mark.parametrize(("head_dim", "partial"), HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("original", ORIGINALS)
def test_vllm_yarn(vllm_rope, head_dim, partial, base, original):
    """get_rope's max_position is ignored for YaRN: the table has original * factor rows (no double scaling)."""
    combos = [c for c in itertools.product(FACTORS, BETAS, TRUNCATE) if extended(c[0], original) <= VLLM_MAX_ROWS]
    for i, (factor, betas, truncate) in enumerate(combos):
        mscales = MSCALES[i % len(MSCALES)]
        block = yarn_block(base, factor, original, betas, mscales, truncate)
        what = f"yarn {block} head_dim={head_dim} partial={partial}"
        params = {**block, "partial_rotary_factor": partial}
        # max_position as a model passes it: the extended max_position_embeddings
        rope = vllm_rope(head_dim, extended(factor, original), params)
        assert rope.cos_sin_cache.shape[0] == extended(factor, original), what
        want_inv, want_factor = rope_frequencies(params, head_dim)
        assert_attention_factor("vLLM", rope.mscale, want_factor, what)
        assert_inv_freq("vLLM", rope._compute_inv_freq(rope.scaling_factor), want_inv, factor, what)
        positions, cos, sin = vllm_table(rope, want_inv.shape[0])
        assert_cos_sin("vLLM", positions, cos, sin, want_inv, want_factor, factor, what)


def test_vllm_yarn_attention_factor(vllm_rope):
    for factor, mscales in itertools.product(FACTORS, MSCALES):
        block = yarn_block(1e4, factor, 64, (32, 1), mscales, True)
        rope = vllm_rope(64, extended(factor, 64), block)
        assert_attention_factor("vLLM", rope.mscale, YarnScaling.from_dict(block).attention_factor, f"{block}")


@pytest.mark.parametrize(("head_dim", "partial"), HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
def test_vllm_default_linear_ntk(vllm_rope, head_dim, partial, base):
    """linear: vLLM keeps one table per factor covering max_position * factor rows."""
    pairs = rotary_dim(head_dim, partial) // 2
    blocks = [{"rope_type": "default", "rope_theta": base}]
    blocks += [{"rope_type": "linear", "rope_theta": base, "factor": f} for f in FACTORS]
    blocks += [NTKAwareScaling(base, f, rotary_dim(head_dim, partial)).to_block() for f in FACTORS]
    for block in blocks:
        params = {**block, "partial_rotary_factor": partial}
        what = f"{params} head_dim={head_dim}"
        rope = vllm_rope(head_dim, 4096, params)
        if block["rope_type"] == "linear":
            assert rope.cos_sin_cache.shape[0] == extended(block["factor"], 4096), what
        want_inv, want_factor = rope_frequencies(params, head_dim)
        positions, cos, sin = vllm_table(rope, pairs)
        assert_cos_sin("vLLM", positions, cos, sin, want_inv, want_factor, block.get("factor", 1.0), what)


@pytest.mark.parametrize(("head_dim", "partial"), HEAD_DIMS)
def test_vllm_dynamic_at_its_table_length(vllm_rope, head_dim, partial):
    """vLLM's dynamic NTK is one table built for seq_len = max_position (window = max_trained_positions).

    It equals transformers' (and the reference's) dynamic NTK for a sequence of
    exactly max_position tokens; see the next test for shorter ones.
    """
    pairs = rotary_dim(head_dim, partial) // 2
    for base, factor, original in itertools.product(BASES, FACTORS, (256, 4096)):
        seq_len = extended(factor, original)
        block = {"rope_type": "dynamic", "rope_theta": base, "factor": factor}
        params = {**block, "max_trained_positions": original, "partial_rotary_factor": partial}
        what = f"{params} seq_len={seq_len} head_dim={head_dim}"
        rope = vllm_rope(head_dim, seq_len, params)
        canonical = {**block, "original_max_position_embeddings": original, "partial_rotary_factor": partial}
        want_inv, want_factor = rope_frequencies(canonical, head_dim, seq_len=seq_len)
        positions, cos, sin = vllm_table(rope, pairs)
        assert_cos_sin("vLLM", positions, cos, sin, want_inv, want_factor, factor, what)


def test_vllm_dynamic_disagrees_below_its_table_length(vllm_rope):
    """Known disagreement, kept visible: vLLM applies the longest sequence's base to every sequence.

    transformers (and the reference) keep rope_theta for a sequence that fits the
    original window; vLLM's table, built for max_position, has the grown base at
    every row. If this starts failing, vLLM has become per-length like transformers.
    """
    block = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    rope = vllm_rope(128, 4 * 4096, {**block, "max_trained_positions": 4096})
    short, _ = rope_frequencies({**block, "original_max_position_embeddings": 4096}, 128, seq_len=4096)
    positions, cos, _ = vllm_table(rope, 64)
    want_cos, _ = rope_cos_sin(short, 1.0, positions)
    assert (cos.double() - want_cos).abs().max().item() > 0.5


def test_range_clamped_past_last_pair(hf, megatron, vllm_rope):
    """Both clamps of the correction range, where they change the result, in every engine.

    With theta=1e3 and a 32768 window the ramp ends at pair ~40 of 32: the clamp
    is d - 1 = 63, not the last pair 31, so the last pairs are only partly
    interpolated. With a 128 window and beta_fast=32 it would start below pair 0
    (clamped to 0).
    """
    for original, truncate in itertools.product((128, 32768), TRUNCATE):
        factor = 4.0
        block = yarn_block(1e3, factor, original, (32, 1), (1, 0), truncate)
        low, high = yarn_correction_range(YarnScaling.from_dict(block), 64)
        assert low == 0 if original == 128 else 31 < high < 63
        want_inv, want_factor = rope_frequencies(block, 64)
        what = f"{block} head_dim=64"
        hf_inv, hf_factor = hf.init(64, 1.0, block, extended(factor, original))
        assert_inv_freq("transformers", hf_inv, want_inv, factor, what)
        fields = megatron_rope_fields(hf.config(64, 1.0, block, extended(factor, original)))
        positions, cos, sin, mc_inv = megatron_table(
            megatron_yarn(megatron, 64, 1e3, fields), extended(factor, original), 32, want_factor
        )
        assert_inv_freq("megatron-core", mc_inv, want_inv, factor, what)
        assert_cos_sin("megatron-core", positions, cos, sin, want_inv, want_factor, factor, what)
        rope = vllm_rope(64, extended(factor, original), block)
        assert_inv_freq("vLLM", rope._compute_inv_freq(rope.scaling_factor), want_inv, factor, what)
        positions, cos, sin = vllm_table(rope, 32)
        assert_cos_sin("vLLM", positions, cos, sin, want_inv, want_factor, factor, what)


def test_vllm_ntk_type_is_not_ntk_aware(vllm_rope):
    """vLLM's rope_type=ntk slows even the fastest pair, so NTK-aware is sent as default + scaled theta."""
    rope = vllm_rope(128, 4096, {"rope_type": "ntk", "rope_theta": 1e4, "factor": 4.0})
    ntk_aware, _ = rope_frequencies(NTKAwareScaling(1e4, 4.0, 128).to_block(), 128)
    vllm_ntk = rope._compute_inv_freq(rope.base).double()
    assert ntk_aware[0].item() == 1.0
    assert vllm_ntk[0].item() == pytest.approx(4.0 ** (-2 / 128), rel=1e-6)


def test_vllm_translation_refuses_dynamic_ntk():
    """vLLM's fixed-table dynamic NTK differs from transformers' per-length one (see above)."""
    from transformers import Qwen2Config

    from nemo_rl.rope.vllm_engine import vllm_engine_kwargs

    config = Qwen2Config(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=256)
    with pytest.raises(ValueError, match="rope_type: vLLM computes dynamic scaling"):
        dynamic = {"rope_type": "dynamic", "rope_theta": 10000, "factor": 2.0, "original_max_position_embeddings": 256}
        vllm_engine_kwargs(config, {"rope_scaling": dynamic}, 512)
    kwargs = vllm_engine_kwargs(config, {"rope_scaling": shared_yarn_block()}, 1024)
    assert kwargs["max_model_len"] == 1024
    assert kwargs["hf_overrides"]["max_position_embeddings"] == 1024
    assert kwargs["hf_overrides"]["rope_parameters"]["rope_theta"] == 10000  # whole block, base included


def test_dynamic_yarn_reference_math_follows_the_running_length():
    """Dynamic-YaRN: plain RoPE inside the window, YaRN with s = L / original beyond it, capped at factor."""
    from nemo_rl.rope.blocks import DYNAMIC_YARN
    from nemo_rl.rope.reference import rope_frequencies

    block = shared_yarn_block(rope_type=DYNAMIC_YARN)  # factor 4, original 256
    plain, _ = rope_frequencies({"rope_type": "default", "rope_theta": 10000}, 64)
    inside, factor_inside = rope_frequencies(block, 64, seq_len=200)
    torch.testing.assert_close(inside, plain)
    assert factor_inside == 1.0
    at_2x, factor_2x = rope_frequencies(block, 64, seq_len=512)
    static_2x, static_factor = rope_frequencies(shared_yarn_block(factor=2.0), 64)
    torch.testing.assert_close(at_2x, static_2x)
    assert factor_2x == static_factor == pytest.approx(0.1 * math.log(2) + 1)
    beyond, _ = rope_frequencies(block, 64, seq_len=4096)
    torch.testing.assert_close(beyond, rope_frequencies(shared_yarn_block(), 64)[0])
    with pytest.raises(ValueError, match="seq_len"):
        rope_frequencies(block, 64)


def test_dynamic_yarn_is_refused_for_runs_with_the_engines_named():
    from nemo_rl.rope.blocks import DYNAMIC_YARN
    from nemo_rl.rope.rules import validate_long_context

    _, errors, _ = validate_long_context({"rope_scaling": shared_yarn_block(rope_type=DYNAMIC_YARN)}, 1024, True, False)
    assert len(errors) == 1
    assert "megatron-core" in errors[0] and "vLLM" in errors[0] and "transformers" in errors[0]
    assert "use rope_type: yarn" in errors[0]


def test_hf_dynamic_ntk_reads_the_blocks_original_window():
    """transformers takes dynamic NTK's original window from max_position_embeddings; the translation sets it."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nemo_rl.rope.hf_config import apply_hf_config_overrides

    config = Qwen2Config(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=4096)
    block = {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 256}
    patched = apply_hf_config_overrides(config, {"rope_scaling": block}, 1024)
    assert patched.max_position_embeddings == 256
    assert patched.rope_parameters["rope_theta"] == 1e6
    for seq_len in (None, 200, 700, 1024):
        got, _ = ROPE_INIT_FUNCTIONS["dynamic"](patched, "cpu", seq_len=seq_len)
        want, _ = rope_frequencies(block, 64, seq_len=seq_len)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_user_vllm_kwargs_merge_with_the_derived_ones_and_conflicts_name_both_values():
    from transformers import Qwen2Config

    from nemo_rl.rope.vllm_engine import vllm_engine_kwargs
    from nemo_rl.utils.errors import ConfigError

    config = Qwen2Config(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=256)
    overrides = {"rope_scaling": shared_yarn_block()}
    user = {"gpu_memory_utilization": 0.5, "hf_overrides": {"sliding_window": None, "max_position_embeddings": 1024}}
    kwargs = vllm_engine_kwargs(config, overrides, 1024, user)
    assert kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["hf_overrides"]["sliding_window"] is None  # the user's own key is kept
    assert kwargs["hf_overrides"]["rope_parameters"]["rope_type"] == "yarn"
    with pytest.raises(ConfigError) as raised:
        vllm_engine_kwargs(
            config, overrides, 1024, {"hf_overrides": {"max_position_embeddings": 2048}, "max_model_len": 512}
        )
    lines = str(raised.value)
    assert "generation.vllm_kwargs.hf_overrides.max_position_embeddings: 2048 contradicts 1024" in lines
    assert "generation.vllm_kwargs.max_model_len: 512 contradicts policy.max_total_sequence_length = 1024" in lines


# ----------------------------------------------------------------------------
# Llama 3's RoPE (a base model's own block, e.g. Llama-3.2-1B: x32 over 8,192)
# ----------------------------------------------------------------------------
LLAMA3_FACTORS = [8.0, 32.0]  # Llama 3.1, Llama 3.2


def llama3_block(factor: float, base: float = 500_000.0, original: int = 8192, low: float = 1.0, high: float = 4.0):
    return {
        "rope_type": "llama3",
        "rope_theta": base,
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def test_llama3_reference_keeps_short_waves_and_slows_long_ones():
    block = llama3_block(32.0)
    freqs, attention_factor = rope_frequencies(block, 64)
    plain, _ = rope_frequencies({"rope_type": "default", "rope_theta": 500_000.0}, 64)
    wavelength = 2 * math.pi / plain
    assert attention_factor == 1.0
    assert torch.equal(freqs[wavelength < 8192 / 4], plain[wavelength < 8192 / 4])
    assert torch.allclose(freqs[wavelength > 8192], plain[wavelength > 8192] / 32, rtol=0, atol=0)
    middle = (wavelength >= 8192 / 4) & (wavelength <= 8192)
    assert middle.any() and ((freqs[middle] < plain[middle]) & (freqs[middle] > plain[middle] / 32)).all()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("factor", LLAMA3_FACTORS)
@pytest.mark.parametrize(("low", "high"), [(1.0, 4.0), (2.0, 8.0)])
def test_transformers_llama3(hf, head_dim, factor, low, high):
    block = llama3_block(factor, low=low, high=high)
    got_inv, got_factor = hf.init(head_dim, 1.0, block, 131_072)
    want_inv, want_factor = rope_frequencies(block, head_dim)
    assert_inv_freq("transformers", got_inv, want_inv, factor, f"{block} head_dim={head_dim}")
    assert_attention_factor("transformers", got_factor, want_factor, f"{block}")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("factor", LLAMA3_FACTORS)
def test_megatron_llama3(hf, megatron, head_dim, factor):
    """RotaryEmbedding built from megatron_gpt_rope_kwargs, as the model builder builds it."""
    from nemo_rl.rope.megatron_config import megatron_gpt_rope_kwargs

    block = llama3_block(factor)
    kwargs = megatron_gpt_rope_kwargs(hf.config(head_dim, 1.0, block, 131_072))
    assert (kwargs["position_embedding_type"], kwargs["rope_scaling"]) == ("rope", True)
    rope = megatron.RotaryEmbedding(
        kv_channels=head_dim,
        rotary_percent=kwargs["rotary_percent"],
        rotary_base=kwargs["rotary_base"],
        rope_scaling=kwargs["rope_scaling"],
        rope_scaling_factor=kwargs["rope_scaling_factor"],
        use_cpu_initialization=True,
    )
    want_inv, want_factor = rope_frequencies(block, head_dim)
    positions, cos, sin, inv_freq = megatron_table(rope, 131_072, head_dim // 2)
    assert_inv_freq("megatron-core", inv_freq, want_inv, factor, f"{block}")
    assert_cos_sin("megatron-core", positions, cos, sin, want_inv, want_factor, factor, f"{block}")


def test_megatron_refuses_llama3_values_it_would_not_build(hf):
    """megatron-core 0.16 takes only the factor: other low/high/original values would be silently replaced."""
    with pytest.raises(ValueError, match=r"low_freq_factor: 2\.0, but megatron-core 0\.16 builds .* low_freq_factor=1"):
        megatron_rope_fields(hf.config(64, 1.0, llama3_block(8.0, low=2.0), 131_072))
    with pytest.raises(ValueError, match=r"original_max_position_embeddings: 4096"):
        megatron_rope_fields(hf.config(64, 1.0, llama3_block(8.0, original=4096), 131_072))
    assert megatron_rope_fields(hf.config(64, 1.0, llama3_block(32.0), 131_072)) == {}


@pytest.mark.parametrize("factor", LLAMA3_FACTORS)
def test_vllm_llama3(vllm_rope, factor):
    block = llama3_block(factor)
    rope = vllm_rope(64, 131_072, block)
    want_inv, want_factor = rope_frequencies(block, 64)
    positions, cos, sin = vllm_table(rope, 32)
    assert_cos_sin("vLLM", positions, cos, sin, want_inv, want_factor, factor, f"{block}")
