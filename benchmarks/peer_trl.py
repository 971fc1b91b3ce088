"""This framework against TRL on the same work: SFT tokens/s, DPO pairs/s, GRPO seconds per step.

    uv run benchmarks/peer_trl.py [--out results/bench_peer_trl] [--workloads sft dpo grpo]
        [--models tiny-qwen2 tiny-qwen2-20m] [--steps 4] [--warmup 1] [--rounds 2] [--num-cpus N]

Why: TRL is what most people would reach for instead; this measures, on one
machine in one run, what the same update costs through each. The model, data,
batch, sequence length, optimizer (AdamW: the recipe's lr, betas, eps, weight
decay; gradient clipping at the recipe's norm; torch's fused kernel, TRL's
default and the Megatron worker's: ``nemo_rl.models.megatron.fused_adam``),
learning rate (constant, no warm-up, on both sides), float32 and the CPU
threads (``--num-cpus``: the Ray worker's bundle, ``torch.set_num_threads``
in this process for TRL) are the same on both sides; so is the RoPE: TRL loads the model from a copy of its
directory whose config.json carries the recipe's ``hf_config_overrides`` (the
YaRN block at seq-len / 256), so that the reference models TRL builds itself
from the model's path (DPO, GRPO) get it too.

- SFT: ``Policy.train(batch, NLLLoss(), micro_batch_size)`` on the Megatron
  worker (as ``benchmarks/megatron_vs_hf_throughput.py``: random tokens, loss
  on every token) against ``SFTTrainer`` on the same rows pre-tokenized (no
  packing, no padding-free, no completion/assistant masks: its loss is then
  the mean NLL over every token of the global batch, as ``NLLLoss``).
- DPO: the framework's DPO step (``nemo_rl.algorithms.dpo``: the reference
  model's log-probs of the interleaved chosen/rejected rows, then
  ``DPOLoss`` on a ``Policy(init_reference_model=True)``) against
  ``DPOTrainer`` (sigmoid loss, same beta), which also scores the reference
  model on every step (``precompute_ref_log_probs=False``): one reference
  forward pass over every row per step on both sides. Pairs of random tokens,
  a shared prompt of 3/4 of the sequence and two different responses.
- GRPO: ``examples/run_grpo_math.py`` on ``examples/configs/grpo_math.yaml``
  (vLLM rollouts; per-step ``timing/step_s`` from the run's metrics) against
  ``GRPOTrainer`` with transformers ``generate`` (``use_vllm=False``: TRL's
  vLLM modes need CUDA) on the same built-in ``tiny-math`` prompts in the
  same order, the same group size, ``max_new_tokens``, temperature, clip,
  KL penalty (k3, without TRL's importance-weighted KL correction), token-level
  loss, one optimizer step per GRPO step, and the same reward (the project's
  ``MathEnvironment`` scoring, called in-process).

Each side runs ``--warmup`` untimed steps, then ``--steps`` timed ones. SFT
and DPO run in ``--rounds`` alternating rounds, each side started afresh every
round (a new Ray cluster and worker, a new TRL trainer) and the side that
goes first alternating; a side's time per step is the median of its timed
steps over all rounds, so that a shared machine's drift (tens of percent
within minutes) falls on both sides alike. GRPO runs once per side: its
steps follow the lengths the sides sample more than the machine. TRL's steps are timed from ``on_step_begin`` to ``on_step_end``
(a ``TrainerCallback``), so its start-up, data loading and logging are left
out; the framework's SFT and DPO steps are timed from the driver (Ray's call
and transfer overhead included, as in training), GRPO steps by the run itself.
The first-step losses of SFT and DPO are printed and recorded as proof that
both sides do the same work (same weights, same data, same first batch); the
second step's show that the update is the same too.

Writes ``results.json`` (every step's time and loss, every round's, the
ratios, the set-up) and ``throughput.png`` (bars per workload and model)
under ``--out``. The default run takes 11 to 12 minutes on two shared cores.

Measured on two shared CPU cores (AMD EPYC; TRL 1.16.0, transformers 5.19;
default run: 2 rounds of 1 warm-up and 4 timed steps per side for SFT and
DPO, 2 threads per side; 12.0 minutes; first-step losses equal within
6.4e-7 for SFT and ln 2 on both for DPO, second steps' within 1.5e-7 for
SFT, 5.2e-9 and 3.0e-6 for DPO, the 20M one's rounding explained below):

    workload model           this framework        TRL unit       ratio
    sft      tiny-qwen2            13944.67   11452.66 tokens/s    1.22
    sft      tiny-qwen2-20m          849.38     817.88 tokens/s    1.04
    dpo      tiny-qwen2                5.87       5.89 pairs/s     1.00
    dpo      tiny-qwen2-20m            0.35       0.34 pairs/s     1.03
    grpo     tiny-qwen2                0.60       0.87 s/step      1.44
    grpo     tiny-qwen2-20m           10.50      18.94 s/step      1.80

(tiny DPO: 0.997, its second round's framework steps on a slow spell, 0.65
to 0.93 s against TRL's 0.66 to 0.75 s.) That is with the Megatron worker's
gloo process groups on one transport device
(``nemo_rl.distributed.gloo_one_device``). Before, its 21 groups' event
loops woke the idle worker about 2,100 times a second, and the framework's
Megatron side trains in a Ray actor beside that worker's cluster while TRL
runs alone: on two cores that took 6 to 10 % from a two-thread step
(``benchmarks/megatron_vs_hf_throughput.py`` measures it). Four default runs
then gave SFT and DPO 0.86 to 1.10 and GRPO 1.17 to 1.76, the spread between
runs as large as any change. A second default run with the shared device,
after the vLLM engine's own gloo groups came onto one device as well (12.0
minutes; losses as above, on a faster spell: 18.4 k tokens/s a tiny SFT step
on both sides against 11 to 14 k above):

    workload model           run 1    run 2
    sft      tiny-qwen2       1.22     0.99
    sft      tiny-qwen2-20m   1.04     1.02
    dpo      tiny-qwen2       1.00     1.06
    dpo      tiny-qwen2-20m   1.03     0.97
    grpo     tiny-qwen2       1.44     1.26
    grpo     tiny-qwen2-20m   1.80     1.54

SFT and DPO are at par at two threads: each moves by more between the runs
than it differs from 1. GRPO is ahead in both (0.70 against 0.88 s and 10.2
against 15.7 s a step in run 2).

Those runs gave TRL ``optim="adamw_torch"``, the kernel megatron-core's
optimizer had; both sides now run torch's fused AdamW kernel, TRL's default
(the Megatron worker took it up with its RoPE node and fewer torch calls
under the CPU layer's device redirect: ``megatron_vs_hf_throughput.py``
has the A/B). Two default runs then (10.5 and 9.4 minutes; first- and
second-step losses as above, except DPO's second step at 20M within 1.8e-5):

    workload model           run 3   run 4
    sft      tiny-qwen2       1.08    1.14   (run 4: 19.6 k against 17.2 k tokens/s)
    sft      tiny-qwen2-20m   0.98    1.03
    dpo      tiny-qwen2       1.04    1.07
    dpo      tiny-qwen2-20m   1.14    1.03
    grpo     tiny-qwen2       1.53    1.41   (run 3: 0.56 against 0.85 s a step)
    grpo     tiny-qwen2-20m   1.57    1.70   (run 4: 8.9 against 15.1 s)

Run 5 (2026-12-07, 12.5 minutes, losses as in run 4) printed each ratio with
its 90 % bootstrap interval (``ratio_interval``: rounds drawn in pairs,
then steps; GRPO's steps by index, step j being the same prompts on both
sides):

    workload model           run 5   90 % interval
    sft      tiny-qwen2       1.17   [0.82, 1.31]
    sft      tiny-qwen2-20m   0.94   [0.73, 1.00]   (rounds: 5.8, 5.1, 6.2, 4.7 s
                                                     against 4.3, 4.2, 4.6, 4.1 s,
                                                     then 4.8 to 5.0 against 4.7 to 5.0)
    dpo      tiny-qwen2       0.99   [0.95, 1.06]
    dpo      tiny-qwen2-20m   1.14   [1.03, 1.23]
    grpo     tiny-qwen2       1.59   [0.94, 2.03]
    grpo     tiny-qwen2-20m   1.57   [1.13, 2.05]

At one thread (``--num-cpus 1 --workloads sft dpo``, 10.1 minutes, losses
the same): SFT 1.20 and 1.07 (12.9 k against 10.7 k tokens/s, 631 against
590), DPO 1.16 and 1.06 (4.74 against 4.09 pairs/s, 0.23 against 0.22).

With one thread per side (``--num-cpus 1 --workloads sft dpo``), the cluster
and the driver have the second core to themselves, as on a GPU node's spare
cores. Every ratio was then above 1 already before that change (two runs,
10.5 and 10.2 minutes; first- and second-step losses as above):

    workload model           run 1    run 2
    sft      tiny-qwen2       1.17     1.20
    sft      tiny-qwen2-20m   1.03     1.03
    dpo      tiny-qwen2       1.12     1.12
    dpo      tiny-qwen2-20m   1.04     1.05

The framework took 0.34 s a tiny SFT step against TRL's 0.40 s, and 6.69 s
against 6.91 s at 20M (run 1). GRPO at one thread (``--num-cpus 1
--workloads grpo``, 7 minutes) gave 1.88 (tiny) and 1.91 (20M): timed steps
of 1.71, 0.33, 0.86, 0.82 s against TRL's 2.04, 0.34, 1.20, 1.96 s, and 30.4,
4.1, 15.9, 15.5 s against 41.1, 5.6, 20.8, 39.1 s (3.7 against 5.5 s and 66
against 107 s in all), with 15 to 16 tokens a completion on both sides; at
20M vLLM generated in 0.4 to 1.8 s what transformers ``generate`` did in 1.3
to 8.9 s.

At one thread with the shared gloo device (the worker's and the vLLM
engine's): SFT 1.28 and 1.06, DPO 1.03 and 1.01 (10.5 minutes, losses as
above; 13.2 k against 10.3 k tokens/s, 600 against 569; 4.41 against 4.31
pairs/s, 0.21 against 0.20), and GRPO 1.40 and 1.86 (5.3 minutes; tiny
steps of 1.88, 0.37, 1.17, 1.19 s against 2.47, 0.34, 1.14, 2.18 s, 20M ones
of 30.3, 4.3, 16.7, 16.4 s against 39.6, 6.2, 22.3, 39.2 s). A GRPO median
falls between steps whose lengths follow the prompts drawn, so four steps a
side move it by tens of percent.

Where the time goes, per workload:

- SFT: TRL adds its tiled LM head and per-step entropy and accuracy metrics to
  the model's own cost; this framework adds the Megatron worker's machinery
  and the Ray call, which ``benchmarks/megatron_vs_hf_throughput.py`` takes
  apart against a plain loop (at par there).
- DPO: the same costs over twice the rows, and a reference forward pass on
  both sides.
- GRPO: the same prompts in the same order, each side sampling its own
  completions; a step's cost follows its prompts' lengths, so compare step by
  step. In an earlier 20M run (timed steps 13.0, 2.3, 6.8, 6.8 s against
  TRL's 14.2, 2.4, 8.2, 13.7 s) vLLM generated in 0.3 to 0.9 s what
  transformers ``generate`` did in 0.6 to 3.4 s; this framework then refits
  the engine (0.2 to 0.4 s) and spends 0.7 to 4.9 s in its log-prob passes
  (the live weights' pass over the sampled tokens, which TRL skips, and the
  reference pass, which TRL makes inside its training step) and 0.9 to 7.0 s
  training. On tiny-qwen2 generation is 0.05 to 0.2 s on both sides, so the
  extra pass and the Ray round trips weigh most there.

First-step losses agree to float32 rounding: SFT 6.387530 on both sides and
6.469652; DPO ln 2 on both (the policy is its reference). The second steps',
which show the same update, agree as closely except DPO on the 20M model:
0.816166 against 0.816163. The first-step gradient norms already differed by
7e-6 relative in an earlier run (59.8307 against 59.8312): a pair's two rows
share 3/4 of their tokens and enter the loss with opposite signs, so their
gradients cancel there and what remains carries the rounding of far larger
sums.

On a machine shared with other jobs (1-minute load 5 to 11) the 2-thread
numbers swung by up to 10x between runs (an OpenMP team waits for its
descheduled thread at every op); ``--num-cpus 1`` there gave ratios of 0.75 to
1.12 for every workload.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; nothing may be downloaded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: benchmarks/ and examples/ are not packages

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOTrainer, GRPOTrainer  # noqa: E402

from benchmarks.megatron_vs_hf_throughput import (  # noqa: E402
    hf_config_with_overrides,
    load_policy_config,
    make_batch,
    megatron_policy,
    ratio_interval,
    run_alternating,
    run_megatron,
    time_steps,
)
from benchmarks.token_budget_batching import run_layout  # noqa: E402

WORKLOADS = ("sft", "dpo", "grpo")
MODELS = ("tiny-qwen2", "tiny-qwen2-20m")
UNITS = {"sft": "tokens/s", "dpo": "pairs/s", "grpo": "s/step"}
GRPO_RECIPE = ROOT / "examples" / "configs" / "grpo_math.yaml"
# SFT and DPO recipes warm up and decay; both sides run at the recipe's peak lr instead, so every step's loss compares.
CONSTANT_LR = [
    "policy.megatron_cfg.scheduler.lr_warmup_iters=0",
    "policy.megatron_cfg.scheduler.lr_warmup_init=${policy.megatron_cfg.optimizer.lr}",
    "policy.megatron_cfg.scheduler.lr_decay_style=constant",
]
# What differs between the sides' work, printed under the table and kept in results.json.
NOTES = {
    "sft": "the same loss (mean NLL over every token of the global batch); TRL computes it through its fused LM head "
    "(log-probs in tiles, never the full logits) and adds entropy and token-accuracy metrics every step",
    "dpo": "one reference forward pass over every row per step on both sides (this framework: "
    "get_logprobs(reference=True) before the update; TRL: its reference model inside each micro-batch's loss, "
    "precompute_ref_log_probs=False); the first-step loss is ln 2 on both by construction (policy = reference), "
    "the second step's shows the same update",
    "grpo": "TRL generates with transformers generate (use_vllm=False: TRL's vLLM modes need CUDA), the step's "
    "prompts left-padded to the longest; this framework with its colocated vLLM engine, plus the weight refit each "
    "step and a trainer forward pass TRL does not do (the sampled tokens' log-probs, PPO's old policy and the "
    "generator/trainer parity probe; TRL, on-policy, takes them from the training forward pass). Each side samples "
    "its own completions, so lengths (recorded) and rewards differ",
}
GRPO_PHASES = ("step", "generation", "refit", "reward", "logprobs", "training")
GRPO_LOGGED = (*(f"timing/{phase}_s" for phase in GRPO_PHASES), "generation_length_mean", "reward_mean")


@dataclass
class Side:
    """One side's measurement: the seconds of each timed step and the loss (or reward) of every step."""

    step_seconds: list[float]
    losses: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def each_round(self) -> list[list[float]]:
        """The timed steps of every round (SFT, DPO), or all of them as one (GRPO runs once per side)."""
        return [entry["step_seconds"] for entry in self.extra.get("rounds", [])] or [self.step_seconds]


