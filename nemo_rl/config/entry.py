"""What every entry script does around its algorithm: parse the command line, validate, run, report bad input.

A bad recipe (including a problem found while setting up, such as vLLM
arguments that contradict the policy's RoPE) exits with status 2 and every
problem listed, never with a traceback from deep inside a run; so does a data
file the run cannot use (named with its row), found before anything is written.
A worker process that dies mid-run stops it with status 1 and one line naming
the worker's role, rank and node.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nemo_rl.config.loader import load_config, parse_args, resolve_config
from nemo_rl.utils.errors import ConfigError, DataError, WorkerDied


def run_entry(
    argv: Sequence[str] | None,
    default_config: Path,
    validate: Callable[[Mapping[str, Any]], Any],
    run: Callable[[Any, dict[str, Any]], int],
) -> int:
    """``run(typed_config, resolved_dict)`` once the recipe and overrides validate; its exit status is returned."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path, overrides = parse_args(argv, default_config=str(default_config))
    try:
        resolved = resolve_config(load_config(config_path, overrides))
        return run(validate(resolved), resolved)
    except ConfigError as err:
        print(f"Invalid configuration ({config_path}):\n{err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"Invalid data: {err}", file=sys.stderr)
        return 2
    except WorkerDied as err:
        print(f"Run stopped: {err}", file=sys.stderr)
        return 1
