"""The one place that decides what ``policy.hf_config_overrides`` means.

The same override block changes the HF config, the Megatron model, the vLLM
engine and the name of the converted-checkpoint cache. If each of those read the
raw dict on its own, two spellings of one setting (``rope_scaling`` vs the newer
transformers ``rope_parameters``, ``type`` vs ``rope_type``) or a float written as
``2`` in one recipe and ``2.0`` in another could make the trainer and the
generator disagree, or make one model occupy two cache entries. So the block is
parsed once into a typed form and every consumer reads typed fields:

- ``blocks``: the typed blocks and their parsing (one ConfigError lists every problem);
- ``rules``: what a run may ask of the block (coverage, backend, no-op notes, the effective overrides);
- ``canonical``: the canonical JSON and the hash that names the converted-checkpoint cache;
- ``hf_config``, ``megatron_config``, ``vllm_engine``: the block in each engine's terms;
- ``reference``: the float64 math every engine is tested against (the only module that imports torch).

Everything but ``reference`` is plain Python, so validating a config imports neither torch nor an engine.
"""