@dataclass
class Comparison:
    workload: str
    model: str
    work_per_step: float  # tokens (SFT) or pairs (DPO) per step; 1 for GRPO, reported in s/step
    framework: Side
    trl: Side
    wall_s: float = 0.0  # both sides, start-up included

    @property
    def unit(self) -> str:
        return UNITS[self.workload]

    def value(self, side: Side) -> float:
        """What the table shows: throughput, or seconds per step for GRPO."""
        return side.median_s if self.unit == "s/step" else self.work_per_step / side.median_s

    @property
    def ratio(self) -> float:
        """This framework's throughput over TRL's (> 1: this framework is faster)."""
        return self.trl.median_s / self.framework.median_s

    @functools.cached_property
    def ratio_interval(self) -> tuple[float, float]:
        """90 % bootstrap interval of ``ratio`` over the rounds and their steps (``ratio_interval``); GRPO's step
        ``j`` is the same prompts on both sides and the next step others, so its steps are drawn in pairs.
        Drawn once (2,000 resamples) for the table and ``results.json`` alike."""
        return ratio_interval(self.framework.each_round, self.trl.each_round, paired_steps=self.workload == "grpo")

    def as_dict(self) -> dict:
        return {
            "workload": self.workload,
            "model": self.model,
            "unit": self.unit,
            "framework": self.value(self.framework),
            "trl": self.value(self.trl),
            "ratio": self.ratio,
            "ratio_interval_90": self.ratio_interval,
            "work_per_step": self.work_per_step,
            "wall_s": self.wall_s,
            "framework_side": asdict(self.framework) | {"median_s": self.framework.median_s},
            "trl_side": asdict(self.trl) | {"median_s": self.trl.median_s},
        }


