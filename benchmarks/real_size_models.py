"""A model of a real recipe's shape through the real entry scripts on CPU: memory, speed and the checkpoint cache.

    uv run benchmarks/real_size_models.py [--model qwen3-0.6b-shape] [--seq-len 4096] [--original 1024]
        [--tp 2] [--parts convert sft dpo grpo] [--out benchmarks/results/real_size_models]

Why: the tiny models every test trains are 10^4 times smaller than what users
train. This runs the built-in ``qwen3-0.6b-shape`` (Qwen3-0.6B's published
architecture: 596M parameters, vocabulary 151,936, head_dim 128 != hidden /
heads, GQA 16:8, QK-norm, tied embeddings; random weights) through the same
commands a user runs, with the real recipes (``examples/configs/recipes/llm``)
changed only where one 2-core machine must differ: TP 2 instead of the recipe's
layout, float32, ``--seq-len`` tokens with YaRN over an ``--original``-token
window (factor seq-len / original; the shape's own window, 40,960, is longer
than a CPU can train), the built-in datasets, and one or two steps.

Parts (each a fresh process tree, as a user would run it):

* ``convert``: HF -> Megatron conversion into the checkpoint cache (forced), then
  the cache hit every later run takes, timed in this process with the call the
  policy worker makes. Goal: a hit costs <= 2 % of a conversion.
* ``sft``: ``examples/run_sft.py`` with the Qwen3-0.6B SFT recipe: two steps on
  packed ``python-stdlib`` documents, a checkpoint, the HF export. Then the
  policy is started again from the checkpoint (Ray, TP 2) and its logits on a
  sequence past the original window are compared with transformers' on the
  export (vocabulary padding for TP, the GQA split and the tied output layer all
  sit on that path).
* ``dpo``: ``examples/run_dpo.py`` with the Qwen3-0.6B DPO recipe (sequence
  parallelism, a reference model): one step on ``tiny-preference``.
* ``grpo``: ``examples/run_grpo_math.py`` with the GRPO recipe's settings on this
  model: one step (colocated vLLM engine generating, refit, logprobs, update) on
  ``tiny-math``, in the recipe's own bfloat16 at a quarter of ``--seq-len``: vLLM
  cannot sleep on CPU, so one TP=2 engine's copy of the model stays resident
  beside the trainer and the reference model's host copies, and in float32 at
  the full length the three do not fit in 24 GB.

Measured per part: wall time, seconds per step (the run's metrics.jsonl), and
each process's peak resident memory (``VmHWM``, read every half second from
``/proc`` for every process of the run's tree, grouped by Ray actor class).
The policy workers' peak is set against ``tools/estimate_memory.py``'s
training estimate for the same layout (nemo_rl/models/memory_estimate.py) after
subtracting what a worker holds before it builds anything (torch, megatron-core,
Ray and the project imported; measured here once), which the estimate, a count
of tensors, leaves out. Writes ``results.json`` and ``memory.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "configs" / "recipes" / "llm"
GIB = 1024**3
BASELINE_PROBE = (
    "import ray, torch, megatron.core, nemo_rl.models.policy.megatron_policy_worker\n"
    "print(open('/proc/self/status').read())"
)


# ----------------------------------------------------------------------------
# Peak memory of a process tree
# ----------------------------------------------------------------------------
def status_kib(text: str, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (``VmHWM``: the process's peak resident set)."""
    line = next(line for line in text.splitlines() if line.startswith(key + ":"))
    return int(line.split()[1])


def process_label(proc, root_pid: int) -> str | None:
    """A Ray actor's class (its process title is ``ray::Class.method``), a vLLM engine's TP worker
    (``VLLM::Worker_TP<i>``), ``driver`` for the entry script, else None (raylet, GCS, dashboard and idle workers
    are Ray's own and not what a run's layout decides)."""
    if proc.pid == root_pid:
        return "driver"
    try:
        title = (proc.cmdline() or [""])[0]
    except Exception:
        return None
    if title.startswith("VLLM::Worker"):
        return "VllmTPWorker"
    if not title.startswith("ray::") or title.startswith("ray::IDLE"):
        return None
    return title[len("ray::") :].split(".")[0].split(" ")[0]


