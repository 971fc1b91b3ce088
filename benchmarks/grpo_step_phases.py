"""Where a GRPO step and the run's start-up spend their time, phase by phase, before and after a change.

    uv run benchmarks/grpo_step_phases.py --label NAME [--out results/bench_grpo_step_phases] [--steps 5]
        [--warmup 1] [--repeats 1] [--set key=value ...]

The tiny GRPO recipe (``examples/configs/grpo_math.yaml``) through
``examples/run_grpo_math.py``, driven the way ``benchmarks/token_budget_batching.py``
drives it (its ``run_layout``, with the shipped fixed micro-batches). Of every
step after the first ``--warmup`` (process start, first refit) it reads the
phases the run logs, ``timing/<phase>_s``: generation, reward, refit, logprobs
(both log-prob passes, the policy's and the reference's), training and the
whole step, and reports each one's median over the measured steps of all of
the label's runs (the machine is shared: a median shrugs off the step another
process's burst fell on). Start-up is reported per phase where the run logs it
(``startup/<phase>_s``, one row at step 0: ``prepare`` (tokenizer, data,
checks), ``ray_init``, ``clusters`` (placement groups), ``workers`` (the
models and the environment, whose own phases ``policy``, ``vllm`` and
``environment`` overlap inside it) and ``total``), and for any version from
outside: the seconds from calling the entry script to the first step's start
(``to_first_step``; ``entry`` is its part before the run loop starts: the
script's imports and config) and from the last step's end to its return
(``teardown``).

Runs are added to ``--out``/results.json under ``--label``, so labels can take
turns on a shared machine (``--label before`` on the old tree, ``--label
after`` on the new one, again and again: each call adds ``--repeats`` runs)
and a before and an after measured on different trees end up side by side.
The table and ``phases.png`` (stacked bars of a step's phases and of
start-up's) show every label there; delete results.json to start afresh.

Measured on two CPU cores shared with other jobs (1-minute load 2 to 29 during
the runs, so seconds move by tens of percent from run to run), before and after
the reference swap, the one-call log-probs and the start-up changes (the
environment started beside the models, no torch import in the rendezvous probe
or the environment's processes); 7 runs per label, the labels taking turns,
medians of 108 measured steps each:

    seconds              before  after      start-up (after)       seconds
    step                  1.590  1.487      entry (imports)          9.5
      generation          0.126  0.120      prepare                  0.1
      reward              0.015  0.014      ray_init                11.3
      refit               0.040  0.036      clusters                 0.2
      logprobs            0.534  0.504      workers                 44.0
        policy pass           -  0.250        policy (cache hit)    36.9
        reference pass        -  0.238        vllm                  44.0
      training            0.765  0.750        environment            1.9
    to first step        67.2    64.9       total (run loop)        55.5

Paired (each after against the before just ahead of it, medians of 7 pairs)
the step is 0.19 s shorter, the log-probs 0.02 s and the start-up 6 s, all
within the noise (the step's pairs range from -0.55 to +0.25 s, start-up's
from -21 to +54 s). Before, the environment started only after the models (4
to 6 s in the logs); beside them but still importing torch it took 9 s, now
1 to 3 s. On the tiny model (0.5 M parameters) the reference's
three copies cost 0.3 ms, so the swap shows only at real sizes: 169 ms per pass
at 50 M float32 parameters and 442 ms at 134 M (one thread) became 0.04 ms.
Then, on an idle machine (1-minute load 0.8 to 2.1), 2 runs per label, medians
of 10 measured steps each: ``before`` the tree above, ``after`` with fixed
micro-batches trimmed to their own longest row (``split_fixed``: a GRPO
micro-batch holds one prompt's group, and the tiny-math prompts run from 30 to
831 tokens) and the environment's bytecode compiled by ``tools/setup.sh``
(uv installs sources only; with ``PYTHONDONTWRITEBYTECODE`` every Ray worker,
vLLM engine and entry script compiled torch, transformers, megatron-core and
vLLM again on import):

    seconds              before  after      start-up            before  after
    step                  1.158  0.858      entry (imports)        9.7    5.2
      generation          0.124  0.129      ray_init               7.8    4.1
      logprobs            0.392  0.331      policy (cache hit)    19.1    8.2
      training            0.605  0.325      vllm                  25.8   12.0
                                            to first step         43.6   21.5

Then the colocated vLLM engine's gloo groups on one device
(``gloo_one_device.gloo_groups_share_device``): counted per thread over 8 s
of a 60-step run (``/proc/*/task/*/schedstat``), the idle engine's 13 gloo
loops woke it 1,290 times a second (1,850 in all), one loop 99 times (565 in
all). The steps did not move beyond the host's noise: eight 60-step runs of
``run_grpo_math.py``, the trees alternating (before, after, after, before,
...), medians of each run's 58 steps after the first two, then of the runs:

    seconds          before   after    runs (before / after)
    step              0.542   0.530    0.468 to 0.569 / 0.491 to 0.570
      logprobs        0.194   0.199
      training        0.209   0.203
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: benchmarks/ and examples/ are not packages

from benchmarks.token_budget_batching import run_layout  # noqa: E402

STEP_PHASES = ("generation", "reward", "refit", "logprobs", "training")
LOGPROB_PASSES = ("logprobs_policy", "logprobs_reference")  # inside ``logprobs``, where the run times them
LOGGED = ("time", "timing/step_s", *(f"timing/{phase}_s" for phase in (*STEP_PHASES, *LOGPROB_PASSES)))
# One after the other; ``other``: the rest of ``total``, ``entry``: the entry script's part before the run loop.
STARTUP_STACK = ("prepare", "ray_init", "clusters", "workers")
OUTSIDE = ("to_first_step", "teardown")  # start-up and shutdown as the caller sees them, for any version


def run_once(steps: int, overrides: list[str], log_dir: Path) -> dict:
    """One run: its steps' phases, its logged start-up phases, and start-up and teardown timed from outside."""
    from nemo_rl.utils.logger import read_metrics

    run = run_layout("fixed", steps, overrides, log_dir, logged=LOGGED)
    first, last = run["steps"][0], run["steps"][-1]
    logged = read_metrics(log_dir, "startup")
    row = logged[-1] if logged else {}
    run["startup"] = {key.removeprefix("startup/").removesuffix("_s"): v for key, v in row.items() if "/" in key}
    run["outside"] = {
        "to_first_step": first["time"] - first["timing/step_s"] - run["started"],
        "teardown": run["started"] + run["seconds"] - last["time"],
    }
    return run