# ----------------------------------------------------------------------------------------------- helpers
def trl_training_args(pcfg, micro_batch_size: int, global_batch_size: int, max_steps: int, out_dir: Path) -> dict:
    """TRL config fields for the framework's policy config: its AdamW, clipping, batch layout, float32, one process.

    TRL's own defaults differ where it matters here: gradient checkpointing on
    (a second forward pass), bf16 on, a linear decay, tqdm and reporting.
    """
    ocfg = pcfg.megatron_cfg.optimizer
    return {
        "output_dir": str(out_dir),
        "max_steps": max_steps,
        "per_device_train_batch_size": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // micro_batch_size,
        "learning_rate": ocfg.lr,
        "adam_beta1": ocfg.adam_beta1,
        "adam_beta2": ocfg.adam_beta2,
        "adam_epsilon": ocfg.adam_eps,
        "weight_decay": ocfg.weight_decay,
        "optim": "adamw_torch_fused",  # TRL's default with torch >= 2.8; the Megatron worker's kernel too
        "max_grad_norm": pcfg.max_grad_norm,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "model_init_kwargs": {"dtype": "float32", "attn_implementation": "sdpa"},
        "train_sampling_strategy": "sequential",  # the rows in the framework's order (GRPO has its own sampler)
        "dataloader_num_workers": 0,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }


