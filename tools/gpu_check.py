"""python3 tools/gpu_check.py [--device auto|cuda|cpu] [--lengths 8192 32768 65536 131072] [--out results/gpu_check]

On a lent GPU machine: ``bash tools/gpu_check.sh run [options]`` (README "Checking a lent GPU").

Why: CI has no GPU, so what only a GPU shows (bf16 kernels, SDPA's kernel choice, memory and speed at
long context) is checked here, in one command of a few minutes on a machine that has torch and
transformers but neither Ray nor vLLM. It drives the Megatron policy worker itself, constructed in this
process (``MegatronPolicyWorker.in_process``: the code a run trains through, without the Ray actor around
it). Each check is a row of the printed table and of ``<out>/results.json`` (rewritten after every
check, so a run cut short still leaves what it measured); a check that raises is reported as ``error``
and the others still run. Exit code 1 when a check failed or raised.

Checks, two workers one after the other in this process (``parity_worker`` and ``model_worker`` time
each one's start: building a built-in model, converting its checkpoint, building the GPTModel):

``yarn_parity_4x`` (``--parity-model``, default ``tiny-qwen2-base``): the worker's full-vocabulary logits
  at 4x the model's original window, with the YaRN block for that factor, against transformers' model of
  the same weights under the converted checkpoint's config, both in ``--dtype``. The model is the
  project's *pre-trained* base: with random weights a model's logits hardly depend on position, so
  there a YaRN mismatch hides under bfloat16 rounding (Qwen3-0.6B's shape, random, 4 layers, 4x a
  1,024-token window on CPU: rounding moved logits by up to 1.9, YaRN itself by 3.4; the pre-trained
  base at 4x: 0.27 and 13.7). Tolerance: 3x the largest change bfloat16 makes in transformers' own
  logits (against transformers in float32); 1e-3 in float32, where only op order differs. The no-YaRN
  control (transformers without the block, beyond the window) must move the logits by more than the
  tolerance, so the comparison could have seen a mismatch. The original 40,960-token window of Qwen3-0.6B
  is not used: at 4x (164k tokens) the logits alone are 100 GB in float32.
``refit_buckets`` (``--model``): the weights the worker sends to vLLM engines in a refit
  (``hf_weight_buckets``: HF names, buckets of ``--bucket-mib``, safetensors blobs as the object-store
  transport yields them), each equal to the model's HF tensor, every tensor once; each bucket also packed
  on the device as the one flat buffer the NCCL and CUDA IPC transports move (``weight_transports.flatten``)
  and read back. The transports themselves need a receiving vLLM engine (NCCL takes no two ranks on one
  GPU, an IPC handle opens in another process), so they are not run here;
  ``tests/functional/test_vllm_generation.py`` runs the object store and the broadcast (gloo) on CPU.
``model_parity`` (``--model``, default ``qwen3-0.6b-shape``: QK-norm, head_dim 128, GQA 16:8, tied
  151,936-token vocabulary; random weights, built locally): the same comparison at the first of
  ``--lengths``, with the throughput worker's YaRN block (no control: see above).
``sdpa_kernel``: which kernels ``SDPACoreAttention`` (what the worker's attention calls) can run at each
  of ``--lengths`` with the model's heads and dtype (forward and backward under
  ``sdpa_kernel([backend])``, one backend at a time), and which ``aten::_scaled_dot_product_*`` ops a
  forward of the worker dispatches (profiler). Passes when flash or memory-efficient attention runs every
  length and the worker's forward uses a fused kernel (flash, memory-efficient or cuDNN), never the math
  one that builds the L x L scores. Measured on CPU too, reported as skipped there.
``train_step``: one training step at the first length: finite loss and gradient norm, update applied.
``throughput@L``: one sample of L tokens per step, activation recomputation on (full, every layer),
  ``--warmup`` untimed and ``--steps`` timed training steps: tokens/s, peak memory
  (``torch.cuda.max_memory_allocated`` during the timed steps) and MFU = model FLOPs per second /
  ``--peak-tflops`` (H200 dense bf16: 989). Model FLOPs per step, recomputation not counted:
  ``6 N L + 6 n_layers n_heads head_dim L^2``, N the parameters a token is multiplied by (the input
  embedding excluded unless it is tied to the output layer); the second term is causal attention's
  QK^T and AV (4 L^2 n_heads head_dim per layer forward without the mask, halved by it, x3 with the
  backward). A length that does not fit is reported as OOM.

The defaults are sized for one H200 within ``gpu_check.sh``'s eight minutes, by estimate (about four):
building the 0.6B shape (its tokenizer is trained locally: 32 s on two CPU cores) and its conversion
take about a minute, a 128k-token step ~6.4 PFLOP (about 15 s at 40 % MFU), run twice if it fits.
``--device cpu`` (the default without CUDA) runs every check on the tiny
built-in models in float32 at 256 and 512 tokens: what CI runs (``tests/functional/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

ROOT = Path(__file__).resolve().parents[1]
SFT_YAML = ROOT / "examples" / "configs" / "sft.yaml"
GIB = 2**30
FLOAT32_ATOL = 1e-3  # float32 engines differ only in op order (observed ~1e-5, tests/unit/test_hf_weights.py)
BF16_NOISE_FACTOR = 3.0
FUSED_SDPA = ("flash", "efficient", "cudnn")
PROBE_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")

CUDA_DEFAULTS = {"model": "qwen3-0.6b-shape", "lengths": [8192, 32768, 65536, 131072], "dtype": "bfloat16"}
CPU_DEFAULTS = {"model": "tiny-qwen2", "lengths": [256, 512], "dtype": "float32"}
H200_BF16_DENSE_TFLOPS = 989.0


@dataclass
class Row:
    """One check's outcome: ``status`` is pass, FAIL, measured, OOM, error or ``skipped: <why>``."""

    status: str
    value: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Failed(Exception):
    """A check whose measurement came out wrong (not a crash): its row is FAIL."""

    def __init__(self, value: str, details: dict[str, Any]) -> None:
        super().__init__(value)
        self.details = details


