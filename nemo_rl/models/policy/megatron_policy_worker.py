"""The Megatron policy worker: one Ray actor per model-parallel rank, or one object in the calling process.

Each worker joins a torch.distributed group (NCCL on GPUs, gloo on CPU), builds
megatron-core's GPTModel from the cached converted checkpoint, and trains it
with megatron-core's own DDP, optimizer, LR scheduler and forward/backward
schedule, so a CPU run and a GPU run execute the same code.

``MegatronPolicyWorker.in_process`` is the same worker without Ray (world size
1, its own torch.distributed world in this process): what a check on a lone
device runs (``tools/gpu_check.py``), where neither Ray nor vLLM is installed.
This module therefore imports neither.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nemo_rl.data.token_alignment import align_to_predictions
from nemo_rl.distributed.parallel_dims import ParallelDims
from nemo_rl.distributed.worker_process_group import free_port, init_worker_process_group
from nemo_rl.models.generation.weight_sync import BucketHeader, RefitSender
from nemo_rl.models.megatron.context_parallel import (
    gather_context_parallel,
    single_sample_rows,
    split_for_context_parallel,
)
from nemo_rl.models.megatron.cpu_compat import (
    enable_cpu_compat,
    pause_redirect_in_optimizer_update,
    without_device_redirect,
)
from nemo_rl.models.megatron.fused_adam import use_fused_adam
from nemo_rl.models.megatron.optimizer_state import (
    check_optimizer_layout,
    load_optimizer_state,
    optimizer_layout,
    optimizer_shard,
)
from nemo_rl.models.megatron.parallel_weights import (
    ShardLayout,
    layer_groups,
    merge_shards,
    optimizer_shard_file_name,
    shard_file_name,
    stage_tensors,
    tp_partition_dim,
)
from nemo_rl.models.policy.interfaces import (
    LossFunction,
    MegatronWorkerInterface,
    WorkerLogprobsWithReference,
    model_output_of,
)
from nemo_rl.models.policy.loss_metrics import micro_batch_totals
from nemo_rl.models.policy.micro_batches import concat_rows
from nemo_rl.models.policy.reference_weights import ReferenceWeights, logprobs_with_reference, scoring_weights

logger = logging.getLogger(__name__)

# megatron-core announces each optional fused-kernel package it falls back from, in every worker.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed", category=UserWarning)
warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
# With float32 parameters the distributed optimizer's shards are views of them, whose ``.grad`` its zero_grad
# reads; torch warns at each non-leaf read, and on CPU names the device redirect as the caller.
warnings.filterwarnings(
    "ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor", category=UserWarning
)


def check_dims_match_process_groups(dims: ParallelDims) -> None:
    """megatron-core's process groups must be the layout the driver splits batches for, or ranks would
    silently train on the wrong shards."""
    from megatron.core import parallel_state

    built = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "dp_cp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    }
    expected = {"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "dp": dims.dp, "dp_cp": dims.dp_cp}
    if built != expected:
        raise RuntimeError(f"megatron-core built process groups of sizes {built}; the layout is {expected}")


def end_distributed_world() -> None:
    """megatron-core's parallel state and this process's torch.distributed world, ended (nothing to end is fine)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def token_logprobs_from_megatron_loss(per_token_ce: torch.Tensor) -> torch.Tensor:
    """Megatron returns cross-entropy of each position's *next* token; its negation is that token's logprob."""
    return -per_token_ce.float()


def logprobs_at_tokens(predicted: torch.Tensor) -> torch.Tensor:
    """Per-position next-token log-probs ([B, L], position t scores token t+1) re-indexed by the token scored.

    Token 0 of a sequence has no prediction and gets 0; so do the padding
    positions' values, which no consumer reads.
    """
    out = torch.zeros_like(predicted)
    out[:, 1:] = predicted[:, :-1]
    return out


