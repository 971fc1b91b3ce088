"""Training throughput of the project's Megatron policy worker versus a plain transformers loop.

    uv run benchmarks/megatron_vs_hf_throughput.py [--models tiny-qwen2 tiny-qwen2-20m] [--seq-len 1024]
        [--batch-size 4] [--rounds 3] [--steps 4] [--warmup 2] [--phase-steps 4] [--num-cpus N]
        [--out results/bench_megatron_vs_hf]

Why: the Megatron path (Ray actor, megatron-core DDP, optimizer and
forward/backward schedule) is what every run trains through; this measures what
that machinery costs, or saves, against the simplest thing that computes the
same update: ``AutoModelForCausalLM`` + ``torch.optim.AdamW`` (torch's fused
kernel, as the worker's and as transformers' Trainer by default) on the same model
(``--models``: by default the tiny Qwen2 and its 18 M-parameter sibling, each
with the YaRN block of ``examples/configs/sft.yaml``, factor = seq-len / 256),
batch, sequence length, micro-batching and loss (mean next-token NLL over the
loss-masked tokens of the batch), in the same run and on the same device
(CUDA when available, else CPU with ``--num-cpus`` threads on both sides). The
Megatron side is timed from the driver, so Ray's call and transfer overhead is
part of its number, as it is in training.

Each side runs in ``--rounds`` alternating rounds, started afresh each time
(a new Ray cluster and worker, a new transformers model, the first side
alternating): ``--warmup`` untimed steps, then ``--steps`` timed ones. A side's
s/step is the median of its timed steps over all rounds. On a shared machine
the speed drifts by tens of percent within minutes (the same loop step took
0.21 to 0.27 s within one run here), so a single A-then-B pass measures the
drift as much as the sides; rounds spread it over both. The ratio comes with
each round's own and a 90 % bootstrap interval (``ratio_interval``: rounds
drawn in pairs, then steps within them), which says how far that drift alone
moves it. The first-step losses of every round are recorded as a sanity
check: same weights, same data, so they must agree to float32 rounding.

Then, where the time goes (``--phase-steps``, 0 to skip): both sides again in
this process (the Megatron worker in-process, without Ray), in alternating
steps, each step timed phase by phase: the forward pass with the loss, the
backward, megatron's gradient finalisation, the optimizer with gradient
clipping, and the rest of the step (megatron's schedule and buffer zeroing;
the loop's ``zero_grad``). Prints both tables and writes ``results.json``,
``throughput.png`` and ``phases.png`` (stacked bars) under ``--out``. The
default run takes 4.5 to 6.5 minutes (about 10 with ``--num-cpus 1``).

The Megatron worker keeps the host memory it frees for its next step
(``nemo_rl.utils.host_allocator``, set by every CPU training worker); the
loop runs with glibc's defaults, which cost it nothing here: its largest
blocks are 25 MB, reused from the heap (0 to 2 page faults a step).

Measured on two shared CPU cores (AMD EPYC, default runs of 5.0 to 5.4
minutes; first losses equal in every round):

    model            Megatron s/step   HF loop s/step   ratio
    tiny-qwen2             0.200            0.199        0.99
    tiny-qwen2-20m         4.209            4.226        1.00

The next three runs gave 1.06 and 0.98, 0.96 and 1.04 (``--rounds 6
--phase-steps 0``, 7.7 minutes) and 1.06 and 0.97: the two sides are at par,
and the rounds of one run differ by more than they do (tiny, per round:
1.10, 0.85, 0.91, 0.90, 1.08, 1.12 in the six-round run; the 20M steps of
either side spread over 3.7 to 4.5 s). The last run's phases, the sides
in alternating order:

    phase (ms, in-process)   tiny: Megatron  HF loop    20M: Megatron  HF loop
    forward and loss                   81.6     69.6           1498.9   1479.1
    backward                          150.4    143.0           2875.6   2928.1
    gradient finalisation               0.9        -              4.0        -
    optimizer                           5.1      3.8             51.6     39.8
    rest of the step                   -0.9      1.1             -5.7      7.2
    step                              237.2    217.5           4424.4   4454.2

("rest of the step" is the step's median less the phases' medians, so it can
be below zero.) Four steps a side are few on this host: the whole tiny step,
20 alternating steps a side in one process without phase timing, was at
par (208.1 against 210.8 ms, 243.1 against 240.7 ms), and earlier runs'
tables had it 3 to 7 % behind (194.1 against 181.9 ms, 183.3 against 176.8
ms) with the Megatron side always first, an order that alone put it 4.6 %
behind (220.4 against 210.7 ms). The 20M step is ahead by its backward in
every run.

Through Ray the ratios were 0.87 to 0.91 (tiny) and 0.94 to 1.02 (20M) in
six runs before the worker's gloo process groups came to share one
transport device (``nemo_rl.distributed.gloo_one_device``). What the Ray
side carried beyond the call was the cluster's presence: the plain loop
itself, alternating blocks of steps in one process with a local Ray
cluster and an idle Megatron worker alive or shut down, took 196.3 against
184.2 ms a tiny step (four cycles), 225 to 237 against 206 to 216 ms and 244
against 203 ms (three cycles each). Counted per thread over ten tiny steps
(``/proc/*/task/*/schedstat``), the worker woke 2,629 times a second: its
two training threads 432 and 254 times, and each of megatron's process
groups' gloo event loops 100 times (torch gives every gloo group a TCP
device of its own, whose loop thread polls every 10 ms); the raylet, GCS,
dashboard agent and driver 60 to 150 times each. Every wakeup on a core
takes it from a training thread, and the two-thread OpenMP team waits for
that thread at its next barrier. With the groups on one device the worker
woke 698 times a second and its training threads waited 54 instead of 66 ms
a second on the run queue; in four alternating cycles (a fresh cluster
each, 12 steps), a tiny step through Ray took 203.1 against 222.7, 201.7
against 248.8, 229.7 against 256.5 and 235.6 against 274.2 ms, and the
plain loop beside the idle worker 194.2 against 221.7, 193.7 against 239.7,
221.4 against 237.1 and 237.3 against 279.6 ms.

Tried before, none a cure: Ray's reporting intervals lengthened (resource
reports 100 -> 2000 ms, task events 1 -> 10 s, metrics 10 -> 60 s, health
checks 3 -> 30 s): 200.0 against 200.7 ms in one run, 220 against 195 ms in
the next; ``OMP_WAIT_POLICY=PASSIVE`` in the worker: slower (212.1 against
198.8 ms a tiny step through Ray); the cluster's processes at nice 19: no
gain (193.5 against 184.8 ms, within drift). 21 idle gloo groups in the
loop's own process or in another one also showed no difference in blocks
of steps (188.0 against 187.8 ms), where the A/B above, with the worker's
own groups and a fresh cluster per cycle, moved every cycle the same way.
Ray's call itself, timed from the driver, was 190.8 ms a step against
189.7 ms for ``train_step`` timed inside the worker, with a 1.0 ms empty
round trip.

With one training thread per side (``--num-cpus 1``), the local cluster and
the driver have the second core to themselves, as they have spare cores on a
GPU node. The Megatron path was then at par or ahead, through Ray as well as
in-process, already before the attention backward's views and the shared
gloo device (a default run):

    model            Megatron s/step   HF loop s/step   ratio
    tiny-qwen2             0.309            0.316        1.02
    tiny-qwen2-20m         6.456            6.754        1.05

    phase (ms, in-process, 1 thread)   tiny: Megatron  HF loop    20M: Megatron  HF loop
    forward and loss                            113.0    103.1           2138.5   2145.9
    backward                                    201.3    230.5           4345.0   4563.5
    gradient finalisation                         0.8        -              4.3        -
    optimizer                                     3.8      2.8             48.9     42.7
    rest of the step                              3.8      0.1             12.2      4.7
    step                                        322.7    336.6           6548.8   6756.8

Two runs of the tiny model alone then gave 1.02 and 1.05, and one of the
20M model alone 1.04. With the views, a default run on a slower spell of the
host (20M steps of 6.8 to 8.6 s) gave 0.98 (0.335 against 0.329 s) and 1.11
(7.085 against 7.832 s), in-process 305.9 against 314.5 ms and 8041 against
7716 ms. With the shared gloo device, two default runs at one thread gave
0.95 and 1.07 (0.374 against 0.357 s, 6.825 against 7.296 s; the tiny
model's rounds 0.88, 1.21 and 1.09), then 1.03 and 1.05 (0.318 against 0.327
s, 6.869 against 7.182 s); in-process the Megatron step was ahead in all
four (308.8 against 313.9 and 309.0 against 316.0 ms, 6901 against 7015 and
6896 against 7039 ms), by its backward (13 to 15 ms, 180 to 255 ms) less its
forward (4 to 5 ms, 70 to 89 ms). Two things differ from two threads:

- The blocked attention backward saves more. One layer's backward, 4 x 1024
  tokens:

      heads              1 thread: SDPA   blocked    2 threads: SDPA   blocked
      20M (8/2)                 206.2 ms  170.5 ms           105.5 ms   92.7 ms
      tiny (2/1)                 51.5 ms   43.1 ms            26.2 ms   23.2 ms

  Its extra calls and the sums of the blocks are small, memory-bound
  passes, which a second thread speeds up less than it speeds up the
  kernel.
- Megatron's fixed Python costs (its autograd nodes, schedule and optimizer
  wrappers, about 4 ms a tiny step) do not shrink with threads. They weigh
  half as much against a one-thread step.

Per op (torch's profiler, 6 alternating in-process tiny steps), attention's
backward took 84.1 against 100.5 ms at one thread and 45.5 against 52.5 ms at
two. Every other op was within 2 ms of the loop's.

Where it went, measured apart (in-process, alternating steps):

- Causal attention's backward: torch's CPU flash kernel computes whole
  512-key blocks at the diagonal (a causal 1024-token pass costs 0.82 of a
  full one). Split into blocks by halving (``nemo_rl.models.megatron.
  causal_attention_cpu``), one layer's backward took 25.6 against 30.3 ms
  (tiny heads) and 112 against 115 ms (20M heads) alone. Its blocks, first
  copies, are now views of megatron's memory (the module's docstring has
  the per-layer figures); a step, alternating in one process: 167.1 against
  169.4 ms (the loop: 164.9) and 3452.5 against 3467 ms (the loop: 3529.3).
- RMSNorm's backward: torch's fused CPU forward has no backward kernel, so
  autograd differentiated its decomposition; one node instead (``norms``):
  3.5 against 6.4 ms at width 512, 0.7 against 1.1 ms at 128. With both, a
  20M step took 3761 against 3815 ms (the loop: 3786) and a tiny one 181.2
  against 183.4 ms (the loop: 175.1), 8 and 16 alternating steps.

- The model's layers are at par. Timed per module (forward hooks, and
  gradient hooks on each module's input and output for the backward), the
  tiny model's two layers took 53.3 against 50.7 ms forward and 104.6
  against 100.9 ms backward; the 20M model's six 1278 against 1302 ms and
  2486 against 2494 ms. Getting there: megatron's fc1 wrote gate and up as
  strided halves of one ``[s, b, 2 * ffn]`` output, over which torch's CPU
  elementwise kernels run slower; fc1 and SwiGLU are now one node writing
  two dense blocks (``nemo_rl.models.megatron.swiglu``): a tiny step 207.3
  -> 203.4 ms, the 20M one within noise (4246 -> 4232 ms). (torch's
  profiler is no guide at this grain: its per-op self times put the strided
  activation at 17 ms of a tiny step against the loop's 5.5 ms, and the
  dense one still at 11.6; the same node timed inside the step took what
  it takes alone.)
- The loss: without tensor parallelism the per-token cross-entropy is
  torch's fused ``cross_entropy`` rather than megatron's vocab-parallel one
  (separate max, shift, exp, sum, gather and divide passes over the logits):
  4.3 against 2.5 ms forward and backward at 4 x 1024 tokens. With the fc1
  node, a tiny step 195.7 -> 189.7 ms (the loop: 179.0 ms).
- megatron's RoPE (``apply_rotary_pos_emb``) computes ``cos``/``sin`` per
  layer and copies q and k once more to join the empty pass-through part:
  forward and backward of q and k took 2.9 ms a layer against 2.1 ms for
  transformers' (tiny), 12 ms against 9 ms (20M), about 1.6 and 18 ms of a
  step. It is now one node (``nemo_rl.models.megatron.rotary``): 2.41 ->
  1.83 ms a layer (tiny heads), 11.07 -> 7.09 ms (20M heads). Its QKV bias
  is a separate pass, not the GEMM's.
- Fixed costs per step, seen at 4 x 64 tokens (tiny, in-process): 16.9 ms
  against 12.1 ms: forward 5.5 against 4.2, backward 6.5 (+ 0.5 gradient
  finalisation) against 5.7, optimizer 3.3 against 2.1 (megatron's
  distributed optimizer copies gradients and parameters between its shards
  and the model, and computes the norm itself; its non-distributed
  optimizer is no faster: a tiny 4 x 1024 step at 0.971 against 0.969 of
  the loop's speed). The CPU compatibility layer's ``TorchFunctionMode``,
  which sees every torch call made from Python, is paused for the model's
  forward and loss (``without_device_redirect``): 23.3 -> 21.9 ms a step at
  that size, within noise at 4 x 1024.
- Ray: a tiny step through ``Policy.train`` against the same worker class
  in-process, alternating: 209.6 against 204.2 ms (+2.7 %); at 4 x 64
  tokens 32.1 against 27.3 ms. Of that, an empty actor call's round trip
  is 1.2 ms, sending the micro-batches 1 ms more (pickling them as numpy
  instead of torch tensors would save 0.2 ms), and ``train_step`` timed
  inside the worker is 4 ms under ``Policy.train``. The rest is the local
  cluster's own processes (raylet, GCS, agents, log monitor, two idle
  workers): 3 % of the two cores during training steps, which on two cores
  stalls the worker's OpenMP team.

Fixed costs, taken together: torch's fused AdamW kernel in megatron's
optimizer (``nemo_rl.models.megatron.fused_adam``), the RoPE node above and
the device redirect paused for megatron's ``backward_step`` and torch's own
optimizer update (495 instead of 768 torch calls a tiny step through the
mode's Python hook). Each alone had looked like no difference at 4 x 1024
(the fused kernel: 16.9 against 17.9 ms a step at 4 x 64 tokens). Together,
in one process, the changes toggled in alternating steps (tiny model, 60,
40 and 30 steps a variant):

    tokens     before     rope    fused   paused   all three
    4 x 64    20.6 ms    20.1     19.4     20.5      19.2
    4 x 256   50.1 ms    49.2     50.3     51.1      48.6
    4 x 1024 183.7 ms       -        -        -     181.3

The 20M step, 8 alternating steps a variant: 3647.7 against 3656.7 ms, no
difference; there the optimizer phase alone went from 31.5 ms (the loop on
torch's default AdamW, same run) to 19.3 ms.

Default runs with them (two threads): 0.80 and 1.01 with the loop still on
torch's default AdamW (the tiny Megatron steps through Ray spread over 0.19
to 0.26 s against the loop's 0.17 to 0.20 s; in-process 191.4 against 182.2
ms), then 0.97 and 1.02 with the loop on the fused kernel too (0.184 against
0.179 s, 3.807 against 3.870 s; in-process 204.6 against 192.7 ms, 3836
against 3880 ms). Four tiny-only runs between them (``--models tiny-qwen2
--phase-steps 0 --rounds 2``), the trees alternating, gave 0.98 and 1.03
with the changes and 0.98 and 1.00 without: at par, as before. A six-round
run after (``--rounds 6 --phase-steps 0``, 7 minutes): 1.05 (0.188 against
0.198 s; rounds 1.04, 0.94, 1.02, 1.05, 1.08, 1.03) and 1.00 (3.721 against
3.735 s; rounds 1.04, 1.01, 1.03, 0.96, 0.97, 1.06).

With the interval (2026-12-07, default run, 5.2 minutes): 0.91 [0.85, 1.10]
(0.229 against 0.209 s; rounds 0.97, 0.85, 1.06) and 0.96 [0.78, 1.08]
(4.188 against 4.025 s; rounds 0.76, 1.03, 1.02); in-process 193.6 against
189.5 ms and 4267 against 4206 ms. Two tiny-only runs before it (``--rounds
4 --phase-steps 0``): 0.86 and 1.01, the host's step ranging 0.19 to 0.37 s
within minutes. At one thread after it (``--num-cpus 1 --phase-steps 0``,
6.5 minutes): 0.97 [0.89, 1.09] (0.380 against 0.368 s; rounds 0.89, 0.96,
1.17) and 1.07 [1.04, 1.14] (7.405 against 7.896 s; rounds 1.08, 1.10,
1.09), the 20M model's whole interval above 1.

Longer runs narrow the intervals (2026-12-08, two threads, ``--phase-steps
0``): 24 rounds of 6 steps of the tiny model (5.6 minutes), 0.97 [0.93,
1.01] (0.196 against 0.190 s; rounds 0.85 to 1.27); 10 rounds of 4 steps
of the 20M one (10.8 minutes), 0.97 [0.91, 1.04] (4.072 against 3.932 s;
rounds 0.84 to 1.25); the tiny model again after the change below, 0.96
[0.93, 1.00] (0.200 against 0.193 s). Through Ray at two threads the
framework is about 3 % behind the loop. At 4 x 32 tokens, where a step is
mostly fixed costs, the Megatron step took 18.1 against 11.9 ms in-process
(30 alternating steps; forward +1.2, backward +1.1, gradient finalisation
+0.9, optimizer +1.7, the rest +1.4 ms). With megatron's per-parameter
optimizer loops (zero_grad, the copies between model and shards, the
norm's list of gradients) outside the device redirect
(``cpu_compat.pause_redirect_in_optimizer_update``: 495 -> 239 torch calls
a step through its hook, 2 to 3 us each), 14.9 and 15.9 against 9.9 and
10.7 ms, the optimizer +0.9 and +1.0 ms. The 5 ms left, 2.5 % of a tiny
4 x 1024 step, is megatron's own Python: its module stack and autograd
nodes, ``finalize_model_grads`` (a broadcast and an all-reduce over one
rank, a walk over the modules), its norm and clipping.

Measured apart, none of what is left could be pinned on the framework's
machinery. The first two with every variant alive in one process or
actor, in alternating blocks of four steps (a block's first step dropped):

- Ray's call: the worker's ``train_step`` timed inside it (``__ray_call__``)
  took what ``Policy.train`` took from the driver, 229.4 against 228.6 ms.
- The Ray worker against the same class in the driver's process: 257.2
  against 240.5 ms, 229.4 against 223.2 ms, then 274.0 against 291.3 ms
  (profiled); the plain loop in the first two runs 237.2 and 220.2 ms. The
  profiled run's differences sit in the largest kernels (attention's
  backward 68.1 against 74.9 ms, ``mm`` 106.9 against 111.2 ms), which
  run the same code on the same data: the host's speed, not the path.
- The cluster's presence: the plain loop with every Ray process frozen
  (``SIGSTOP``) or running, alternating blocks of three steps: 200.2 against
  207.5 ms; with the idle worker frozen in both arms and the rest frozen or
  running, the running arm's steps -0.4, -5.3, +2.1, -3.8, -7.6 and +1.7 %
  longer in six runs (half of them with Ray's reporting intervals
  lengthened): within the noise of the method.
- The kernels are at this host's ceiling on both sides: ``mm`` at the
  model's shapes runs at 180 to 200 GFLOP/s (best of 40), and the flash
  kernel's unmasked blocks at 120 to 150. One layer at 4 x 1024, best of
  40 alternating calls (tiny heads; 20M heads): the causal forward split
  by halving, leaves of 256 to 32 tokens merged by their log-sum-exps
  (exact), 9.9 to 10.0 against the kernel's 10.0 ms (39.6 to 40.8 against
  40.4 ms); the backward's leaves at 128 to 32 tokens instead of 256, 23.1
  to 23.5 against 23.8 ms (89.5 to 92.3 against 93.2 ms, medians equal);
  its unmasked blocks with a key/value head's query heads folded into
  the rows (larger GEMMs, at the price of copies), 26.6 to 29.2 against
  27.9 ms (99.3 to 101.0 against 98.2 ms). None is kept.

Tried and not kept: SwiGLU over a flattened
2-D view (no difference) and over cache-sized blocks of rows (20 -> 16 ms a
layer alone at the 20M shape, 6.5 -> 5.7 ms at tiny: under 1 % of a step);
glibc's transparent huge pages for malloc (``glibc.malloc.hugetlb=1``:
1.8 thousand faults a step, no faster); one malloc arena (no fewer faults);
Ray's metrics collection off (idle CPU 6.9 -> 5.7 % of a core); earlier,
writing SwiGLU's gradients into the fc1 output's own memory, saving
``silu(gate)`` instead of recomputing it (again, with the fused kernel and
the RoPE node: 3612.8 -> 3547.6 ms a 20M step in 8 alternating steps, where
those two alone made no difference; but one more ``[tokens, ffn]`` saved a
layer is a sixth more activation memory at the Qwen3-0.6B shape),
contiguous q/k/v for SDPA (3 ms a layer), and not prestarting Ray's idle workers (idle CPU 4.9 -> 3.8 %, but a
GRPO run's start-up 1 s longer). In wall time the heap setting's A/Bs were
within this host's noise (20M ratio in one-shot runs: 0.94, 1.05, 0.93 and
0.87 with it; 0.93, 0.97, 0.79, 1.04 and 0.83 without; in-process on another
host, steps -70, +60, -85, -96 and -5 ms); it is kept for the kernel work it
removes, which is not noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def load_policy_config(
    recipe: str, validate: Callable, seq_len: int, batch_size: int, micro_batch_size: int, overrides: Sequence[str] = ()
):
    """``examples/configs/<recipe>`` validated by ``validate``, at the benchmark's batch shape, on one worker."""
    from nemo_rl.config.loader import load_config, resolve_config

    shape = [
        f"policy.max_total_sequence_length={seq_len}",  # the YaRN factor follows (seq_len / 256)
        f"policy.train_global_batch_size={batch_size}",
        f"policy.train_micro_batch_size={micro_batch_size}",
        "cluster.gpus_per_node=1",
    ]
    return validate(resolve_config(load_config(ROOT / "examples/configs" / recipe, [*shape, *overrides])))