class Report:
    """The rows so far, printed as they come and rewritten to ``results.json`` after each."""

    def __init__(self, out: Path, environment: dict[str, Any]) -> None:
        self.path = out / "results.json"
        self.environment = environment
        self.rows: dict[str, Row] = {}
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, check: Callable[[], Row], oom_is_a_result: bool = False) -> None:
        """``check``'s row; an exception is the row (``error``, or ``OOM`` where that is a measurement)."""
        start = time.perf_counter()
        try:
            row = check()
        except Failed as failed:
            row = Row("FAIL", str(failed), failed.details)
        except torch.cuda.OutOfMemoryError as oom:
            first_line = (str(oom).splitlines() or ["CUDA out of memory"])[0]
            row = Row("OOM" if oom_is_a_result else "error", first_line[:160])
        except Exception as error:  # every check reports, whatever the others do
            row = Row("error", f"{type(error).__name__}: {error}"[:300], {"traceback": traceback.format_exc()})
        release_memory()
        row.seconds = round(time.perf_counter() - start, 2)
        self.rows[name] = row
        print(format_row(name, row), flush=True)
        self.write()

    @property
    def passed(self) -> bool:
        return all(row.status not in ("FAIL", "error") for row in self.rows.values())

    def write(self) -> None:
        results = {
            "environment": self.environment,
            "passed": self.passed,
            "checks": {name: asdict(row) for name, row in self.rows.items()},
        }
        self.path.write_text(json.dumps(results, indent=2) + "\n")

    def table(self) -> str:
        return "\n".join([HEADER, "-" * len(HEADER), *(format_row(n, r) for n, r in self.rows.items())])


def format_row(name: str, row: Row) -> str:
    return f"{name:<18} | {row.status:<17} | {row.seconds:>7.1f} s | {row.value}"


