"""Per-device memory of a Megatron policy layout, from the HF config alone, before anything is launched.

A user choosing 64k tokens on 8 GPUs needs to know whether it fits before a
multi-minute start-up fails with an out-of-memory error. Everything here is
counted from the model's shape and the run's layout (``ParallelDims``), the
way megatron-core lays the model out: weight matrices split over TP, layers
over PP, the sequence over CP (and over TP with sequence parallelism),
gradients in fp32 buckets, Adam's fp32 state sharded over DP x CP by the
distributed optimizer. Activations are counted tensor by tensor for the
pre-norm SwiGLU block with a fused (flash/efficient SDPA) attention, which
stores no sequence x sequence scores. Allocator fragmentation and framework
workspaces are not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nemo_rl.distributed.parallel_dims import ParallelDims

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layout:
    """What the estimate needs of a run: its parallel layout and the shape of one training micro-batch."""

    dims: ParallelDims
    precision: str
    sequence_length: int  # tokens per micro-batch row (policy.max_total_sequence_length)
    micro_batch: int  # rows
    recompute: bool  # policy.megatron_cfg.activation_checkpointing: full recomputation, one layer at a time
    distributed_optimizer: bool
    vllm_memory_fraction: float | None = None  # colocated engines: vLLM's gpu_memory_utilization
    device_gib: float = 80.0
    reference_model: bool = False  # DPO and GRPO score with the starting weights (a host copy, ReferenceWeights)

    @classmethod
    def of_run(cls, cfg, device_gib: float = 80.0) -> Layout:
        """The layout a validated run config (of any algorithm) trains with on devices of ``device_gib``."""
        policy = cfg.policy
        generation = getattr(policy, "generation", None)
        vllm_fraction = None
        if generation is not None and generation.colocated.enabled:
            vllm_fraction = generation.vllm_kwargs.get("gpu_memory_utilization", 0.9)
        return cls(
            dims=ParallelDims.from_config(policy, cfg.cluster),
            precision=policy.precision,
            sequence_length=policy.max_total_sequence_length,
            # A packed micro-batch is one row of max_total_sequence_length tokens; a preference pair two rows.
            micro_batch=1 if policy.sequence_packing.enabled else policy.train_micro_batch_size * cfg.rows_per_sample,
            recompute=policy.megatron_cfg.activation_checkpointing,
            distributed_optimizer=policy.megatron_cfg.optimizer.use_distributed_optimizer,
            vllm_memory_fraction=vllm_fraction,
            device_gib=device_gib,
            reference_model=cfg.keeps_reference_model,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest device (the first pipeline stage holds the embedding, the last the output layer)."""

    parameters: int  # this device's share
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    vllm: int  # colocated engines' reservation while they generate (0 when they have their own devices)
    # Host memory, not the device's: the reference weights' copy, and the live weights' while the reference scores.
    host_reference: int = 0

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def generation(self) -> int:
        """While colocated engines generate, the trainer's state stays resident next to their reservation."""
        return self.weights + self.gradients + self.optimizer + self.vllm

    @property
    def peak(self) -> int:
        return max(self.training, self.generation)

    def rows(self) -> list[tuple[str, float]]:
        parts = ("weights", "gradients", "optimizer", "activations", "logits", "vllm")
        return [(part, getattr(self, part) / GIB) for part in parts] + [("peak", self.peak / GIB)]


def _attention_widths(hf_config) -> tuple[int, int]:
    """(query width, key/value width) of one layer: head_dim can differ from hidden / heads (Qwen3)."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return heads * head_dim, kv_heads * head_dim


def layer_parameters(hf_config, tp: int) -> int:
    """One transformer layer's parameters on one TP rank (norms are replicated, matrices split)."""
    h, ffn = hf_config.hidden_size, hf_config.intermediate_size
    q, kv = _attention_widths(hf_config)
    matrices = h * (q + 2 * kv) + q * h + 3 * h * ffn
    qkv_bias = q + 2 * kv if hf_config.model_type == "qwen2" or getattr(hf_config, "attention_bias", False) else 0
    head_dim = q // hf_config.num_attention_heads
    qk_norm = 2 * head_dim if hf_config.model_type == "qwen3" else 0
    return math.ceil((matrices + qkv_bias) / tp) + 2 * h + qk_norm


def stage_parameters(hf_config, dims: ParallelDims) -> int:
    """Parameters of the busiest pipeline stage on one TP rank."""
    h = hf_config.hidden_size
    vocab_shard = math.ceil(hf_config.vocab_size / dims.tp) * h
    layers = math.ceil(hf_config.num_hidden_layers / dims.pp) * layer_parameters(hf_config, dims.tp)
    tied = hf_config.tie_word_embeddings
    if dims.pp == 1:
        return layers + vocab_shard * (1 if tied else 2) + h  # embedding, output layer (unless tied), final norm
    return layers + vocab_shard + h  # first stage: embedding; last: output layer (a copy when tied) and norm


def activation_bytes(hf_config, layout: Layout) -> int:
    """Stored activations of one micro-batch on one device: every layer's saved tensors without recomputation;
    with full recomputation each layer's input, plus one layer's saved tensors while it is recomputed."""
    dims, width = layout.dims, BYTES[layout.precision]
    tokens = layout.micro_batch * math.ceil(layout.sequence_length / dims.cp)
    h, ffn = hf_config.hidden_size, hf_config.intermediate_size
    q, kv = _attention_widths(hf_config)
    replicated = 4 * h / (dims.tp if dims.sequence_parallel else 1)  # both norms' inputs and outputs
    split = (q + 2 * kv + q + 2 * ffn + ffn) / dims.tp  # q/k/v, attention output, gate and up, SwiGLU output
    per_layer = tokens * (replicated + split) * width
    layers = math.ceil(hf_config.num_hidden_layers / dims.pp)
    if not layout.recompute:
        return int(layers * per_layer)
    layer_input = tokens * h / (dims.tp if dims.sequence_parallel else 1) * width
    return int(layers * layer_input + per_layer)


def logits_bytes(hf_config, layout: Layout) -> int:
    """The last stage's vocabulary-parallel logits of one micro-batch in fp32, and their gradient."""
    tokens = layout.micro_batch * math.ceil(layout.sequence_length / layout.dims.cp)
    return 2 * 4 * tokens * math.ceil(hf_config.vocab_size / layout.dims.tp)


def estimate(hf_config, layout: Layout) -> MemoryEstimate:
    dims = layout.dims
    params = stage_parameters(hf_config, dims)
    width = BYTES[layout.precision]
    # Adam: two fp32 moments, plus an fp32 master copy when the weights are not fp32 themselves.
    state = (8 if width == 4 else 12) * params
    optimizer = state // dims.dp_cp if layout.distributed_optimizer else state
    vllm = int(layout.vllm_memory_fraction * layout.device_gib * GIB) if layout.vllm_memory_fraction else 0
    return MemoryEstimate(
        parameters=params,
        weights=params * width,
        gradients=params * 4,  # megatron-core's gradient buffers reduce in fp32 (grad_reduce_in_fp32)
        optimizer=optimizer,
        activations=activation_bytes(hf_config, layout),
        logits=logits_bytes(hf_config, layout),
        vllm=vllm,
        host_reference=2 * params * width if layout.reference_model else 0,
    )
