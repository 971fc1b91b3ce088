"""uv run tools/expand_recipe.py RECIPE.yaml [key=value ...] [--check-minimal]

Prints a recipe fully expanded: its `defaults:` chain merged, overrides
applied, interpolations such as the YaRN `factor: ${div:...}` resolved. This
is exactly what the run would validate. With --check-minimal it lists instead
the keys the recipe sets to the value its defaults already give, and exits 1
if there are any (CI keeps every recipe in the tree minimal).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from nemo_rl.config.loader import load_config, redundant_keys, resolve_config
from nemo_rl.utils.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra-syntax overrides, as on a run's command line")
    parser.add_argument(
        "--check-minimal", action="store_true", help="list keys that repeat the defaults; exit 1 if any"
    )
    args = parser.parse_intermixed_args(argv)
    try:
        if args.check_minimal:
            repeated = redundant_keys(args.recipe)
            for key in repeated:
                print(f"{args.recipe}: {key} repeats the value of its defaults; delete it")
            return 1 if repeated else 0
        print(OmegaConf.to_yaml(resolve_config(load_config(args.recipe, args.overrides))), end="")
    except ConfigError as err:
        print(f"{args.recipe}:\n{err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