def make_batch(vocab_size: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "loss_mask": torch.ones_like(input_ids)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(seconds of each timed step, loss of every step including warm-up).

    Only the first loss is comparable across sides: later ones follow each side's LR schedule
    (Megatron warms up from ``lr_warmup_init``; the HF loop uses a constant LR).
    """
    losses = [step() for _ in range(warmup)]
    sync(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds, losses


@contextmanager
def megatron_policy(cfg, model_path: Path, num_cpus: int, **policy_kwargs) -> Iterator:
    """A one-worker ``Policy`` on a local Ray cluster of ``num_cpus`` CPUs; it, its cluster and Ray end on exit."""
    import ray

    from nemo_rl.distributed.ray_init import init_ray
    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
    from nemo_rl.models.policy.lm_policy import Policy

    init_ray(num_cpus=num_cpus)
    cluster = RayVirtualCluster(1)
    policy = Policy(cluster, cfg.policy, model_path, seed=0, **policy_kwargs)
    try:
        yield policy
    finally:
        policy.shutdown()
        cluster.shutdown()
        ray.shutdown()


def run_megatron(cfg, model_path: Path, batch, micro_batch_size: int, args) -> tuple[list[float], list[float]]:
    from nemo_rl.algorithms.loss_functions import NLLLoss

    with megatron_policy(cfg, model_path, args.num_cpus) as policy:

        def step() -> float:
            metrics = policy.train(batch, NLLLoss(), micro_batch_size)["metrics"]
            return metrics["nll_sum"] / metrics["num_tokens"]

        # train() returns Python floats, so the worker's device work is done when it returns
        return time_steps(step, args.warmup, args.steps, torch.device("cpu"))


def hf_config_with_overrides(pcfg, model_path: Path):
    """The model's HF config with the run's ``hf_config_overrides`` (the YaRN block), as the workers load it."""
    from transformers import AutoConfig

    from nemo_rl.rope.hf_config import apply_hf_config_overrides

    return apply_hf_config_overrides(
        AutoConfig.from_pretrained(model_path), pcfg.effective_hf_config_overrides, pcfg.max_total_sequence_length
    )


class PhaseClock:
    """Seconds per named phase of one step; ``clock("forward")`` times a block, ``clock.wrap`` a callable.

    A clock that is not ``enabled`` times nothing, so that the throughput rounds' steps carry no device
    synchronisation between their phases.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def wrap(self, phase: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self(phase):
                return fn(*args, **kwargs)

        return timed


def hf_training_step(cfg, model_path: Path, batch, micro_batch_size: int, device) -> Callable[[PhaseClock], float]:
    """The plain loop's step on a fresh transformers model: ``step(clock)`` trains once and returns the mean NLL."""
    from transformers import AutoModelForCausalLM

    pcfg = cfg.policy
    model = AutoModelForCausalLM.from_pretrained(
        model_path, config=hf_config_with_overrides(pcfg, model_path), dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    model.train()
    ocfg = pcfg.megatron_cfg.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=ocfg.lr,
        betas=(ocfg.adam_beta1, ocfg.adam_beta2),
        eps=ocfg.adam_eps,
        weight_decay=ocfg.weight_decay,
        fused=True,  # the Megatron worker's kernel (nemo_rl.models.megatron.fused_adam), transformers' default
    )
    input_ids, loss_mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
    targets, mask = input_ids[:, 1:], loss_mask[:, 1:].float()  # position t predicts token t+1
    num_tokens = mask.sum()

    def step(clock: PhaseClock) -> float:
        optimizer.zero_grad(set_to_none=True)
        nll_sum = torch.zeros((), device=device)
        for start in range(0, len(input_ids), micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            with clock("forward and loss"):
                logits = model(input_ids=input_ids[rows]).logits[:, :-1]
                nll = F.cross_entropy(logits.flatten(0, 1).float(), targets[rows].flatten(), reduction="none")
                micro_sum = (nll * mask[rows].flatten()).sum()
            with clock("backward"):
                (micro_sum / num_tokens).backward()  # mean over the whole batch's tokens, as NLLLoss
            nll_sum += micro_sum.detach()
        with clock("optimizer"):
            if pcfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg.max_grad_norm)
            optimizer.step()
        return (nll_sum / num_tokens).item()

    return step


def run_hf(cfg, model_path: Path, batch, micro_batch_size: int, args, device) -> tuple[list[float], list[float]]:
    step, clock = hf_training_step(cfg, model_path, batch, micro_batch_size, device), PhaseClock(device, False)
    return time_steps(lambda: step(clock), args.warmup, args.steps, device)


def phase_breakdown(cfg, model_path: Path, batch, micro_batch_size: int, args, device) -> dict:
    """Median seconds per phase of both sides' steps, in this process and in alternating steps.

    The Megatron worker runs in-process (no Ray: this is the model and megatron's machinery alone); its
    phases are timed by wrapping the worker's model forward (with the loss), megatron's ``backward_step``,
    its gradient finalisation (DP all-reduce and scaling by the token count) and its optimizer step
    (gradient clipping included, as the loop's "optimizer"). "rest of the step" is what the phases leave:
    megatron's forward/backward schedule, zeroing the gradient buffers and the LR scheduler's step; the
    loop's ``zero_grad`` and loss sum.
    The loop's steps run with the Megatron CPU layer's device redirect paused, as the worker's model does.
    """
    from megatron.core.pipeline_parallel import schedules

    from nemo_rl.algorithms.loss_functions import NLLLoss
    from nemo_rl.models.megatron.cpu_compat import without_device_redirect
    from nemo_rl.models.policy.megatron_policy_worker import MegatronPolicyWorker
    from nemo_rl.models.policy.micro_batches import split_fixed

    worker = MegatronPolicyWorker.in_process(cfg.policy, model_path, seed=0)
    hf_step = without_device_redirect(hf_training_step(cfg, model_path, batch, micro_batch_size, device))
    microbatches = split_fixed(batch, micro_batch_size, None).micro_batches  # as Policy.train hands them over
    megatron_backward = schedules.backward_step
    clock = PhaseClock(device)
    worker._forward = clock.wrap("forward and loss", worker._forward)
    worker.optimizer.step = clock.wrap("optimizer", worker.optimizer.step)
    config = worker.model.config
    config.finalize_model_grads_func = clock.wrap("gradient finalisation", config.finalize_model_grads_func)
    schedules.backward_step = clock.wrap("backward", megatron_backward)
    sides = {
        "megatron": lambda: worker.train_step(microbatches, NLLLoss()),
        "hf": lambda: hf_step(clock),
    }
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    try:
        for index in range(args.warmup + args.phase_steps):
            for name in in_turn(sides, index):
                clock.seconds = {}
                with clock("step"):
                    sides[name]()
                if index >= args.warmup:
                    steps[name].append(clock.seconds)
    finally:
        schedules.backward_step = megatron_backward
        worker.shutdown()
    phases = {}
    for name, measured in steps.items():
        medians = {phase: statistics.median(s[phase] for s in measured) for phase in measured[0]}
        step = medians.pop("step")
        phases[name] = medians | {"rest of the step": step - sum(medians.values()), "step": step}
    return phases


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["tiny-qwen2", "tiny-qwen2-20m"], help="built-in names or HF directories"
    )
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the batch size")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side and round")
    parser.add_argument(
        "--phase-steps", type=int, default=4, help="in-process steps per side timed phase by phase (0: none)"
    )
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray CPUs = torch threads on CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_megatron_vs_hf")
    args = parser.parse_args(argv)
    micro_batch_size = args.micro_batch_size or args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.num_cpus)
        os.environ["OMP_NUM_THREADS"] = str(args.num_cpus)  # the in-process worker of the phase breakdown reads it
    with tempfile.TemporaryDirectory() as checkpoints:
        os.environ["NRL_MEGATRON_CHECKPOINT_DIR"] = checkpoints  # each model's HF->Megatron conversion, once
        rows = {model: compare(model, micro_batch_size, args, device) for model in args.models}
        # In-process after every throughput round: the worker's CPU layer stays on in this process once started.
        for model in args.models if args.phase_steps else ():
            cfg, model_path, batch = workload(model, micro_batch_size, args)
            rows[model]["phases"] = phase_breakdown(cfg, model_path, batch, micro_batch_size, args, device)

    print(
        f"\ndevice {device}, batch {args.batch_size} x {args.seq_len} tokens (micro-batch {micro_batch_size}), "
        f"{args.rounds} rounds of {args.warmup} warm-up + {args.steps} timed steps per side (s/step: median)"
    )
    header = f"{'model':16} | {'backend':>8} | {'tokens/s':>10} | {'s/step':>8} | {'first loss':>10} | ratio"
    print(header)
    print("-" * len(header))
    for model, row in rows.items():
        for name in ("megatron", "hf"):
            side = row[name]
            low, high = row["ratio_interval_90"]
            ratio = f"{row['ratio']:.2f}x [{low:.2f}, {high:.2f}]" if name == "megatron" else ""
            print(
                f"{model:16} | {name:>8} | {side['tokens_per_s']:10.0f} | {side['s_per_step']:8.3f} | "
                f"{side['first_loss']:10.5f} | {ratio}"
            )
    print(
        "ratio: Megatron tokens/s / HF tokens/s (>= 1: the Megatron path is at least as fast); [90 % bootstrap "
        "interval over the rounds and their steps]"
    )
    for model, row in rows.items():
        print(f"{model}: ratio per round " + ", ".join(f"{r:.2f}" for r in row["ratio_each_round"]))
    if args.phase_steps:
        print_phases(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"setup": vars(args) | {"device": str(device), "micro_batch_size": micro_batch_size}, "models": rows}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    plot(rows, args.out / "throughput.png")
    if args.phase_steps:
        plot_phases(rows, args.out / "phases.png")
    print(f"results: {args.out / 'results.json'}, PNGs beside it")
    return summary


