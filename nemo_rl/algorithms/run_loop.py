"""The one run loop every algorithm plugs into: SFT, DPO and reward modeling (offline), GRPO and distillation (rollouts).

Set-up order, releasing what set-up started, resume from the latest checkpoint,
the step loop with its progress bar and metrics log, the validation and
checkpoint cadence and the final result are written here once, so a fix to
resume, checkpointing or progress reaches all five. An algorithm names its
config section and fills in the hooks: what to prepare before anything is
written, which workers to start, one training step, validation, what its
checkpoint holds besides the loop's position, and what the run returns.
Everything here runs after the config was validated, so a bad recipe fails
before Ray starts or any directory is created.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from tqdm.auto import tqdm

from nemo_rl.algorithms.run_setup import claim_run_directories, open_run_log
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.models.policy.interfaces import PolicyInterface
from nemo_rl.utils.checkpoint import CheckpointManager

logger = logging.getLogger(__name__)

ResultT = TypeVar("ResultT")


class Stoppable(Protocol):
    """Anything a run starts and must stop however it ends: clusters, worker groups, engines, environments."""

    def shutdown(self) -> None: ...


StoppableT = TypeVar("StoppableT", bound=Stoppable)


class Timer:
    """Wall time per phase (a phase entered twice adds up), logged as ``<prefix>/<phase>_s``: a step's phases
    under ``timing/``, start-up's under ``startup/``."""

    def __init__(self, prefix: str = "timing") -> None:
        self.prefix = prefix
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        """``seconds`` more of ``phase``, timed elsewhere (a worker's, a phase that overlaps others)."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        return {f"{self.prefix}/{phase}_s": seconds for phase, seconds in self.seconds.items()}


class RunLoop(Generic[ResultT]):
    """One run of an algorithm, set up in the order that keeps failures cheap and closed however it ends.

    ``section`` is the algorithm's config block (``sft``, ``dpo``, ``rm``,
    ``grpo``, ``distillation``): the loop reads ``max_num_steps``,
    ``max_num_epochs``, ``val_period``, ``val_at_start`` and ``seed`` there, and
    messages and the progress bar name it. Whatever ``start_workers`` starts is
    passed through ``started`` as soon as it exists, so a constructor that
    fails part-way stops exactly what it had started and nothing leaks.
    """

    section: ClassVar[str]
    engines: ClassVar[tuple[str, ...]] = ("megatron",)  # the engines the long-context receipt describes
    tokenizer: Any  # a transformers tokenizer, saved with every checkpoint (set by ``prepare``)
    policy: PolicyInterface  # the trained model (set by ``start_workers``)

    def __init__(self, cfg, resolved_config: dict[str, Any]):
        self.cfg = cfg
        self.loop = getattr(cfg, self.section)
        self._closers: list[Callable[[], None]] = []
        self.startup = Timer("startup")  # the phases ``start_workers`` times, and the whole set-up (``total``)
        started = time.perf_counter()
        try:
            self.checkpoints = claim_run_directories(cfg, resolved_config)  # refuses another config's run first
            with self.startup("prepare"):
                self.train_loader = self.prepare()
            self.log_dir = Path(cfg.logger.log_dir)
            self.metrics = open_run_log(cfg, resolved_config, list(self.engines))
            self._closers.append(self.metrics.close)
            self.start_workers()
        except BaseException:
            with contextlib.suppress(Exception):  # a failure to stop is logged; the set-up error is the one to see
                self.close()
            raise
        self.startup.add("total", time.perf_counter() - started)
        self._log_startup()

    # ------------------------------------------------------------ per algorithm
    def prepare(self) -> ResumableDataloader:
        """Tokenizer, data and checks, before the run writes a file or starts Ray; returns the training batches."""
        raise NotImplementedError

    def start_workers(self) -> None:
        """Ray, clusters and models (``self.policy`` among them), each registered with ``started``."""
        raise NotImplementedError

    def train_step(self, batch: list, step: int) -> dict[str, float]:
        """Step number ``step`` (1-based) on one global batch from the loader: the metrics logged under ``train``."""
        raise NotImplementedError

    def validate(self) -> dict[str, float] | None:
        """The metrics logged under ``validation``, or None when the run has no validation data."""
        raise NotImplementedError

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        raise NotImplementedError

    def finish(self, step: int, last_train: dict[str, float], last_validation: dict[str, float] | None) -> ResultT:
        """What the run returns (and any work on the trained model, e.g. the HF export), after the last step."""
        raise NotImplementedError

    def describe_validation(self, metrics: dict[str, float]) -> str:
        """The validation line written under the progress bar."""
        return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())

    def save_state(self, directory: Path) -> None:
        """What a checkpoint holds besides the loop's position: the policy's shards (with its RNG) and the tokenizer."""
        self.policy.save_checkpoint(directory)
        self.tokenizer.save_pretrained(directory)

    def load_state(self, directory: Path) -> None:
        """Restore what ``save_state`` wrote; an algorithm that keeps more state extends both."""
        self.policy.load_checkpoint(directory)

    # ------------------------------------------------------------------ shared
    def _log_startup(self) -> None:
        """Where this process's start-up went: one info line, and ``startup/<phase>_s`` at step 0 (split
        ``startup``, one row per process start, so a resumed run adds its own)."""
        logger.info("start-up: %s", ", ".join(f"{phase} {s:.1f} s" for phase, s in self.startup.seconds.items()))
        self.metrics.log(self.startup.metrics(), 0, "startup")

    def log_checkpoint_source(self) -> None:
        """Which converted Megatron checkpoint the policy workers loaded, and whether this start converted it."""
        if self.policy.checkpoint_dir is not None:
            cache_note = "converted now" if self.policy.converted_now else "reused from cache"
            logger.info("Megatron checkpoint %s (%s)", self.policy.checkpoint_dir, cache_note)

    def started(self, resource: StoppableT) -> StoppableT:
        """``resource``, to be shut down when the run closes (the newest first)."""
        self._closers.append(resource.shutdown)
        return resource

    def save(self, step: int) -> Path:
        """One atomic ``step_N``: the algorithm's state, then where the data loader stands."""
        tmp = self.checkpoints.begin(step)
        self.save_state(tmp)
        return self.checkpoints.commit(tmp, step, {"step": step, "dataloader": self.train_loader.state_dict()})

    def resume(self) -> int:
        """Resume from the latest complete step (0 without one); metrics logged after it are rewound."""
        self.checkpoints.clean_incomplete()
        latest = self.checkpoints.latest()
        if latest is None:
            self.metrics.rewind(0)
            return 0
        info = CheckpointManager.training_info(latest)
        self.load_state(latest)
        self.train_loader.load_state_dict(info["dataloader"])
        self.metrics.rewind(int(info["step"]))
        logger.info("Resumed from %s (step %d)", latest, info["step"])
        return int(info["step"])

    def _validation(self, step: int) -> dict[str, float] | None:
        metrics = self.validate()
        if metrics is not None:
            self.metrics.log(metrics, step, "validation")
        return metrics

    def train(self) -> ResultT:
        loop, ccfg = self.loop, self.cfg.checkpointing
        step = self.resume() if ccfg.enabled else 0
        last: dict[str, float] = {}
        val = self._validation(step) if loop.val_at_start and step == 0 else None
        with tqdm(total=loop.max_num_steps, initial=step, desc=self.section, dynamic_ncols=True) as bar:
            while step < loop.max_num_steps and self.train_loader.epoch < loop.max_num_epochs:
                step += 1
                last = self.train_step(self.train_loader.next_batch(), step)
                self.metrics.log(last, step, "train")
                bar.update(1)
                bar.set_postfix(self.progress(last))
                if loop.val_period and step % loop.val_period == 0 and (metrics := self._validation(step)) is not None:
                    val = metrics
                    bar.write(f"step {step}: validation {self.describe_validation(val)}")
                if ccfg.enabled and (step % ccfg.save_period == 0 or step == loop.max_num_steps):
                    bar.write(f"step {step}: checkpoint {self.save(step)}")
        return self.finish(step, last, val)

    def close(self) -> None:
        """Stop everything the run started, newest first; one failing to stop does not keep the others running."""
        errors: list[BaseException] = []
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as error:  # re-raised below, once every resource was stopped
                logger.exception("Stopping part of the run failed")
                errors.append(error)
        if errors:
            raise errors[0]