HEADER = f"{'check':<18} | {'status':<17} | {'time':>9} | value"


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- set-up
def policy_config(model: str, max_len: int, dtype: str, activation_checkpointing: bool = False):
    """The default SFT recipe's policy for ``model`` at ``max_len`` tokens, one sample per step.

    Its YaRN block starts from the model's own window and RoPE base; the factor follows ``max_len``
    (``${div:...}`` in sft.yaml), and a length within the window leaves the model's RoPE as it is.
    """
    from transformers import AutoConfig

    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_sft_config
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.rope.hf_config import rope_theta_of

    hf = AutoConfig.from_pretrained(resolve_model_path(model))
    block = "policy.hf_config_overrides.rope_scaling"
    overrides = [
        f"policy.model_name={model}",
        f"policy.max_total_sequence_length={max_len}",
        f"policy.precision={dtype}",
        f"{block}.original_max_position_embeddings={hf.max_position_embeddings}",
        f"{block}.rope_theta={rope_theta_of(hf)}",
        f"policy.megatron_cfg.activation_checkpointing={str(activation_checkpointing).lower()}",
        "policy.train_global_batch_size=1",
        "policy.train_micro_batch_size=1",
    ]
    return validate_sft_config(resolve_config(load_config(SFT_YAML, overrides))).policy


def start_worker(
    report: Report,
    name: str,
    model: str,
    max_len: int,
    dtype: str,
    activation_checkpointing: bool = False,
    **kwargs: Any,
):
    """``model``'s in-process worker at ``max_len`` tokens, its start-up (building a built-in model,
    converting the checkpoint, building the GPTModel) the row ``name``; None when it failed."""
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.policy.megatron_policy_worker import MegatronPolicyWorker

    started = []

    def start() -> Row:
        cfg = policy_config(model, max_len, dtype, activation_checkpointing)
        worker = MegatronPolicyWorker.in_process(cfg, resolve_model_path(model), seed=0, **kwargs)
        started.append(worker)
        rope = worker.hf_config.rope_parameters.get("rope_type", "default")
        conversion = "converted" if worker.converted_now else "cached conversion"
        value = f"{model}, {max_len} tokens, {rope} RoPE, {dtype}, {conversion}, on {worker.device}"
        return Row(
            "pass", value, {"checkpoint_dir": str(worker.checkpoint_dir), "rope": worker.hf_config.rope_parameters}
        )

    report.run(name, start)
    return started[0] if started else None