def model_dir_with_overrides(pcfg, model_path: Path, out_dir: Path) -> Path:
    """A copy of the model directory whose config.json carries the run's ``hf_config_overrides``.

    TRL loads the reference models of DPO and GRPO itself, from the policy's
    path and without its config: given the original directory they would
    run without YaRN (logits 2e-2 off at 1024 tokens on the tiny model).
    """
    shutil.copytree(model_path, out_dir)
    hf_config_with_overrides(pcfg, model_path).save_pretrained(out_dir)
    return out_dir


def preference_rows(vocab_size: int, num_pairs: int, seq_len: int, response_len: int) -> list[dict[str, list[int]]]:
    """TRL's pre-tokenized pairs of random tokens: a shared prompt, two different responses of ``response_len``."""
    generator = torch.Generator().manual_seed(1)
    lengths = {"prompt_ids": seq_len - response_len, "chosen_ids": response_len, "rejected_ids": response_len}
    return [
        {key: torch.randint(3, vocab_size, (n,), generator=generator).tolist() for key, n in lengths.items()}
        for _ in range(num_pairs)
    ]


def preference_pairs(rows: Sequence[dict[str, list[int]]]) -> list:
    """The same pairs as the framework's ``PreferencePair``: each side the whole sequence, the loss on its response."""
    from nemo_rl.data.preference_dataset import PreferencePair
    from nemo_rl.data.sft_dataset import SFTSample

    def side(prompt: list[int], response: list[int]) -> SFTSample:
        return SFTSample(prompt + response, [0] * len(prompt) + [1] * len(response))

    return [
        PreferencePair(side(r["prompt_ids"], r["chosen_ids"]), side(r["prompt_ids"], r["rejected_ids"])) for r in rows
    ]