@dataclass
class TreePeaks:
    """Peak RSS (bytes) of every labelled process of a tree, sampled until ``stop``."""

    root_pid: int
    interval_s: float = 0.5
    peaks: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (label, peak bytes)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [psutil.Process(self.root_pid), *psutil.Process(self.root_pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                label = process_label(proc, self.root_pid)
                if label is None:
                    continue
                try:
                    peak = status_kib(Path(f"/proc/{proc.pid}/status").read_text(), "VmHWM") * 1024
                except (FileNotFoundError, ProcessLookupError, StopIteration):
                    continue
                self.peaks[proc.pid] = (label, max(peak, self.peaks.get(proc.pid, ("", 0))[1]))
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, list[float]]:
        """Peaks in GiB by label, largest first."""
        self._stop.set()
        self._thread.join()
        by_label: dict[str, list[float]] = {}
        for label, peak in self.peaks.values():
            by_label.setdefault(label, []).append(peak / GIB)
        return {label: sorted(values, reverse=True) for label, values in sorted(by_label.items())}


def worker_baseline_gib() -> float:
    """RSS of a process that has imported what a policy worker imports, before it builds anything."""
    done = subprocess.run([sys.executable, "-c", BASELINE_PROBE], capture_output=True, text=True, check=True)
    return status_kib(done.stdout, "VmRSS") * 1024 / GIB


# ----------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One entry-script run: its script, recipe, validator and the overrides that fit it to this machine."""

    script: str
    recipe: str
    section: str
    overrides: tuple[str, ...]
    length_share: int = 1  # runs at --seq-len / length_share tokens (same YaRN factor)
    precision: str = "float32"


def parts(args) -> dict[str, Part]:
    return {
        "sft": Part(
            "run_sft.py",
            "sft-qwen3-0.6B-1n8g-megatron-yarn-64k.yaml",
            "sft",
            (
                "policy.train_global_batch_size=4",  # packed python-stdlib documents: about one row per step
                "policy.train_micro_batch_size=1",
                "sft.max_num_steps=2",
                "sft.val_period=0",
                "checkpointing.save_period=2",
                "data.format=document",
                "data.dataset_name=python-stdlib",
                "data.train_data_path=null",
                "data.val_data_path=null",
                "long_context_eval.enabled=false",
            ),
        ),
        "dpo": Part(
            "run_dpo.py",
            "dpo-qwen3-0.6B-1n8g-megatron-yarn-64k.yaml",
            "dpo",
            (
                "policy.train_global_batch_size=2",
                "dpo.max_num_steps=1",
                "dpo.val_period=0",
                "dpo.val_at_start=false",
                "dpo.export_hf_dir=null",
                "checkpointing.enabled=false",
                "data.dataset_name=tiny-preference",
                "data.train_data_path=null",
                "data.val_data_path=null",
            ),
        ),
        "grpo": Part(
            "run_grpo_math.py",
            "grpo-qwen2.5-1.5B-4n8g-megatron-yarn-256k.yaml",
            "grpo",
            (
                # One engine over both CPUs: two TP=1 engines would each hold the whole fp32 model.
                "+policy.generation.vllm_kwargs.tensor_parallel_size=2",
                "grpo.num_prompts_per_step=2",
                "grpo.num_generations_per_prompt=2",
                "grpo.max_num_steps=1",
                "grpo.val_period=0",
                "policy.train_global_batch_size=4",
                "policy.make_sequence_length_divisible_by=4",
                "policy.generation.max_new_tokens=32",
                "env.math.num_workers=1",
                "checkpointing.enabled=false",
                "data.dataset_name=tiny-math",
                "data.train_data_path=null",
                "data.val_data_path=null",
            ),
            # vLLM cannot sleep on CPU, so its engine keeps its memory beside the trainer and the reference
            # model's host copies: the recipe's own bfloat16 and shorter rows make the three fit in 24 GB.
            length_share=4,
            precision="bfloat16",
        ),
    }


def machine_overrides(args, run_dir: Path, part: Part) -> list[str]:
    """What every part changes in its real recipe to run here (see the module docstring)."""
    export = [f"{part.section}.export_hf_dir={run_dir / 'hf'}"] if part.section == "sft" else []
    return [
        f"policy.model_name={args.model}",
        f"policy.max_total_sequence_length={args.seq_len // part.length_share}",
        f"policy.hf_config_overrides.rope_scaling.original_max_position_embeddings={args.original // part.length_share}",
        f"policy.precision={part.precision}",
        f"policy.megatron_cfg.tensor_model_parallel_size={args.tp}",
        "policy.megatron_cfg.context_parallel_size=1",
        f"cluster.gpus_per_node={args.tp}",
        "cluster.num_nodes=1",
        f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}",
        f"logger.log_dir={run_dir / 'logs'}",
        *export,
    ]