def random_tokens(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """One row of token ids (the first few ids are the tokenizers' special tokens)."""
    return torch.randint(3, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- parity
def hf_logits(model_path: Path, hf_config, ids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """transformers' ``[L, V]`` logits (float32, on ``device``) of ``ids`` under ``hf_config``."""
    from transformers import AutoModelForCausalLM

    # transformers' stubs type the loaded model's ``to`` as taking no device
    model = cast(torch.nn.Module, AutoModelForCausalLM.from_pretrained(model_path, config=hf_config, dtype=dtype))
    model.to(device).eval()
    with torch.no_grad():
        logits = model(ids.to(device)).logits[0].float()
    del model
    release_memory()
    return logits


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def parity_row(worker, ids: torch.Tensor, window: int | None) -> Row:
    """The worker's logits against transformers' (see the module docstring); ``window`` adds the control."""
    from transformers import AutoConfig

    from nemo_rl.models.builtin_models import resolve_model_path

    path = resolve_model_path(worker.cfg.model_name)
    dtype = worker.tf_config.params_dtype
    megatron = worker.get_logits(ids)[0].to(worker.device)
    hf = hf_logits(path, worker.hf_config, ids, dtype, worker.device)
    diff = max_abs_diff(megatron, hf)
    del megatron
    details: dict[str, Any] = {"tokens": ids.shape[1], "dtype": str(dtype), "max_abs_diff": diff}
    if dtype == torch.float32:
        exact = hf
        tolerance = FLOAT32_ATOL
    else:
        exact = hf_logits(path, worker.hf_config, ids, torch.float32, worker.device)
        details["hf_rounding"] = max_abs_diff(hf, exact)
        tolerance = BF16_NOISE_FACTOR * details["hf_rounding"]
    details["tolerance"] = tolerance
    ok = diff <= tolerance
    value = f"max|diff| {diff:.3g} {'<=' if ok else '>'} tol {tolerance:.3g}"
    if "hf_rounding" in details:
        value += f" (HF bf16 vs fp32 {details['hf_rounding']:.3g})"
    if window is not None:
        plain = hf_logits(path, AutoConfig.from_pretrained(path), ids, torch.float32, worker.device)
        details["window"] = window
        details["no_yarn_control"] = control = max_abs_diff(exact[window:], plain[window:])
        value += f"; no-YaRN control {control:.3g}"
        ok = ok and control > tolerance
    value = f"{ids.shape[1]} tokens: {value}"
    if not ok:
        raise Failed(value, details)
    return Row("pass", value, details)


def yarn_parity_checks(report: Report, args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from nemo_rl.models.builtin_models import resolve_model_path

    hf = AutoConfig.from_pretrained(resolve_model_path(args.parity_model))
    window = hf.max_position_embeddings
    worker = start_worker(report, "parity_worker", args.parity_model, 4 * window, args.dtype, trainable=False)
    if worker is None:
        return
    try:
        report.run("yarn_parity_4x", lambda: parity_row(worker, random_tokens(hf.vocab_size, 4 * window), window))
    finally:
        worker.shutdown()


# -------------------------------------------------------------------------------------------- refit
def refit_row(worker, bucket_mib: int) -> Row:
    """What a refit sends, bucket by bucket, against the HF checkpoint (see the module docstring)."""
    from safetensors.torch import load

    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.generation.weight_sync import MIB
    from nemo_rl.models.generation.weight_transports import OBJECT_STORE, flatten, unflatten
    from nemo_rl.models.megatron.checkpoint_cache import load_hf_state_dict

    expected = load_hf_state_dict(resolve_model_path(worker.cfg.model_name))
    sent: list[str] = []
    wrong: list[str] = []
    buckets = 0
    stream = worker.hf_weight_buckets(bucket_mib * MIB, OBJECT_STORE)
    for header in stream:
        tensors = load(next(stream))
        layout, flat = flatten(tensors, worker.device)
        flat_back = unflatten(layout, flat)
        buckets += 1
        for name in header.names:
            want = expected[name].to(tensors[name].dtype) if name in expected else None
            if want is None or not (torch.equal(tensors[name], want) and torch.equal(flat_back[name].cpu(), want)):
                wrong.append(name)
        sent += header.names
        del flat, flat_back
    duplicates = len(sent) - len(set(sent))
    missing = sorted(set(expected) - set(sent))
    details = {"buckets": buckets, "tensors": len(sent), "wrong": wrong, "missing": missing, "duplicates": duplicates}
    value = f"{len(sent)} tensors in {buckets} buckets of <= {bucket_mib} MiB"
    if wrong or missing or duplicates:
        raise Failed(f"{value}: {len(wrong)} differ, {len(missing)} missing, {duplicates} sent twice", details)
    return Row("pass", value + ", each equal to the HF checkpoint's, flat layout read back", details)


# --------------------------------------------------------------------------------------------- SDPA
def core_attention(worker):
    """The first layer's ``SDPACoreAttention``: the module every attention call of the worker goes through."""
    return worker.model.module.decoder.layers[0].self_attention.core_attention


def probe_backends(attention, length: int, dtype: torch.dtype, device: torch.device) -> dict[str, str]:
    """Forward + backward of ``attention`` at ``length`` under each SDPA backend alone: 'ok' or its error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = attention.config
    outcome = {}
    for backend in PROBE_BACKENDS:
        shape = (length, 1, config.num_attention_heads, config.kv_channels)
        query = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        kv_shape = (length, 1, config.num_query_groups, config.kv_channels)
        key, value = (torch.randn(kv_shape, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
        try:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                attention(query, key, value, attention_mask=None).sum().backward()
            outcome[backend.lower()] = "ok"
        except RuntimeError as error:
            outcome[backend.lower()] = str(error).strip().splitlines()[0][:160]
        del query, key, value
    release_memory()
    return outcome


def dispatched_sdpa_ops(worker, ids: torch.Tensor) -> list[str]:
    """The ``aten::_scaled_dot_product_*`` ops a forward of the worker (log-probs of ``ids``) runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        worker.get_logprobs([{"input_ids": ids}])
    prefix = "aten::_scaled_dot_product_"
    return sorted({event.key for event in prof.key_averages() if event.key.startswith(prefix)})


def sdpa_row(worker, lengths: list[int]) -> Row:
    attention = core_attention(worker)
    dtype = worker.tf_config.params_dtype
    probes = {length: probe_backends(attention, length, dtype, worker.device) for length in lengths}
    ops = dispatched_sdpa_ops(worker, random_tokens(worker.hf_config.vocab_size, lengths[0]))
    config = attention.config
    details = {
        "heads": config.num_attention_heads,
        "query_groups": config.num_query_groups,
        "head_dim": config.kv_channels,
        "dtype": str(dtype),
        "backends_by_length": probes,
        "worker_forward_ops": ops,
    }
    runs = {length: [b for b, outcome in probe.items() if outcome == "ok"] for length, probe in probes.items()}
    value = f"forward dispatches {', '.join(op.removeprefix('aten::_scaled_dot_product_') for op in ops) or 'none'}; "
    value += "; ".join(f"{length}: {'+'.join(ok) or 'none'}" for length, ok in runs.items())
    if worker.device.type != "cuda":
        return Row("skipped: no CUDA", value, details)
    flash_or_efficient = all({"flash_attention", "efficient_attention"} & set(ok) for ok in runs.values())
    fused = bool(ops) and all(any(kind in op for kind in FUSED_SDPA) for op in ops)
    if not (flash_or_efficient and fused):
        raise Failed(value, details)
    return Row("pass", value, details)


# ----------------------------------------------------------------------------------- training steps
def training_batch(vocab_size: int, length: int) -> list[dict[str, torch.Tensor]]:
    ids = random_tokens(vocab_size, length, seed=length)
    return [{"input_ids": ids, "loss_mask": torch.ones_like(ids)}]


def train_step_row(worker, length: int) -> Row:
    from nemo_rl.algorithms.loss_functions import NLLLoss
    from nemo_rl.models.policy.loss_metrics import logged_metrics

    result = worker.train_step(training_batch(worker.hf_config.vocab_size, length), NLLLoss())
    loss = logged_metrics(result["metrics"], NLLLoss())["loss"]
    details = {"tokens": length, "loss": loss, "grad_norm": result["grad_norm"], "lr": result["lr"]}
    value = f"{length} tokens: loss {loss:.4g}, grad norm {result['grad_norm']:.4g}"
    if not (math.isfinite(loss) and math.isfinite(result["grad_norm"]) and result["update_successful"]):
        raise Failed(value + (", update skipped" if not result["update_successful"] else ""), details)
    return Row("pass", value, details)


def matmul_parameters(worker) -> int:
    """Parameters a token is multiplied by: all, less an input embedding that is a lookup only (untied)."""
    module = worker.model.module
    total = sum(p.numel() for p in module.parameters())
    if worker.hf_config.tie_word_embeddings:
        return total
    return total - module.embedding.word_embeddings.weight.numel()


def model_flops_per_step(worker, length: int) -> float:
    """``6 N L + 6 n_layers n_heads head_dim L^2`` for one causal sample of ``length`` tokens, forward + backward."""
    config = worker.tf_config
    attention = 6 * config.num_layers * config.num_attention_heads * config.kv_channels * length**2
    return 6 * matmul_parameters(worker) * length + attention


def throughput_row(worker, length: int, warmup: int, steps: int, peak_tflops: float | None) -> Row:
    from nemo_rl.algorithms.loss_functions import NLLLoss

    cuda = worker.device.type == "cuda"
    batch = training_batch(worker.hf_config.vocab_size, length)
    for _ in range(warmup):
        worker.train_step(batch, NLLLoss())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        worker.train_step(batch, NLLLoss())
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    flops = model_flops_per_step(worker, length)
    details: dict[str, Any] = {
        "tokens": length,
        "parameters": matmul_parameters(worker),
        "seconds_per_step": seconds,
        "tokens_per_s": length / seconds,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
    }
    value = f"{details['tokens_per_s']:,.0f} tok/s, {details['achieved_tflops']:.1f} TFLOP/s"
    if details["mfu"] is not None:
        value += f", MFU {100 * details['mfu']:.1f}%"
    if details["peak_memory_gib"] is not None:
        value += f", peak {details['peak_memory_gib']:.1f} GiB"
    return Row("measured", value, details)


def model_checks(report: Report, args: argparse.Namespace) -> None:
    """Every check of the ``--model`` worker; those after a failed one still run."""
    lengths = args.lengths
    worker = start_worker(report, "model_worker", args.model, max(lengths), args.dtype, activation_checkpointing=True)
    if worker is None:
        return
    try:
        vocab_size = worker.hf_config.vocab_size
        report.run("refit_buckets", lambda: refit_row(worker, args.bucket_mib))
        report.run("model_parity", lambda: parity_row(worker, random_tokens(vocab_size, lengths[0]), None))
        report.run("sdpa_kernel", lambda: sdpa_row(worker, lengths))
        report.run("train_step", lambda: train_step_row(worker, lengths[0]))
        for length in lengths:
            report.run(
                f"throughput@{length}",
                lambda length=length: throughput_row(worker, length, args.warmup, args.steps, args.peak_tflops),
                oom_is_a_result=True,
            )
    finally:
        worker.shutdown()


# --------------------------------------------------------------------------------------------- main
def environment(device: str) -> dict[str, Any]:
    import megatron.core
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "megatron_core": megatron.core.__version__,
        "device": device,
    }
    if device == "cuda":
        found |= {"gpu": torch.cuda.get_device_name(), "gpu_memory_gib": torch.cuda.mem_get_info()[1] / GIB}
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from nemo_rl.config.schema import GenerationConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda if available")
    parser.add_argument("--model", help="throughput/refit model (cuda: qwen3-0.6b-shape, cpu: tiny-qwen2)")
    parser.add_argument("--parity-model", default="tiny-qwen2-base", help="pre-trained model of the YaRN parity")
    parser.add_argument("--lengths", type=int, nargs="+", help="tokens per step (cuda: 8192 32768 65536 131072)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="cuda: bfloat16, cpu: float32")
    parser.add_argument("--peak-tflops", type=float, help=f"the device's dense peak (cuda: {H200_BF16_DENSE_TFLOPS})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per length")
    parser.add_argument("--steps", type=int, default=1, help="timed training steps per length")
    parser.add_argument(
        "--bucket-mib",
        type=int,
        default=GenerationConfig.model_fields["refit_bucket_mib"].default,
        help="refit buckets",
    )
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu on a CUDA machine: hide the GPUs (CUDA_VISIBLE_DEVICES=) so the worker stays on CPU")
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lengths = sorted(args.lengths)
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = H200_BF16_DENSE_TFLOPS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(args.out, environment(args.device) | {"args": {k: str(v) for k, v in vars(args).items()}})
    print(HEADER, flush=True)
    yarn_parity_checks(report, args)
    model_checks(report, args)
    print(f"\n{report.table()}\n\n{'passed' if report.passed else 'FAILED'}; results in {report.path}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
