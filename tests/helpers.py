"""Small builders shared by tests."""

from __future__ import annotations


def yarn_block(**changes) -> dict:
    """A complete, valid YaRN block (4x a 256-token window) with ``changes`` applied."""
    block = {
        "rope_type": "yarn",
        "rope_theta": 10000,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "truncate": True,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1,
        "mscale_all_dim": 0,
    }
    block.update(changes)
    return block