def prompts_in_step_order(rows: Sequence[dict], prompts_per_step: int, shuffle: bool, seed: int, steps: int) -> list:
    """The prompt rows the framework's loader hands out over ``steps`` steps, in that order (for a sequential TRL)."""
    from nemo_rl.data.dataloader import ResumableDataloader

    loader = ResumableDataloader(rows, prompts_per_step, shuffle, seed)
    return [row for _ in range(steps) for row in loader.next_batch()]


class StepTimer(TrainerCallback):
    """Every optimizer step's wall time, ``on_step_begin`` to ``on_step_end``, and the threads it ran with."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seconds: list[float] = []
        self.threads = torch.get_num_threads()
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.threads = torch.get_num_threads()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


class TimedGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that also records the seconds of each generation (its ``_generate``: tokenize, generate,
    decode), to set beside the framework's ``timing/generation_s``."""

    def __init__(self, *args, **kwargs) -> None:
        self.generation_seconds: list[float] = []
        super().__init__(*args, **kwargs)

    def _generate(self, prompts):
        start = time.perf_counter()
        try:
            return super()._generate(prompts)
        finally:
            self.generation_seconds.append(time.perf_counter() - start)


class PretokenizedDPOTrainer(DPOTrainer):
    """``DPOTrainer`` on rows already as its dataset preparation leaves them (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``): TRL 1.16 always tokenizes from text, and random tokens do not survive a round trip through it."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def trl_side(trainer, timer: StepTimer) -> Side:
    """A TRL run's timed steps (after the warm-up) and every step's logged loss."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return Side(timer.seconds[timer.warmup :], losses, {"all_step_seconds": timer.seconds, "threads": timer.threads})