def _loss_input(kind: str, output: torch.Tensor) -> torch.Tensor:
    """What a loss asked for (``model_output_of``) from GPTModel's output: per-token CE, or ``[B, L, *]`` head output."""
    if kind == "token_logprobs":
        return token_logprobs_from_megatron_loss(output)
    if kind == "scores":
        return output[..., 0].float()  # the scalar head's [B, L, 1]
    return output.float()  # "logits": this TP rank's slice of the vocabulary


def _next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Label at position t is token t+1; the last position gets a dummy label that masks exclude."""
    labels = torch.roll(input_ids, shifts=-1, dims=1)
    labels[:, -1] = 0
    return labels


class MegatronPolicyWorker(RefitSender):
    def __init__(
        self,
        policy_cfg,
        model_path: str,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        seed: int,
        init_reference_model: bool = False,
        reward_head: bool = False,
        trainable: bool = True,
    ) -> None:
        """``reward_head`` builds a reward model: the transformer with a scalar head (see ``reward_head``).

        A model that is never trained (``trainable=False``: a distillation
        teacher) gets no optimizer, so it holds no fp32 master weights or Adam
        moments: only its parameters take accelerator memory.
        """
        self.cfg = policy_cfg
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.reward_head = reward_head
        self._init_distributed(rank, world_size, master_addr, master_port)
        self._init_model_parallel(seed)
        self.checkpoint_dir, self.converted_now = self._ensure_converted(Path(model_path))
        self._build_model()
        self.trainable = trainable
        if trainable:
            self._build_optimizer()
        self.reference = ReferenceWeights(self.model.module) if init_reference_model else None

    @classmethod
    def in_process(cls, policy_cfg, model_path: str | Path, seed: int, **kwargs: Any) -> MegatronPolicyWorker:
        """The worker as an object of this process: world size 1, rendezvous on a free local port.

        ``kwargs`` are the constructor's (``trainable``, ``reward_head``, ...).
        megatron-core's parallel state is global to a process, so one worker
        lives at a time; ``shutdown`` ends its world and the next can start.
        """
        return cls(
            policy_cfg,
            str(model_path),
            rank=0,
            world_size=1,
            master_addr="127.0.0.1",
            master_port=free_port(),
            seed=seed,
            **kwargs,
        )

    # ------------------------------------------------------------------ setup
    def _init_distributed(self, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        self.cpu = enable_cpu_compat()
        self.device = init_worker_process_group(rank, world_size, master_addr, master_port)

    def _init_model_parallel(self, seed: int) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        self.dims = ParallelDims.for_world(self.cfg, self.world_size)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.dims.tp,
            pipeline_model_parallel_size=self.dims.pp,
            context_parallel_size=self.dims.cp,
            # megatron's extra gloo data-parallel groups serve only the optimizer's dp_zero format; its shards are
            # saved dp_reshardable (optimizer_state), and each group would be one more idle event loop
            create_gloo_process_groups=False,
        )
        check_dims_match_process_groups(self.dims)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        # The distributed optimizer shards over data x context parallel ranks; this one's rank 0 writes checkpoints.
        self.dp_cp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        self.layout = ShardLayout.of(self.dims, self.tp_rank, self.pp_rank)

    def _ensure_converted(self, model_path: Path) -> tuple[Path, bool]:
        """Global rank 0 converts (under the cache's file lock); everyone else waits, then loads."""
        from nemo_rl.models.megatron import checkpoint_cache

        overrides = self.cfg.effective_hf_config_overrides
        converted_now = False
        if self.rank == 0:
            _, converted_now = checkpoint_cache.ensure_converted(
                model_path,
                self.cfg.model_name,
                overrides,
                self.cfg.max_total_sequence_length,
                force_reconvert=self.cfg.megatron_cfg.force_reconvert_from_hf,
            )
        torch.distributed.barrier()
        return checkpoint_cache.converted_checkpoint_dir(self.cfg.model_name, overrides), converted_now

    def _build_model(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from safetensors import safe_open
        from transformers import AutoConfig

        from nemo_rl.models.megatron.checkpoint_cache import WEIGHTS_FILE
        from nemo_rl.models.megatron.model_builder import build_gpt_model, transformer_config_from_hf
        from nemo_rl.models.megatron.parallel_weights import shard_state
        from nemo_rl.models.megatron.reward_head import SCORE_WEIGHT, attach_scalar_head, reward_model_config

        mcfg = self.cfg.megatron_cfg
        self.hf_config = AutoConfig.from_pretrained(self.checkpoint_dir)
        if self.reward_head:
            self.hf_config = reward_model_config(self.hf_config)
        self.tf_config = transformer_config_from_hf(
            self.hf_config,
            self.cfg.precision,
            self.dims,
            activation_checkpointing=mcfg.activation_checkpointing,
        )
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        model = build_gpt_model(
            self.hf_config,
            self.tf_config,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        dtype = self.tf_config.params_dtype
        if self.reward_head:
            attach_scalar_head(model, self.hf_config, self.dims.sequence_parallel, dtype, self.seed)
        local_names = [k for k in model.state_dict() if not k.endswith("_extra_state")]
        with safe_open(str(self.checkpoint_dir / WEIGHTS_FILE), framework="pt") as weights:
            available = set(weights.keys())
            # A causal LM has no score head: the reward model keeps the freshly initialised one.
            local_names = [k for k in local_names if k != SCORE_WEIGHT or k in available]

            def read_full(name: str) -> torch.Tensor:
                if name not in available:
                    raise KeyError(name)
                return weights.get_tensor(name).to(dtype)

            state = shard_state(local_names, read_full, self.layout, self.hf_config.num_hidden_layers)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state") and k != SCORE_WEIGHT]
        if missing or unexpected:
            raise RuntimeError(
                f"converted checkpoint does not fit the model: missing={missing} unexpected={unexpected}"
            )
        model.to(self.device)
        self.model = DistributedDataParallel(
            self.tf_config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=mcfg.optimizer.use_distributed_optimizer,
            ),
            model,
        )

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        ocfg = self.cfg.megatron_cfg.optimizer
        scfg = self.cfg.megatron_cfg.scheduler
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=ocfg.optimizer,
                lr=ocfg.lr,
                min_lr=ocfg.min_lr,
                weight_decay=ocfg.weight_decay,
                adam_beta1=ocfg.adam_beta1,
                adam_beta2=ocfg.adam_beta2,
                adam_eps=ocfg.adam_eps,
                clip_grad=self.cfg.max_grad_norm,
                bf16=self.tf_config.bf16,
                fp16=self.tf_config.fp16,
                params_dtype=self.tf_config.params_dtype,
                use_distributed_optimizer=ocfg.use_distributed_optimizer,
            ),
            [self.model],
            use_gloo_process_groups=False,  # none were made, see _init_model_parallel
        )
        use_fused_adam(self.optimizer)
        pause_redirect_in_optimizer_update(self.optimizer)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=scfg.lr_warmup_init,
            max_lr=ocfg.lr,
            min_lr=ocfg.min_lr,
            lr_warmup_steps=scfg.lr_warmup_iters,
            lr_decay_steps=max(scfg.lr_decay_iters, scfg.lr_warmup_iters + 1),
            lr_decay_style=scfg.lr_decay_style,
            start_wd=ocfg.weight_decay,
            end_wd=ocfg.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )

    # -------------------------------------------------------------- compute
    def _prepare(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """Per-token model inputs of a micro-batch on this rank, and megatron's PackedSeqParams if packed.

        Next-token labels and the loss's per-token fields are aligned on the whole
        sequence first; only then does context parallelism take this rank's
        chunks of each packed sample.
        """
        from megatron.core.packed_seq_params import PackedSeqParams

        input_ids = batch["input_ids"]
        b, length = input_ids.shape
        tokens = {
            "input_ids": input_ids,
            "labels": _next_token_labels(input_ids),
            "position_ids": batch.get("position_ids", torch.arange(length).unsqueeze(0).expand(b, -1)),
        }
        tokens |= align_to_predictions(batch)
        if "cu_seqlens" not in batch:
            tokens |= {k: v for k, v in batch.items() if v.dim() == 1}  # per-sample fields, e.g. input_lengths
            return {k: v.to(self.device) for k, v in tokens.items()}, None
        cu_seqlens = batch["cu_seqlens"]
        if self.dims.cp > 1:
            tokens = split_for_context_parallel(tokens, cu_seqlens, self.dims.cp, self.cp_rank)
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu_seqlens = cu_seqlens.to(self.device, torch.int32)
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
        return {k: v.to(self.device) for k, v in tokens.items()}, packed

    def _forward(self, model, inputs: dict[str, torch.Tensor], packed, with_labels: bool = True) -> torch.Tensor:
        """Per-token cross-entropy of each next token (``with_labels``), else vocab-parallel logits.

        On pipeline stages after the first, GPTModel ignores ``input_ids`` and
        reads the previous stage's activations, which the schedule sets.
        Attention is causal (per sample when packed) without a mask tensor, see
        ``SDPACoreAttention``.
        """
        return model(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            attention_mask=None,
            labels=inputs["labels"] if with_labels else None,
            packed_seq_params=packed,
        )

    def _run_schedule(
        self,
        microbatches: list[dict[str, torch.Tensor]],
        consume: Callable[[dict[str, torch.Tensor], torch.Tensor], tuple],
        forward_only: bool,
        with_labels: bool = True,
    ) -> list[dict[str, Any]]:
        """megatron-core's forward/backward schedule (pipelined when PP > 1) over the micro-batches.

        ``consume(batch, output)`` runs on the last pipeline stage and returns
        megatron's ``(loss, num_tokens, reported)``; the ``reported`` dicts come
        back (empty on other stages).
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        @without_device_redirect
        def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model):
            inputs, packed = self._prepare(next(data_iterator))
            return self._forward(model, inputs, packed, with_labels), without_device_redirect(partial(consume, inputs))

        # The length this rank's activations have (p2p shapes between pipeline stages).
        max_len = max(mb["input_ids"].shape[1] for mb in microbatches) // self.dims.cp
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[self.model],
            num_microbatches=len(microbatches),
            seq_length=max_len,
            micro_batch_size=microbatches[0]["input_ids"].shape[0],
            decoder_seq_length=max_len,
            forward_only=forward_only,
        )

    def _loss_schedule(
        self, microbatches: list[dict[str, torch.Tensor]], loss_fn: LossFunction, forward_only: bool
    ) -> list[dict[str, Any]]:
        kind = model_output_of(loss_fn)

        def consume(batch, output):
            return loss_fn(_loss_input(kind, output), batch)

        return self._run_schedule(microbatches, consume, forward_only, with_labels=kind == "token_logprobs")

    def train_step(self, microbatches: list[dict[str, torch.Tensor]], loss_fn: LossFunction) -> dict[str, Any]:
        """One optimizer step over this data-parallel rank's share of the global batch.

        megatron's ``finalize_model_grads`` all-reduces gradients over DP ranks and
        divides them by the loss counts summed over the global batch.
        """
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._loss_schedule(microbatches, loss_fn, forward_only=False)
        success, grad_norm, _ = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if success:
            self.scheduler.step(increment=1)
        return {
            "metrics": micro_batch_totals(outputs, loss_fn),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            "update_successful": bool(success),
        }

    @torch.no_grad()
    def evaluate(self, microbatches: list[dict[str, torch.Tensor]], loss_fn: LossFunction) -> dict[str, Any]:
        self.model.eval()
        return {"metrics": micro_batch_totals(self._loss_schedule(microbatches, loss_fn, forward_only=True), loss_fn)}

    def _collect(
        self,
        microbatches: list[dict[str, torch.Tensor]],
        output: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
        with_labels: bool,
    ) -> Any:
        """Forward-only pass whose per-micro-batch ``output(model_output)`` is concatenated in row order.

        Runs on every rank; the result exists on the last pipeline stage (None
        elsewhere), with each context-parallel rank's chunks put back in order.
        An ``output`` returning a tuple of ``[B, L, ...]`` tensors gives a tuple.
        Micro-batches of different lengths (token-budget batching) come back
        zero-padded to the longest.
        """
        from megatron.core import parallel_state

        def consume(batch, model_output):
            one = torch.ones((), dtype=torch.int, device=self.device)
            return torch.zeros((), device=self.device), one, {"out": output(model_output)}

        outputs = self._run_schedule(microbatches, consume, forward_only=True, with_labels=with_labels)
        if not parallel_state.is_pipeline_last_stage():
            return None
        is_tuple = isinstance(outputs[0]["out"], tuple)
        pieces = []
        for out, mb in zip(outputs, microbatches, strict=True):
            local = out["out"] if is_tuple else (out["out"],)
            if self.dims.cp > 1:
                group = parallel_state.get_context_parallel_group()
                local = tuple(gather_context_parallel(t, mb["cu_seqlens"], group) for t in local)
            pieces.append(tuple(t.cpu() for t in local))
        merged = tuple(concat_rows(parts) for parts in zip(*pieces, strict=True))
        return merged if is_tuple else merged[0]

    @torch.no_grad()
    def get_logits(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits [B, L, V] (gathered across TP and CP) on the last pipeline stage, else None."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        self.model.eval()
        batches = single_sample_rows(input_ids) if self.dims.cp > 1 else [{"input_ids": input_ids}]
        return self._collect(
            batches, lambda logits: gather_from_tensor_model_parallel_region(logits).float(), with_labels=False
        )

    @torch.no_grad()
    def get_logprobs(self, microbatches: list[dict[str, torch.Tensor]], reference: bool = False) -> torch.Tensor | None:
        """log p(x_t | x_<t) of every token ([B, L], 0 at t = 0) on the last pipeline stage, else None.

        Micro-batches are ``{"input_ids"}`` rows, or with context parallelism
        ``single_sample_rows``. ``reference`` scores with the starting weights
        (``init_reference_model``). Megatron's vocab-parallel cross-entropy gives
        each token's log-prob without gathering the logits.
        """
        self.model.eval()
        with scoring_weights(self.reference, reference):
            predicted = self._collect(microbatches, token_logprobs_from_megatron_loss, with_labels=True)
        return None if predicted is None else logprobs_at_tokens(predicted)

    def get_logprobs_with_reference(
        self, microbatches: list[dict[str, torch.Tensor]]
    ) -> WorkerLogprobsWithReference | None:
        """``get_logprobs`` of the live weights, then of the reference's, in one call: one Ray round trip and
        the micro-batches sent once for both, each pass timed (last pipeline stage, else None)."""
        return logprobs_with_reference(partial(self.get_logprobs, microbatches))

    @torch.no_grad()
    def get_topk_logprobs(
        self, microbatches: list[dict[str, torch.Tensor]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model's ``k`` most likely next tokens at every position: (log-probs, vocab ids), each ``[B, L, k]``.

        Indexed by the token they predict, like ``get_logprobs`` (row t describes
        the distribution of token t); computed on each TP rank's vocabulary
        slice without gathering the logits. Last pipeline stage only, else None.
        """
        from nemo_rl.models.megatron.vocab_parallel import megatron_tp_group, topk_logprobs

        self.model.eval()
        group = megatron_tp_group()
        predicted = self._collect(
            microbatches, lambda logits: topk_logprobs(logits.float(), k, group), with_labels=False
        )
        return None if predicted is None else tuple(logprobs_at_tokens(t) for t in predicted)

    @torch.no_grad()
    def get_scores(self, microbatches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """The reward model's score at every position ([B, L]) on the last pipeline stage, else None."""
        self.model.eval()
        return self._collect(microbatches, partial(_loss_input, "scores"), with_labels=False)

    @property
    def sends_refit(self) -> bool:
        return self.dp_cp_rank == 0 and self.tp_rank == 0

    def hf_weight_buckets(self, bucket_bytes: int, transport: str = "object_store") -> Iterator[BucketHeader | bytes]:
        """This pipeline stage's weights under HF names, in refit buckets over ``transport`` (see ``weight_sync``).

        Run as a Ray streaming generator on every worker. Only the first
        data-parallel replica (first CP rank) takes part: its TP ranks gather
        each TP-split tensor in turn, and TP rank 0 converts the stage layer by
        layer (global layer numbers) and sends, so no worker holds more than
        one layer and one bucket.
        """
        from nemo_rl.models.generation.weight_sync import bucketed, publish

        if self.dp_cp_rank != 0:
            return
        hf = self._hf_stage_weights()
        if self.sends_refit:
            yield from publish(bucketed(hf, bucket_bytes), transport, self.weight_group)
        else:
            deque(hf, maxlen=0)  # this rank's part is its slices in TP rank 0's gathers

    def _hf_stage_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This pipeline stage's weights under HF names, one full tensor at a time (a collective over TP: every
        TP rank of the first data-parallel replica iterates it; TP rank 0's tensors are the full ones)."""
        from nemo_rl.models.megatron.hf_weights import megatron_to_hf

        state = self.model.module.state_dict()
        full = stage_tensors(
            state,
            partial(self._tp_slices, state),
            self.layout,
            self.hf_config.num_hidden_layers,
            self.hf_config.tie_word_embeddings,
        )
        return (item for layer in layer_groups(full) for item in megatron_to_hf(layer, self.hf_config).items())

    def _tp_slices(self, state: dict[str, torch.Tensor], local: str) -> list[torch.Tensor]:
        """Every TP rank's slice of a stage-local tensor; a collective, called in state-dict order on each TP rank."""
        from megatron.core import parallel_state

        tensor = state[local]
        if self.layout.tp_size == 1 or tp_partition_dim(local) is None:
            return [tensor]
        slices = [torch.empty_like(tensor) for _ in range(self.layout.tp_size)]
        group = parallel_state.get_tensor_model_parallel_group()
        torch.distributed.all_gather(slices, tensor.contiguous(), group=group)
        return slices

    def gathered_state(self, what: str = "params") -> dict[str, torch.Tensor] | None:
        """Full Megatron tensors (global names) of the parameters or their reduced gradients, on global rank 0.

        Gradients are DDP's ``main_grad`` after the last ``train_step`` (reduced over
        DP and divided by the global token count; clipping scales them in place).
        """
        module = self.model.module
        if what == "params":
            local = {k: v.detach().cpu() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
        elif what == "grads":
            self._complete_grad_buffers()
            local = {name: p.main_grad.detach().float().cpu() for name, p in module.named_parameters()}
        else:
            raise ValueError(f"what must be 'params' or 'grads', got {what!r}")
        return self._gather_full(local)

    def _complete_grad_buffers(self) -> None:
        """Make every rank's ``main_grad`` the full reduced gradient again.

        With the distributed optimizer DDP reduce-scatters the gradient buffer:
        each rank's buffer is reduced (and then clipped by its optimizer) only in
        the shard that rank updates, the rest keeps its local, unreduced
        gradients. All-gathering the shards gives what the plain optimizer leaves
        in ``main_grad``; the next ``train_step`` zeroes the buffer anyway.
        """
        from megatron.core.distributed.param_and_grad_buffer import shard_buffer

        if not self._distributed_optimizer:
            return
        for group in self.model.bucket_groups + self.model.expert_parallel_bucket_groups:
            size, rank = (
                group.intra_distributed_optimizer_instance_size,
                group.intra_distributed_optimizer_instance_rank,
            )
            for bucket in group.buckets:
                torch.distributed.all_gather_into_tensor(
                    bucket.grad_data,
                    shard_buffer(bucket.grad_data, size)[rank],
                    group=group.intra_distributed_optimizer_instance_group,
                )

    def _gather_full(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Every model-parallel shard (from DP rank 0) merged into full tensors on global rank 0."""
        mine = (self.tp_rank, self.pp_rank, local) if self.dp_rank == 0 else None
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return None
        shards = {(tp, pp): state for tp, pp, state in filter(None, gathered)}
        return merge_shards(shards, self.hf_config.num_hidden_layers, self.hf_config.tie_word_embeddings)

    # ---------------------------------------------------------- persistence
    def _shard_file(self, directory: Path) -> Path:
        return directory / shard_file_name(self.tp_rank, self.pp_rank)

    def _optimizer_shard_file(self, directory: Path) -> Path:
        return directory / optimizer_shard_file_name(self.tp_rank, self.pp_rank, self.dp_cp_rank)

    @property
    def _distributed_optimizer(self) -> bool:
        return self.model.ddp_config.use_distributed_optimizer

    def save_checkpoint(self, directory: str) -> None:
        """Model, optimizer, scheduler and RNG of this model-parallel shard (written by its DP x CP rank 0).

        Each rank of a distributed optimizer holds only its shard of the master
        weights and Adam moments, so each also writes that shard to a file of its own.
        """
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        if self._distributed_optimizer:
            torch.save(optimizer_shard(self.optimizer), self._optimizer_shard_file(Path(directory)))
        if self.dp_cp_rank != 0:
            return
        state = {
            "model": self.model.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),  # a distributed optimizer's: all but the sharded tensors
            "optimizer_layout": optimizer_layout(self._distributed_optimizer, self.dims.dp_cp),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()},
        }
        torch.save(state, self._shard_file(Path(directory)))
        if self.rank == 0:  # the RoPE-carrying config makes the checkpoint exportable on its own
            self.hf_config.save_pretrained(directory)

    def load_checkpoint(self, directory: str) -> None:
        """Resume this shard from a ``step_N`` directory; a forward-only worker (``trainable=False``: one that
        scores or evaluates a trained policy) takes only the weights and never reads the optimizer shards."""
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        path = self._shard_file(Path(directory))
        state = torch.load(path, map_location=self.device, weights_only=False)
        if not self.trainable:
            self.model.module.load_state_dict(state["model"])
            return
        check_optimizer_layout(path, state.get("optimizer_layout"), self._distributed_optimizer, self.dims.dp_cp)
        self.model.module.load_state_dict(state["model"])
        shard = None
        if self._distributed_optimizer:
            shard = torch.load(self._optimizer_shard_file(Path(directory)), map_location=self.device)
        load_optimizer_state(self.optimizer, state["optimizer"], shard)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        get_cuda_rng_tracker().set_states(state["rng"]["tracker"])

    def export_hf(self, directory: str, model_dir: str | None = None, tokenizer_dir: str | None = None) -> None:
        """Write an HF directory (safetensors + config.json carrying the RoPE overrides).

        The generation config (stop tokens) comes from ``model_dir``, the HF model
        the run started from, and the tokenizer from ``tokenizer_dir``.

        Streamed: each pipeline stage's TP rank 0 writes its stage's files while
        its TP peers gather tensor by tensor, so no rank holds the whole model;
        global rank 0 then joins the stages' weight maps.
        """
        from nemo_rl.models.megatron.hf_export import finish_hf_directory, write_weight_files

        out = Path(directory)
        written = None
        if self.dp_cp_rank == 0:
            hf = self._hf_stage_weights()
            if self.sends_refit:
                written = write_weight_files(hf, self.hf_config, out, stem=f"model-pp{self.pp_rank:02d}")
            else:
                deque(hf, maxlen=0)
        everyone: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(written, everyone, dst=0)
        if everyone is not None:
            finish_hf_directory(out, [w for w in everyone if w is not None], self.hf_config, model_dir, tokenizer_dir)

    def info(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "dp_rank": self.dp_rank,
            "tp_rank": self.tp_rank,
            "pp_rank": self.pp_rank,
            "cp_rank": self.cp_rank,
            "checkpoint_dir": str(self.checkpoint_dir),
            "converted_now": self.converted_now,
            "device": str(self.device),
        }

    def shutdown(self) -> None:
        """Ends the worker's distributed world (a Ray actor then exits; an in-process worker leaves the process
        free for the next one)."""
        end_distributed_world()


if TYPE_CHECKING:  # basedpyright holds the worker to the contract ``Policy`` dispatches to
    _conforms: type[MegatronWorkerInterface] = MegatronPolicyWorker