def part_overrides(args, name: str, part: Part) -> list[str]:
    return machine_overrides(args, args.out / name, part) + list(part.overrides)


def validated(part: Part, overrides: list[str]):
    from nemo_rl.config import schema
    from nemo_rl.config.loader import load_config, resolve_config

    validate = getattr(schema, f"validate_{part.section}_config")
    return validate(resolve_config(load_config(RECIPES / part.recipe, overrides)))


def run_entry(args, name: str, part: Part) -> dict:
    """The entry script as a user runs it, with every labelled process's peak RSS; its log goes to run.log."""
    run_dir = args.out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [sys.executable, str(ROOT / "examples" / part.script), "--config", str(RECIPES / part.recipe)]
    command += part_overrides(args, name, part)
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(run_dir / "run.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peaks = TreePeaks(proc.pid)
        returncode = proc.wait()
    wall = time.perf_counter() - start
    rss = peaks.stop()
    if returncode:
        tail = (run_dir / "run.log").read_text()[-3000:]
        raise SystemExit(f"[{name}] exited with {returncode} after {wall:.0f} s; end of {run_dir / 'run.log'}:\n{tail}")
    steps = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("split") == "train"]
    return {
        "wall_s": wall,
        # Offline loops log step_time_s; the RL loops a timing/ breakdown (generation, logprobs, training, ...).
        "step_s": [s.get("step_time_s", s.get("timing/step_s")) for s in steps],
        "timing": [{k: v for k, v in s.items() if k.startswith("timing/")} for s in steps],
        "token_mult_prob_error": [s["token_mult_prob_error"] for s in steps if "token_mult_prob_error" in s],
        "tokens_per_step": [s.get("input_tokens") for s in steps],
        "padded_lengths": [s["sequence_length"] for s in steps if "sequence_length" in s],
        "loss": [s.get("loss") for s in steps],
        "peak_rss_gib": rss,
    }


def time_conversion(args, part: Part) -> dict:
    """Forced conversion, then a cache hit, through the call the policy worker makes."""
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.megatron.checkpoint_cache import ensure_converted

    cfg = validated(part, part_overrides(args, "sft", part)).policy
    model_path = resolve_model_path(cfg.model_name)
    convert = (model_path, cfg.model_name, cfg.effective_hf_config_overrides, cfg.max_total_sequence_length)
    start = time.perf_counter()
    _, converted = ensure_converted(*convert, force_reconvert=True)
    conversion_s = time.perf_counter() - start
    start = time.perf_counter()
    _, converted_again = ensure_converted(*convert)
    hit_s = time.perf_counter() - start
    assert converted and not converted_again
    return {"conversion_s": conversion_s, "cache_hit_s": hit_s, "hit_share": hit_s / conversion_s}