def alternating_rounds(framework: Callable[[], Side], trl: Callable[[], Side], rounds: int) -> tuple[Side, Side]:
    """Both sides in ``rounds`` alternating rounds (``run_alternating``), each afresh: a side's timed steps over
    all rounds, its losses those of the first round (every round starts from the same weights and data), and
    every round's step seconds and first loss in ``extra["rounds"]``."""
    runs = run_alternating({"framework": framework, "trl": trl}, rounds)

    def pooled(side_runs: list[Side]) -> Side:
        first = side_runs[0]
        record = [{"step_seconds": run.step_seconds, "first_loss": run.losses[0]} for run in side_runs]
        steps = [seconds for run in side_runs for seconds in run.step_seconds]
        return Side(steps, first.losses, first.extra | {"rounds": record})

    return pooled(runs["framework"]), pooled(runs["trl"])


# ----------------------------------------------------------------------------------------------- SFT
def sft(model: str, args, work: Path) -> Comparison:
    from datasets import Dataset
    from transformers import AutoConfig
    from trl import SFTConfig, SFTTrainer

    from nemo_rl.config.schema import validate_sft_config
    from nemo_rl.models.builtin_models import resolve_model_path

    cfg = load_policy_config(
        "sft.yaml",
        validate_sft_config,
        args.seq_len,
        args.batch_size,
        args.micro_batch_size,
        [f"policy.model_name={model}", *CONSTANT_LR],
    )
    model_path = resolve_model_path(model)
    batch = make_batch(AutoConfig.from_pretrained(model_path).vocab_size, args.batch_size, args.seq_len)
    trl_model = model_dir_with_overrides(cfg.policy, model_path, work / f"sft-{model}")

    def trl() -> Side:
        timer = StepTimer(args.warmup)
        trainer = SFTTrainer(
            model=str(trl_model),
            args=SFTConfig(
                **trl_training_args(
                    cfg.policy, args.micro_batch_size, args.batch_size, args.warmup + args.steps, work / "trl"
                ),
                max_length=args.seq_len,
                packing=False,
                padding_free=False,
                completion_only_loss=False,
                assistant_only_loss=False,
            ),
            train_dataset=Dataset.from_list([{"input_ids": row.tolist()} for row in batch["input_ids"]]),
            callbacks=[timer],
        )
        trainer.train()
        return trl_side(trainer, timer)

    framework, trl_measured = alternating_rounds(
        lambda: Side(*run_megatron(cfg, model_path, batch, args.micro_batch_size, args)), trl, args.rounds
    )
    return Comparison("sft", model, args.batch_size * args.seq_len, framework, trl_measured)


