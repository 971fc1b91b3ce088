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
nested in containers, and safetensors is exact and framework-neutral. Over the
flat transports (``weight_transports``) the call carries only the bucket's
layout (and IPC handle), pickled for the same serialiser, and the tensors come
over the weight group of the sender, which each vLLM worker joins once.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load, save

from nemo_rl.models.generation.weight_transports import (
    Rendezvous,
    all_loaded,
    broadcast,
    group_device,
    join_group,
    open_ipc_handle,
    unflatten,
)

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
        return self._reload(load(blob))

    def join_weight_group(self, sender: int, host: str, port: int, world_size: int, backend: str, offset: int) -> None:
        """Join ``sender``'s weight group as rank ``offset`` + this worker's rank in its engine."""
        rank = offset + self.rank  # type: ignore[attr-defined]
        self._weight_groups()[sender] = join_group(Rendezvous(host, port, world_size, backend), rank)

    def load_flat_hf_weights(self, header: bytes) -> int:
        """Load a bucket that ``weight_sync.publish`` sends over a weight group: ``header`` is the pickled
        (sender, layout, IPC handle or None). A shared buffer is dropped, and the sender told, once loaded."""
        sender, layout, handle = pickle.loads(header)
        group = self._weight_groups()[sender]
        if handle is None:
            flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=group_device(group))
            broadcast(group, flat)
            return self._reload(unflatten(layout, flat))
        loaded = self._reload(unflatten(layout, open_ipc_handle(handle, torch.cuda.current_device())))
        torch.cuda.synchronize()  # the copies out of the shared buffer are done before the sender frees it
        all_loaded(group)
        return loaded

    def _weight_groups(self) -> dict[int, Any]:
        """This vLLM worker's weight groups by sender (an extension has no constructor of its own)."""
        return self.__dict__.setdefault("_nemo_rl_weight_groups", {})

    def _reload(self, weights: Mapping[str, torch.Tensor]) -> int:
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