def _medians(rows: list[dict[str, float]], prefix: str = "") -> dict[str, float]:
    """The median of every key that all ``rows`` hold (``prefix`` stripped)."""
    keys = [key for key in rows[0] if key.startswith(prefix) and all(key in row for row in rows)]
    return {key[len(prefix) :].removesuffix("_s"): statistics.median(row[key] for row in rows) for key in keys}


def _unphased(run: dict) -> dict[str, float]:
    """The start-up seconds outside the logged phases: the entry script's before the run loop (imports,
    config) and the run loop's between its phases."""
    startup = run["startup"]
    return {
        "entry": run["outside"]["to_first_step"] - startup["total"],
        "other": startup["total"] - sum(startup[phase] for phase in STARTUP_STACK),
    }


def summarize(runs: list[dict], warmup: int) -> dict[str, dict[str, float]]:
    """Medians over the measured steps of every run (``other``: the step outside its phases) and over the runs
    (start-up), with the load the runs saw."""
    measured = [
        s | {"timing/other_s": s["timing/step_s"] - sum(s[f"timing/{phase}_s"] for phase in STEP_PHASES)}
        for run in runs
        for s in run["steps"]
        if s["step"] > warmup
    ]
    logged = all(run["startup"] for run in runs)
    startup = _medians([run["startup"] | _unphased(run) for run in runs]) if logged else {}
    loads = [load[0] for run in runs for load in (run["load_average_before"], run["load_average_after"])]
    return {
        "step": _medians(measured, "timing/"),
        "startup": startup,
        "outside": _medians([run["outside"] for run in runs]),
        "runs": {"runs": len(runs), "measured steps": len(measured), "load min": min(loads), "load max": max(loads)},
    }


def print_table(summaries: dict[str, dict[str, dict[str, float]]]) -> None:
    labels = list(summaries)
    print(f"{'seconds':26}" + "".join(f"{label:>12}" for label in labels))
    for section in ("step", "startup", "outside", "runs"):
        for key in dict.fromkeys(key for s in summaries.values() for key in s[section]):
            cells = [summaries[label][section].get(key) for label in labels]
            print(f"{section + '/' + key:26}" + "".join(f"{'-':>12}" if c is None else f"{c:12.3f}" for c in cells))


def plot(summaries: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Stacked bars, one per label: a step's phases, and start-up's (the caller's view where none are logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summaries)
    figure, (step_ax, startup_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    stacks = (
        (step_ax, "step", (*STEP_PHASES, "other"), "GRPO step (medians of the measured steps)"),
        (startup_ax, "startup", ("entry", *STARTUP_STACK, "other"), "start-up to the first step (medians of the runs)"),
    )
    for ax, section, parts, title in stacks:
        bottoms = [0.0] * len(labels)
        for part in parts:
            heights = [summaries[label][section].get(part, 0.0) for label in labels]
            ax.bar(labels, heights, bottom=bottoms, label=part)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        ax.set_title(title)
        ax.set_ylabel("seconds")
    unlogged = [0.0 if s["startup"] else s["outside"]["to_first_step"] for s in summaries.values()]
    startup_ax.bar(labels, unlogged, color="lightgrey", hatch="//", label="to first step (no phases logged)")
    for ax in (step_ax, startup_ax):
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="the version measured (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_grpo_step_phases")
    parser.add_argument("--steps", type=int, default=5, help="measured steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs added to the label (a process imports once: entry drops after)"
    )
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"labels": {}}
    entry = results["labels"].setdefault(args.label, {"runs": []})
    for _ in range(args.repeats):
        log_dir = args.out / f"{args.label}_{len(entry['runs'])}" / "logs"
        entry["runs"].append(run_once(args.warmup + args.steps, args.overrides, log_dir) | {"tree": str(ROOT)})
    entry["setup"] = {"cpus": os.cpu_count(), "warmup": args.warmup, "steps": args.steps, "set": args.overrides}
    for other in results["labels"].values():  # every label's, so that all follow this version's summary
        other["summary"] = summarize(other["runs"], other["setup"]["warmup"])
    results_file.write_text(json.dumps(results, indent=2))
    summaries = {label: entry["summary"] for label, entry in results["labels"].items()}
    print(f"{os.cpu_count()} CPUs; medians over the steps after the first {args.warmup} of each run")
    print_table(summaries)
    plot(summaries, args.out / "phases.png")
    print(f"results: {results_file}, {args.out / 'phases.png'}")
    return results


if __name__ == "__main__":
    main()