# ----------------------------------------------------------------------------------------------- DPO
def dpo(model: str, args, work: Path) -> Comparison:
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer
    from trl import DPOConfig

    from nemo_rl.algorithms.loss_functions import DPOLoss
    from nemo_rl.config.schema import validate_dpo_config
    from nemo_rl.data.preference_dataset import collate_pairs
    from nemo_rl.models.builtin_models import resolve_model_path

    micro = args.micro_batch_size  # pairs per micro-batch: twice as many rows
    cfg = load_policy_config(
        "dpo.yaml", validate_dpo_config, args.seq_len, args.pairs, micro, [f"policy.model_name={model}", *CONSTANT_LR]
    )
    model_path = resolve_model_path(model)
    vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
    rows = preference_rows(vocab_size, args.pairs, args.seq_len, args.seq_len // 4)
    pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id
    batch = collate_pairs(preference_pairs(rows), pad_id, cfg.policy.make_sequence_length_divisible_by)
    loss_fn = DPOLoss(
        cfg.dpo.reference_policy_kl_penalty, cfg.dpo.sft_loss_weight, cfg.dpo.preference_average_log_probs
    )

    policy_kwargs = {"init_reference_model": True, "rows_per_sample": cfg.rows_per_sample}

    def framework() -> Side:
        with megatron_policy(cfg, model_path, args.num_cpus, **policy_kwargs) as policy:

            def step() -> float:  # as DPORun.update: the reference's log-probs of the step's rows, then the update
                scored = batch | {"reference_logprobs": policy.get_logprobs(batch, 2 * micro, reference=True)}
                metrics = policy.train(scored, loss_fn, 2 * micro)["metrics"]
                return metrics["loss_sum"] / metrics["num_pairs"]

            return Side(*time_steps(step, args.warmup, args.steps, torch.device("cpu")))

    trl_model = model_dir_with_overrides(cfg.policy, model_path, work / f"dpo-{model}")

    def trl() -> Side:
        timer = StepTimer(args.warmup)
        trainer = PretokenizedDPOTrainer(
            model=str(trl_model),
            args=DPOConfig(
                **trl_training_args(cfg.policy, micro, args.pairs, args.warmup + args.steps, work / "trl"),
                beta=cfg.dpo.reference_policy_kl_penalty,
                loss_type=["sigmoid"],
                max_length=args.seq_len,
                precompute_ref_log_probs=False,
                padding_free=False,
            ),
            train_dataset=Dataset.from_list(rows),
            callbacks=[timer],
        )
        trainer.train()
        return trl_side(trainer, timer)

    return Comparison("dpo", model, args.pairs, *alternating_rounds(framework, trl, args.rounds))


# ----------------------------------------------------------------------------------------------- GRPO
def grpo(model: str, args, work: Path) -> Comparison:
    overrides = [f"policy.model_name={model}"]
    framework = grpo_framework(overrides, args, work / f"grpo-{model}" / "logs")
    trl = grpo_trl(model, overrides, args, work)
    return Comparison("grpo", model, 1, framework, trl)


def grpo_framework(overrides: list[str], args, log_dir: Path) -> Side:
    """The recipe through its entry script, on a Ray cluster of ``--num-cpus`` CPUs started here (the script
    joins it), timed per step by the run itself."""
    from nemo_rl.distributed.ray_init import init_ray
    from nemo_rl.utils.logger import read_metrics

    init_ray(num_cpus=args.num_cpus)  # run_layout shuts it down
    run = run_layout("fixed", args.warmup + args.steps, overrides, log_dir)
    steps = [{key: m[key] for key in ("step", *GRPO_LOGGED) if key in m} for m in read_metrics(log_dir, "train")]
    timed = [s["timing/step_s"] for s in steps if s["step"] > args.warmup]
    return Side(timed, [s["reward_mean"] for s in steps], {"steps": steps, "run_seconds": run["seconds"]})


def grpo_trl(model: str, overrides: list[str], args, work: Path) -> Side:
    """``GRPOTrainer`` on the recipe's prompts, group size, sampling, loss and reward."""
    from datasets import Dataset
    from trl import GRPOConfig

    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_grpo_config
    from nemo_rl.environments.math_environment import MathEnvironment
    from nemo_rl.models.builtin_models import resolve_model_path

    cfg = validate_grpo_config(resolve_config(load_config(GRPO_RECIPE, overrides)))
    gcfg, pcfg, lcfg, ecfg = cfg.grpo, cfg.policy, cfg.loss_fn, cfg.env.math
    rollout = gcfg.num_prompts_per_step * gcfg.num_generations_per_prompt
    if rollout != pcfg.train_global_batch_size:
        raise ValueError(f"one optimizer step per GRPO step needs train_global_batch_size = {rollout} (the rollout)")
    steps = args.warmup + args.steps
    prompts = prompts_in_step_order(
        grpo_prompt_rows(cfg), gcfg.num_prompts_per_step, cfg.data.shuffle, gcfg.seed, steps
    )
    environment = MathEnvironment(ecfg.verify_timeout_s, ecfg.format_reward_weight)

    def math_environment(completions, answer, **_) -> list[float]:
        return environment.score([c[0]["content"] for c in completions], answer)

    timer = StepTimer(args.warmup)
    trainer = TimedGRPOTrainer(
        model=str(model_dir_with_overrides(pcfg, resolve_model_path(pcfg.model_name), work / f"grpo-{model}-trl")),
        reward_funcs=math_environment,
        args=GRPOConfig(
            **trl_training_args(pcfg, pcfg.train_micro_batch_size, rollout, steps, work / "trl"),
            num_generations=gcfg.num_generations_per_prompt,
            max_completion_length=pcfg.generation.max_new_tokens,
            temperature=pcfg.generation.temperature,
            top_p=pcfg.generation.top_p,
            use_vllm=False,
            shuffle_dataset=False,
            beta=lcfg.reference_policy_kl_penalty,
            epsilon=lcfg.ratio_clip_min,
            epsilon_high=lcfg.ratio_clip_max,
            loss_type="dapo" if lcfg.token_level_loss else "grpo",
            scale_rewards="group" if gcfg.normalize_rewards else "none",
            use_bias_correction_kl=False,
        ),
        train_dataset=Dataset.from_list([{"prompt": row["messages"], "answer": row["answer"]} for row in prompts]),
        callbacks=[timer],
    )
    try:
        trainer.train()
    finally:
        environment.close()
    side = trl_side(trainer, timer)
    history = [entry for entry in trainer.state.log_history if "reward" in entry]
    side.losses = [entry["reward"] for entry in history]
    side.extra |= {
        "generation_seconds": trainer.generation_seconds,
        "generation_length_mean": [entry["completions/mean_length"] for entry in history],
    }
    return side


def grpo_prompt_rows(cfg) -> list[dict]:
    """The recipe's training rows (``{"messages", "answer"}``), exactly those its prompt dataset keeps."""
    from transformers import AutoTokenizer

    from nemo_rl.data.builtin_datasets import resolve_dataset_paths
    from nemo_rl.data.prompt_dataset import load_prompt_dataset
    from nemo_rl.models.builtin_models import resolve_model_path

    path, _ = resolve_dataset_paths(cfg.data.dataset_name, cfg.data.train_data_path, cfg.data.val_data_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.policy.tokenizer.name))
    kept = load_prompt_dataset(path, tokenizer, cfg.policy.max_total_sequence_length - 1)
    if kept.num_dropped:
        raise ValueError(f"{kept.num_dropped} prompts of {path} are too long for the run: the orders would differ")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- report
