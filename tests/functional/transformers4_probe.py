"""Run under transformers 4 (see test_transformers4_compat.py): print how the translations write a config.

transformers 4 spells the block ``rope_scaling`` with ``rope_theta`` as a separate
config attribute; transformers 5 folds both into ``rope_parameters``. This
script only needs the config classes, so it runs without torch.
"""

import json
import sys
import warnings

from transformers import Qwen2Config, __version__

from nemo_rl.rope.hf_config import apply_hf_config_overrides, hf_rope_parameters, rope_theta_of
from nemo_rl.rope.vllm_engine import vllm_engine_kwargs
from tests.helpers import yarn_block

# Integer-valued fields on purpose: the translations must write them in their declared (float) types.
YARN = yarn_block(rope_theta=1000000, factor=4)
LINEAR = {"rope_type": "linear", "rope_theta": 1000000, "factor": 2}


def main() -> None:
    base = Qwen2Config(hidden_size=128, num_attention_heads=2, max_position_embeddings=256, rope_theta=1e6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yarn = apply_hf_config_overrides(base, {"rope_scaling": YARN}, 1024)
        linear = apply_hf_config_overrides(base, {"rope_parameters": LINEAR}, 512)
        vllm = vllm_engine_kwargs(base, {"rope_scaling": YARN}, 1024)
    result = {
        "transformers": __version__,
        "has_rope_parameters": hasattr(yarn, "rope_parameters"),
        "yarn_rope_scaling": yarn.rope_scaling,
        "yarn_rope_theta": yarn.rope_theta,
        "yarn_max_position_embeddings": yarn.max_position_embeddings,
        "yarn_read_back": hf_rope_parameters(yarn),
        "yarn_theta_read_back": rope_theta_of(yarn),
        "linear_rope_scaling": linear.rope_scaling,
        "linear_rope_theta": linear.rope_theta,
        "vllm": vllm,
        "warnings": [str(w.message) for w in caught],
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