def workload(model: str, micro_batch_size: int, args):
    """The SFT recipe's policy config at the benchmark's shape on ``model``, its path and the random batch."""
    from transformers import AutoConfig

    from nemo_rl.config.schema import validate_sft_config
    from nemo_rl.models.builtin_models import resolve_model_path

    cfg = load_policy_config(
        "sft.yaml", validate_sft_config, args.seq_len, args.batch_size, micro_batch_size, [f"policy.model_name={model}"]
    )
    model_path = resolve_model_path(cfg.policy.model_name)
    return cfg, model_path, make_batch(AutoConfig.from_pretrained(model_path).vocab_size, args.batch_size, args.seq_len)


def run_alternating(sides: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Each side's result of every round, in round order: every round runs each side once, the side that goes
    first alternating, so that a slow spell of a shared machine falls on both sides alike."""
    results: dict[str, list[T]] = {name: [] for name in sides}
    for index in range(rounds):
        for name in in_turn(sides, index):
            results[name].append(sides[name]())
    return results


def ratio_interval(
    ours: Sequence[Sequence[float]],
    theirs: Sequence[Sequence[float]],
    paired_steps: bool = False,
    level: float = 0.9,
    resamples: int = 2000,
) -> tuple[float, float]:
    """A bootstrap interval of ``median(theirs) / median(ours)`` (step seconds pooled over rounds: our speed over
    theirs), so that a ratio comes with how far this host's drift alone would move it.

    ``ours[i]`` and ``theirs[i]`` are round ``i``'s timed steps. Rounds are resampled in pairs, both sides of a
    round together (they ran minutes apart on the same machine, a slow spell is shared), then steps within each
    drawn round: independently per side where a round repeats one step (SFT, DPO: the same batch each time), by
    index for both sides where step ``j`` is the same work on both and the next step other work
    (``paired_steps``: GRPO's steps, each on its own prompts). Seeded, so a run's report is reproducible.
    """
    lengths = [(len(a), len(b)) for a, b in zip(ours, theirs, strict=True)]  # the same rounds on both sides
    if paired_steps and any(a != b for a, b in lengths):
        raise ValueError(f"paired steps need as many on both sides in every round; got {lengths}")
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        drawn: tuple[list[float], list[float]] = ([], [])
        for i in (rng.randrange(len(ours)) for _ in ours):
            if paired_steps:
                for j in (rng.randrange(len(ours[i])) for _ in ours[i]):
                    drawn[0].append(ours[i][j])
                    drawn[1].append(theirs[i][j])
            else:
                drawn[0].extend(rng.choice(ours[i]) for _ in ours[i])
                drawn[1].extend(rng.choice(theirs[i]) for _ in theirs[i])
        ratios.append(statistics.median(drawn[1]) / statistics.median(drawn[0]))
    ratios.sort()
    tail = (1.0 - level) / 2
    return ratios[int(tail * resamples)], ratios[int((1.0 - tail) * resamples) - 1]


def in_turn(sides: dict[str, Callable], index: int) -> list[str]:
    """The sides' order in turn ``index``: as given, then reversed, and so on. In one process a step runs on
    the heap and caches the step before it left: a tiny Megatron step that always came right after the loop's was
    4.6 % behind it (20 steps each), at par in this order (-1.3 % and +1.0 %), so neither side may always go
    second."""
    return list(sides) if index % 2 == 0 else list(reversed(list(sides)))


def compare(model: str, micro_batch_size: int, args, device: torch.device) -> dict:
    """Both sides on ``model`` in ``--rounds`` alternating rounds: tokens/s, s/step, first loss each, the ratio.

    Each round starts both sides afresh from the model's weights (a new Ray cluster and worker, a new
    transformers model), the side that goes first alternating; a side's s/step is the median of its timed
    steps over all rounds, so a slow spell of a shared machine falls on both sides alike.
    """
    cfg, model_path, batch = workload(model, micro_batch_size, args)
    sides = {
        "megatron": lambda: run_megatron(cfg, model_path, batch, micro_batch_size, args),
        "hf": lambda: run_hf(cfg, model_path, batch, micro_batch_size, args, device),
    }
    rounds = run_alternating(sides, args.rounds)
    each_round = {name: [round_seconds for round_seconds, _ in rounds[name]] for name in sides}
    seconds = {name: [s for round_seconds in each_round[name] for s in round_seconds] for name in sides}
    first_losses = {name: [losses[0] for _, losses in rounds[name]] for name in sides}
    tokens = args.batch_size * args.seq_len
    median = {name: statistics.median(seconds[name]) for name in sides}
    row: dict = {
        name: {
            "tokens_per_s": tokens / median[name],
            "s_per_step": median[name],
            "step_seconds": seconds[name],
            "first_loss": first_losses[name][0],
            "first_loss_each_round": first_losses[name],
        }
        for name in sides
    }
    row["ratio"] = median["hf"] / median["megatron"]  # tokens/s over tokens/s, as ratio_interval computes it
    row["ratio_each_round"] = [
        statistics.median(hf) / statistics.median(megatron)
        for megatron, hf in zip(each_round["megatron"], each_round["hf"], strict=True)
    ]
    row["ratio_interval_90"] = ratio_interval(each_round["megatron"], each_round["hf"])
    row["first_loss_difference"] = max(
        abs(a - b) for a, b in zip(first_losses["megatron"], first_losses["hf"], strict=True)
    )
    return row


def plot(rows: dict, path: Path) -> None:
    """Tokens/s of both sides per model (one panel each: their scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), squeeze=False)
    for ax, (model, row) in zip(axes[0], rows.items(), strict=True):
        ax.bar(["Megatron\nworker", "plain HF\nloop"], [row["megatron"]["tokens_per_s"], row["hf"]["tokens_per_s"]])
        ax.set_title(f"{model}\nratio {row['ratio']:.2f}", fontsize=9)
        ax.set_ylabel("tokens/s, higher is better", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_phases(rows: dict, args) -> None:
    print(
        f"\nwhere a step's time goes, in-process (no Ray), {args.phase_steps} alternating steps per side after "
        f"{args.warmup} warm-up (ms: medians; 'step' is the whole step's median)"
    )
    for model, row in rows.items():
        phases = row["phases"]
        names = list(dict.fromkeys([*phases["megatron"], *phases["hf"]]))
        print(f"{model:16} | {'phase':24} | {'Megatron':>9} | {'HF loop':>9} | difference")
        for name in names:
            megatron, hf = phases["megatron"].get(name), phases["hf"].get(name)
            cells = [f"{v * 1e3:9.1f}" if v is not None else f"{'-':>9}" for v in (megatron, hf)]
            diff = f"{((megatron or 0.0) - (hf or 0.0)) * 1e3:+9.1f}"
            print(f"{'':16} | {name:24} | {cells[0]} | {cells[1]} | {diff}")


def plot_phases(rows: dict, path: Path) -> None:
    """Stacked bars of a step's phases, both sides per model (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.8), squeeze=False)
    for ax, (model, row) in zip(axes[0], rows.items(), strict=True):
        sides = {"Megatron\nin-process": row["phases"]["megatron"], "plain HF\nloop": row["phases"]["hf"]}
        names = list(dict.fromkeys(name for phases in sides.values() for name in phases if name != "step"))
        bottom = [0.0] * len(sides)
        for name in names:
            heights = [phases.get(name, 0.0) * 1e3 for phases in sides.values()]
            ax.bar(list(sides), heights, bottom=bottom, label=name)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("ms per step (medians)", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