def print_report(comparisons: Sequence[Comparison]) -> None:
    header = f"{'workload':8} {'model':15} {'this framework':>14} {'TRL':>10} {'unit':9} {'ratio':>6}  90 % interval"
    print(header)
    print("-" * len(header))
    for c in comparisons:
        low, high = c.ratio_interval
        print(
            f"{c.workload:8} {c.model:15} {c.value(c.framework):14.2f} {c.value(c.trl):10.2f} {c.unit:9} {c.ratio:6.2f}"
            f"  [{low:.2f}, {high:.2f}]"
        )
    print("ratio: this framework's throughput / TRL's (GRPO: TRL's s/step / this framework's); > 1: framework faster")
    print("interval: bootstrap over the rounds (both sides of a round together) and their steps (GRPO: step j of both)")
    for workload in dict.fromkeys(c.workload for c in comparisons):
        print(f"{workload}: {NOTES[workload]}")
    for c in comparisons:
        if c.workload in ("sft", "dpo"):
            steps = zip(("first-step loss", "second"), c.framework.losses, c.trl.losses)  # as many as both ran
            print(
                f"{c.workload} {c.model}: "
                + ", ".join(f"{name} {f:.6f} vs TRL {t:.6f} (diff {abs(f - t):.1e})" for name, f, t in steps)
            )


def plot(comparisons: Sequence[Comparison], path: Path) -> None:
    """One panel per workload and model (their numbers are orders of magnitude apart): the two sides' bars."""
    fig, axes = plt.subplots(1, len(comparisons), figsize=(2.6 * len(comparisons), 3.6), squeeze=False)
    for ax, c in zip(axes[0], comparisons, strict=True):
        ax.bar(["this\nframework", "TRL"], [c.value(c.framework), c.value(c.trl)], color=["tab:blue", "tab:orange"])
        lower = ", lower is better" if c.unit == "s/step" else ""
        ax.set_title(f"{c.workload.upper()} {c.model}\nratio {c.ratio:.2f}", fontsize=9)
        ax.set_ylabel(f"{c.unit}{lower}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[Comparison]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_peer_trl")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per side")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides (SFT, DPO)")
    parser.add_argument("--seq-len", type=int, default=1024, help="SFT and DPO rows (GRPO: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=4, help="SFT rows per step")
    parser.add_argument("--pairs", type=int, default=4, help="DPO pairs per step")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="SFT rows / DPO pairs per micro-batch")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray CPUs = torch threads for TRL")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.num_cpus)
    runners = {"sft": sft, "dpo": dpo, "grpo": grpo}

    comparisons, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        os.environ["NRL_MEGATRON_CHECKPOINT_DIR"] = str(Path(work) / "megatron")  # conversions, shared by the runs
        for workload in args.workloads:
            for model in args.models:
                start = time.perf_counter()
                comparisons.append(runners[workload](model, args, Path(work)))
                comparisons[-1].wall_s = time.perf_counter() - start
    print(
        f"\n{args.num_cpus} CPU threads per side, {args.warmup} warm-up + {args.steps} timed steps "
        f"(medians; SFT and DPO over {args.rounds} alternating rounds)"
    )
    print_report(comparisons)
    plot(comparisons, args.out / "throughput.png")
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "setup": setup | {"cpus": os.cpu_count(), "seconds": time.perf_counter() - started},
        "results": [c.as_dict() for c in comparisons],
        "notes": {workload: NOTES[workload] for workload in args.workloads},
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"results: {args.out / 'results.json'}, {args.out / 'throughput.png'}")
    return comparisons


if __name__ == "__main__":
    main()
