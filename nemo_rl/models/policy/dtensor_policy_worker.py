"""The DTensor policy worker: the HF model itself, sharded with FSDP2, for runs without YaRN.

Some users want to train exactly the transformers module they will serve
(custom architectures, no conversion step). This worker does that: it loads the
HF model (with the run's non-RoPE-scaling ``hf_config_overrides``), shards every
decoder layer and the root with ``torch.distributed.fsdp.fully_shard`` over a
data-parallel device mesh (NCCL on GPUs, gloo on CPU) and trains it with a
torch optimizer. It has the Megatron worker's interface, so the Policy, the
losses and the algorithms do not know which backend runs.

YaRN runs belong to the Megatron backend (one RoPE definition, checked against
vLLM); the config check refuses YaRN with DTensor, and so does this worker.
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nemo_rl.data.token_alignment import align_to_predictions
from nemo_rl.distributed.worker_process_group import init_worker_process_group
from nemo_rl.models.generation.weight_sync import BucketHeader, RefitSender
from nemo_rl.models.megatron.hf_export import DTENSOR_CHECKPOINT, write_hf_files
from nemo_rl.models.policy.interfaces import LossFunction, WorkerLogprobsWithReference
from nemo_rl.models.policy.loss_metrics import micro_batch_totals
from nemo_rl.models.policy.megatron_policy_worker import logprobs_at_tokens
from nemo_rl.models.policy.micro_batches import concat_rows
from nemo_rl.models.policy.reference_weights import ReferenceWeights, logprobs_with_reference, scoring_weights
from nemo_rl.rope.hf_config import apply_hf_config_overrides
from nemo_rl.rope.rules import requests_yarn


class DTensorPolicyWorker(RefitSender):
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
    ) -> None:
        if requests_yarn(policy_cfg.effective_hf_config_overrides):
            raise ValueError(
                "policy.hf_config_overrides.rope_scaling: YaRN runs on the Megatron backend only; set "
                "policy.megatron_cfg.enabled=true and policy.dtensor_cfg.enabled=false"
            )
        self.cfg = policy_cfg
        self.rank = rank
        self.world_size = world_size
        self.model_path = Path(model_path)
        self.device = init_worker_process_group(rank, world_size, master_addr, master_port)
        torch.manual_seed(seed)
        self._build_model()
        self._build_optimizer()
        self.reference = ReferenceWeights(self.model) if init_reference_model else None

    def _build_model(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoConfig, AutoModelForCausalLM

        from nemo_rl.models.megatron.model_builder import DTYPES

        self.hf_config = apply_hf_config_overrides(
            AutoConfig.from_pretrained(self.model_path),
            self.cfg.effective_hf_config_overrides,
            self.cfg.max_total_sequence_length,
        )
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, config=self.hf_config, dtype=DTYPES[self.cfg.precision], attn_implementation="sdpa"
        )
        if self.cfg.dtensor_cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        self.model = fully_shard(model.to(self.device), mesh=mesh)

    def _build_optimizer(self) -> None:
        """The configured torch optimizer; norm weights and biases get no weight decay.

        Decaying them pulls norms towards 0 and biases towards 0 for no
        regularisation benefit; megatron-core and the HF Trainer exempt them
        too, which keeps the two backends' steps identical.
        """
        ocfg = self.cfg.optimizer
        module, _, name = ocfg.name.rpartition(".")
        optimizer_cls = getattr(importlib.import_module(module), name)
        params = list(self.model.parameters())
        groups = [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **ocfg.kwargs)

    # -------------------------------------------------------------- compute
    def _token_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """log p(x[t+1] | x[:t+1]) at every position t (the last one is a dummy that masks exclude)."""
        logits = self.model(input_ids=input_ids).logits.float()
        labels = torch.roll(input_ids, shifts=-1, dims=1)
        return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    def _prepared(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        aligned = align_to_predictions(batch)
        return {"input_ids": batch["input_ids"].to(self.device)} | {k: v.to(self.device) for k, v in aligned.items()}

    def train_step(self, microbatches: list[dict[str, torch.Tensor]], loss_fn: LossFunction) -> dict[str, Any]:
        """One optimizer step on sum(numerators) / (counts summed over every rank), as on the Megatron backend.

        FSDP averages gradients over the ranks during backward; scaling each
        rank's numerators by the world size makes that a sum, and the division
        by the global count happens once all counts are known (megatron's
        ``finalize_model_grads`` does the same).
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        outputs, count = [], torch.zeros((), device=self.device)
        for mb in microbatches:
            prepared = self._prepared(mb)
            numerator, num_tokens, reported = loss_fn(self._token_logprobs(prepared["input_ids"]), prepared)
            (numerator * self.world_size).backward()
            count += num_tokens
            outputs.append(reported)
        torch.distributed.all_reduce(count)
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.div_(count.clamp(min=1))
        max_norm = self.cfg.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        return {
            "metrics": micro_batch_totals(outputs, loss_fn),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "update_successful": True,
        }

    @torch.no_grad()
    def evaluate(self, microbatches: list[dict[str, torch.Tensor]], loss_fn: LossFunction) -> dict[str, Any]:
        self.model.eval()
        outputs = []
        for mb in microbatches:
            prepared = self._prepared(mb)
            outputs.append(loss_fn(self._token_logprobs(prepared["input_ids"]), prepared)[2])
        return {"metrics": micro_batch_totals(outputs, loss_fn)}

    @torch.no_grad()
    def get_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(input_ids=input_ids.to(self.device)).logits.float().cpu()

    @torch.no_grad()
    def get_logprobs(self, microbatches: list[dict[str, torch.Tensor]], reference: bool = False) -> torch.Tensor:
        """log p(x_t | x_<t) of every token ([B, L], 0 at t = 0); ``reference`` scores with the starting weights."""
        self.model.eval()
        with scoring_weights(self.reference, reference):
            predicted = [self._token_logprobs(mb["input_ids"].to(self.device)).cpu() for mb in microbatches]
        return logprobs_at_tokens(concat_rows(predicted))  # micro-batches trimmed to their own rows' length

    def get_logprobs_with_reference(
        self, microbatches: list[dict[str, torch.Tensor]]
    ) -> WorkerLogprobsWithReference | None:
        """``get_logprobs`` of the live weights, then of the reference's, in one call (see the Megatron worker's)."""
        return logprobs_with_reference(partial(self.get_logprobs, microbatches))

    @property
    def sends_refit(self) -> bool:
        return self.rank == 0

    def hf_weight_buckets(self, bucket_bytes: int, transport: str = "object_store") -> Iterator[BucketHeader | bytes]:
        """The policy's HF-named weights in refit buckets over ``transport`` (see ``weight_sync``).

        Run as a Ray streaming generator on every rank: each parameter is made
        whole in turn (``full_tensor``, a collective), and rank 0 sends, so it
        holds one bucket at a time.
        """
        from torch.distributed.tensor import DTensor

        from nemo_rl.models.generation.weight_sync import bucketed, publish

        full = (
            (name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor)
            for name, tensor in self.model.state_dict().items()
        )
        if self.sends_refit:
            yield from publish(bucketed(full, bucket_bytes), transport, self.weight_group)
        else:
            deque(full, maxlen=0)  # this rank's part is its shards in the gathers

    def gathered_state(self, what: str = "params") -> dict[str, torch.Tensor] | None:
        """Full tensors (HF names) of the parameters or their gradients, on rank 0."""
        if what == "params":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.model, options=options)
        elif what == "grads":
            state = {name: p.grad.full_tensor().float().cpu() for name, p in self.model.named_parameters()}
        else:
            raise ValueError(f"what must be 'params' or 'grads', got {what!r}")
        return state if self.rank == 0 else None

    # ---------------------------------------------------------- persistence
    def save_checkpoint(self, directory: str) -> None:
        """Sharded model + optimizer (torch.distributed.checkpoint) and every rank's RNG state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save(
            {"model": model_state, "optimizer": optimizer_state}, checkpoint_id=Path(directory) / DTENSOR_CHECKPOINT
        )
        torch.save(torch.get_rng_state(), Path(directory) / f"rng_rank{self.rank:03d}.pt")
        if self.rank == 0:
            self.hf_config.save_pretrained(directory)

    def load_checkpoint(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=Path(directory) / DTENSOR_CHECKPOINT)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        torch.set_rng_state(torch.load(Path(directory) / f"rng_rank{self.rank:03d}.pt"))

    def export_hf(self, directory: str, model_dir: str | None = None, tokenizer_dir: str | None = None) -> None:
        state = self.gathered_state("params")
        if state is not None:
            write_hf_files(state, self.hf_config, Path(directory), model_dir, tokenizer_dir)

    def info(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "dp_rank": self.rank,
            "tp_rank": 0,
            "pp_rank": 0,
            "cp_rank": 0,
            "checkpoint_dir": None,
            "converted_now": False,
            "device": str(self.device),
        }

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
