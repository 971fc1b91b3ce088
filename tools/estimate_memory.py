"""uv run tools/estimate_memory.py RECIPE.yaml [key=value ...] [--device-gib 80]

Per-device memory of a recipe's Megatron layout (nemo_rl/models/memory_estimate.py): weights,
gradients, optimizer states, activations (with the recipe's recomputation setting and without),
logits, and vLLM's reservation when the engines are colocated; before anything is launched.
The recipe is validated first, as a run would validate it. A hub model the recipe names is
stood in for by its locally built shape (nemo_rl/models/real_shape_models.py); nothing is
downloaded and no weights are built.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import (
    validate_distillation_config,
    validate_dpo_config,
    validate_grpo_config,
    validate_rm_config,
    validate_sft_config,
)
from nemo_rl.models.memory_estimate import GIB, Layout, estimate
from nemo_rl.models.real_shape_models import shape_for_hub_id
from nemo_rl.utils.errors import ConfigError

# The algorithm section a recipe carries, and the validation a run of that algorithm applies.
VALIDATORS = {
    "grpo": validate_grpo_config,
    "distillation": validate_distillation_config,
    "dpo": validate_dpo_config,
    "rm": validate_rm_config,
    "sft": validate_sft_config,
}


def model_config(model_name: str):
    """The HF config of the model a recipe names: a real shape's for hub ids, else the local/built-in model's."""
    shape = shape_for_hub_id(model_name)
    if shape is not None:
        return shape.config()
    from transformers import AutoConfig

    from nemo_rl.models.builtin_models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model_name))


def recipe_layout(recipe: Path, overrides: list[str], device_gib: float) -> tuple[str, Layout]:
    resolved = resolve_config(load_config(recipe, overrides))
    section = next((name for name in VALIDATORS if name in resolved), None)
    if section is None:
        raise ConfigError(f"{recipe}: no algorithm section ({', '.join(VALIDATORS)}); is it a run recipe?")
    cfg = VALIDATORS[section](resolved)
    policy = cfg.policy
    if not policy.megatron_cfg.enabled:
        raise ConfigError(f"{recipe}: policy.megatron_cfg.enabled is false; the estimate covers the Megatron backend")
    layout = Layout.of_run(cfg, device_gib)
    return policy.model_name, layout


def report(recipe: Path, overrides: list[str], device_gib: float) -> str:
    model_name, layout = recipe_layout(recipe, overrides, device_gib)
    hf_config = model_config(model_name)
    chosen = estimate(hf_config, layout)
    other = estimate(hf_config, dataclasses.replace(layout, recompute=not layout.recompute))
    d = layout.dims
    lines = [
        f"{recipe.name}: {model_name}, {layout.sequence_length:,} tokens x {layout.micro_batch}, {layout.precision}",
        f"  layout: {d.world_size} devices = TP {d.tp} x PP {d.pp} x CP {d.cp} x DP {d.dp}"
        f"{', SP' if d.sequence_parallel else ''}; {chosen.parameters:,} parameters on the busiest device",
        f"  {'GiB per device':<16}{'this recipe':>14}{'recompute ' + ('off' if layout.recompute else 'on'):>16}",
    ]
    for (part, gib), (_, other_gib) in zip(chosen.rows(), other.rows(), strict=True):
        lines.append(f"  {part:<16}{gib:>14.2f}{other_gib:>16.2f}")
    if chosen.host_reference:
        lines.append(
            f"  host memory per rank for the reference model (not on the device): {chosen.host_reference / GIB:.2f} GiB"
        )
    verdict = "fits" if chosen.peak <= device_gib * GIB else "does NOT fit"
    lines.append(f"  {verdict} in {device_gib:g} GiB (recompute {'on' if layout.recompute else 'off'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra-syntax overrides, as on a run's command line")
    parser.add_argument("--device-gib", type=float, default=80.0, help="memory of one GPU (H100: 80, H200: 141)")
    args = parser.parse_intermixed_args(argv)
    try:
        print(report(args.recipe, args.overrides, args.device_gib))
    except ConfigError as err:
        print(f"{args.recipe}:\n{err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
