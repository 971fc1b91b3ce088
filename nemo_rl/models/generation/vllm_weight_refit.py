"""The part of weight refit that runs inside vLLM's own worker processes.

vLLM runs its model in engine worker processes; ``LLM(worker_extension_cls=...)``
mixes this class into each of them, and ``LLM.collective_rpc("load_hf_weights",
...)`` calls it there. vLLM's in-place reload (``model_runner.reload_weights``)
then does what loading a checkpoint does (fusing q/k/v and gate/up, sharding
for vLLM's tensor parallelism, and redoing the post-load processing such as
CPU weight prepacking), so refit needs HF-named tensors only, exactly what
the policy workers export. A call may carry the whole model or one refit bucket
(``weight_sync``): a module whose tensors are not all in the call keeps its
weights, so buckets hold whole fused modules. The tensors travel as one
safetensors blob: vLLM's RPC serialiser keeps top-level tensors but not tensors
nested in containers, and safetensors is exact and framework-neutral.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load, save

EMBEDDING = "model.embed_tokens.weight"


def pack_weights(state: Mapping[str, torch.Tensor]) -> bytes:
    """HF-named tensors as the blob ``load_hf_weights`` receives."""
    return save({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()})


class WeightRefitExtension:
    def load_hf_weights(self, blob: bytes) -> int:
        """Load HF-named full tensors into the running model; returns how many tensors were sent.

        The tied output layer is refreshed by the call that carries the
        embedding, the only one that changes it (a later call restores the
        output layer as it is).
        """
        weights = load(blob)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))  # type: ignore[attr-defined]
        if EMBEDDING in weights:
            _refresh_tied_output_layer(self.model_runner.model)  # type: ignore[attr-defined]
        return len(weights)


def _refresh_tied_output_layer(model) -> None:
    """Redo the output layer's post-load processing when it shares the embedding's weight.

    vLLM's in-place reload processes a tied weight only as the embedding
    (its documented limitation); the output layer's own processing (on CPU, a
    pre-packed copy for the GEMM kernel) would keep the old weights and the
    generator would score tokens with stale logits.
    """
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or lm_head is embed or lm_head.weight is not embed.weight:
        return
    lm_head.quant_method.process_weights_after_loading(lm_head)