def worker_vs_export_logits(args, part: Part) -> dict:
    """The policy restarted from the SFT checkpoint (Ray, TP ranks) against transformers on the run's export."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_rl.distributed.ray_init import init_ray
    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.policy.lm_policy import Policy

    run_dir = args.out / "sft"
    cfg = validated(part, part_overrides(args, "sft", part))
    (step_dir,) = sorted((run_dir / "ckpt").glob("step_*"))[-1:]
    length = min(args.seq_len, 2 * args.original)  # past the original window, so YaRN's frequencies matter
    ids = torch.randint(3, 151_000, (1, length), generator=torch.Generator().manual_seed(0))
    init_ray(workers=args.tp)
    cluster = RayVirtualCluster(args.tp, 1)
    try:
        # Forward-only: the checkpoint's weights without its optimizer state (a second copy would not fit here).
        policy = Policy(cluster, cfg.policy, resolve_model_path(cfg.policy.model_name), seed=0, trainable=False)
        try:
            policy.load_checkpoint(step_dir)
            got = policy.get_logits(ids)
        finally:
            policy.shutdown()
    finally:
        cluster.shutdown()
        ray.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(ids).logits
    diff = (got.float() - expected).abs()
    return {
        "tokens": length,
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "argmax_agreement": (got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
        "checkpoint": step_dir.name,
    }


def estimate_gib(part: Part, overrides: list[str], padded_lengths: list[int]) -> dict:
    """tools/estimate_memory.py's training estimate for the run's layout, at the rows the run trained on: packed
    rows are max_total_sequence_length long, unpacked ones as long as the step's longest (``padded_lengths``)."""
    import dataclasses

    from transformers import AutoConfig

    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.memory_estimate import Layout, estimate

    cfg = validated(part, overrides)
    layout = Layout.of_run(cfg)
    if not cfg.policy.sequence_packing.enabled and padded_lengths:
        layout = dataclasses.replace(layout, sequence_length=max(padded_lengths))
    found = estimate(AutoConfig.from_pretrained(resolve_model_path(cfg.policy.model_name)), layout)
    parts = {name: gib for name, gib in found.rows() if name not in ("vllm", "peak")}
    # On CPU the reference model's host copies share the rank's RSS with its "device" memory.
    on_cpu = (found.training + found.host_reference) / GIB
    return parts | {
        "host_reference": found.host_reference / GIB,
        "training": on_cpu,
        "row_tokens": layout.sequence_length,
        "rows": layout.micro_batch,
    }


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def estimate_check(result: dict, baseline: float) -> dict:
    """The busiest policy worker's peak, less the import baseline, against the estimate (goal: within 20 %)."""
    measured = result["peak_rss_gib"]["MegatronPolicyWorker"][0] - baseline
    estimated = result["estimate_gib"]["training"]
    return {"measured_gib": measured, "estimated_gib": estimated, "error": estimated / measured - 1}


