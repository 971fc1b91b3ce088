"""The errors user mistakes in configs and data files become, and the did-you-mean helper their messages use.

They sit at the bottom of the layers so that every layer (RoPE parsing, the config
schema, the data readers) can raise them and the entry scripts can report them
as one line, without importing the layer that raised.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Every problem found in a configuration, reported together.

    Users fix recipes in one edit instead of one failed launch per mistake, so
    loaders and validators collect messages and raise once.
    """

    def __init__(self, messages: str | Iterable[str]):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


def nearest_key(key: str, candidates: Iterable[str]) -> str | None:
    """The closest spelling among `candidates`, or None when nothing is plausibly meant."""
    matches = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


class DataError(ValueError):
    """A data file the run cannot use; the message names the file (and row) and the fix.

    One line, ``<file>: row N: <what is wrong>; <the fix>`` (see ``nemo_rl.data.rows``),
    which entry scripts report like a bad config instead of a traceback.
    """


class MissingDataFile(DataError, FileNotFoundError):
    """A configured data file that does not exist."""


class WorkerDied(RuntimeError):
    """A process of a running job died; the message names its role, rank, node and pid (``ActorRoster``).

    Not a user mistake, but neither is Ray's actor-died traceback what a user
    needs: entry scripts report it as one line and exit with status 1.
    """