def print_table(results: dict) -> None:
    if "convert" in results:
        c = results["convert"]
        print(
            f"\nconversion {c['conversion_s']:.1f} s, cache hit {c['cache_hit_s']:.3f} s "
            f"({100 * c['hit_share']:.2f} % of a conversion; goal <= 2 %)"
        )
    header = (
        f"{'part':<5} | {'wall s':>7} | {'s/step':>14} | {'policy ranks peak GiB':>22} | {'other peaks GiB':<34} | "
        f"{'estimate':>8} | {'measured-base':>13} | {'error':>6}"
    )
    print(header)
    print("-" * len(header))
    for name in ("sft", "dpo", "grpo"):
        if name not in results:
            continue
        r = results[name]
        peaks = r["peak_rss_gib"]
        ranks = ", ".join(f"{v:.2f}" for v in peaks.get("MegatronPolicyWorker", []))
        others = ", ".join(f"{k} {max(v):.2f}" for k, v in peaks.items() if k != "MegatronPolicyWorker")
        steps = ", ".join(f"{s:.0f}" for s in r["step_s"])
        e = r["estimate_check"]
        print(
            f"{name:<5} | {r['wall_s']:7.0f} | {steps:>14} | {ranks:>22} | {others:<34} | "
            f"{e['estimated_gib']:8.2f} | {e['measured_gib']:13.2f} | {100 * e['error']:+5.0f}%"
        )
    if "export_logits" in results:
        x = results["export_logits"]
        print(
            f"\nexport vs worker logits at {x['tokens']} tokens: max |diff| {x['max_abs_diff']:.2e}, "
            f"mean {x['mean_abs_diff']:.2e}, argmax agreement {100 * x['argmax_agreement']:.2f} %"
        )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("sft", "dpo", "grpo") if n in results]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    xs = range(len(names))
    measured = [results[n]["estimate_check"]["measured_gib"] for n in names]
    estimated = [results[n]["estimate_check"]["estimated_gib"] for n in names]
    ax.bar([x - width / 2 for x in xs], measured, width, label="busiest policy rank: peak RSS - import baseline")
    ax.bar([x + width / 2 for x in xs], estimated, width, label="tools/estimate_memory.py (training)")
    labels = [
        f"{n}\n{results[n]['estimate_gib']['rows']} x {results[n]['estimate_gib']['row_tokens']:.0f} tokens"
        for n in names
    ]
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("GiB per rank")
    ax.set_title(f"{results['setup']['model']}, TP {results['setup']['tp']}, CPU: memory per rank, rows as trained")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b-shape")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--original", type=int, default=1024, help="the YaRN block's original window")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["convert", "sft", "export_logits", "dpo", "grpo"],
        default=["convert", "sft", "export_logits", "dpo", "grpo"],
        help="export_logits needs the sft part's checkpoint and export (run with it, or after it)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_size_models")
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the SFT checkpoint (~9 GB) after export_logits"
    )
    args = parser.parse_args()
    if args.seq_len % args.tp:
        parser.error("--seq-len must be a multiple of --tp")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    from nemo_rl.models.builtin_models import resolve_model_path

    start = time.perf_counter()
    resolve_model_path(args.model)  # built once into the cache (about a minute for Qwen3-0.6B's shape)
    # Parts run before (``--parts`` picks some) keep their results; the setup must be the same.
    results_file = args.out / "results.json"
    results: dict = json.loads(results_file.read_text()) if results_file.is_file() else {}
    setup = {k: v for k, v in vars(args).items() if k not in ("parts", "keep_checkpoints")} | {"out": str(args.out)}
    if results.get("setup", setup) != setup:
        parser.error(f"{results_file} holds results of another setup ({results['setup']}); pick another --out")
    results |= {"setup": setup, "model_ready_s": time.perf_counter() - start}
    results["worker_import_baseline_gib"] = worker_baseline_gib()
    runs = parts(args)
    for name in args.parts:
        if name == "convert":
            results["convert"] = time_conversion(args, runs["sft"])
        elif name == "export_logits":
            results["export_logits"] = worker_vs_export_logits(args, runs["sft"])
            if not args.keep_checkpoints:
                shutil.rmtree(args.out / "sft" / "ckpt")
        else:
            results[name] = run_entry(args, name, runs[name])
        save(results, args.out)
    # Estimates are recomputed for every measured part (they are functions of the config and the rows run).
    for name in ("sft", "dpo", "grpo"):
        if name in results:
            part, result = runs[name], results[name]
            result["estimate_gib"] = estimate_gib(part, part_overrides(args, name, part), result["padded_lengths"])
            result["estimate_check"] = estimate_check(result, results["worker_import_baseline_gib"])
    save(results, args.out)
    print_table(results)
    plot(results, args.out / "memory.png")
    print(f"\nresults: {args.out / 'results.json'}, plot: {args.out / 'memory.png'}")


if __name__ == "__main__":
    main()
