"""The step guard: per-rank checks of every step, one agreement per step, stop or skip.

Per step, on each rank, before the data-parallel reduction (so the rank is known):
megatron-core's DDP checks the local gradient norm of each bucket (NaN, Inf, large), and the
guard checks the rank's local loss (NaN, Inf, spike) through the RerunStateMachine; the loss
is pulled to the host once per step, not per micro-batch. Then one all-reduce gives every
rank the table of (check, rank) failures, so all ranks take the same decision before the
optimizer step:

- no failure (or only reported ones: spikes, large gradients): the update is applied;
- a NaN/Inf (or, with spike_action=bad_step, a spike) with on_bad_step=stop: nothing is
  applied or saved, every rank raises BadStepError naming the step, the ranks and the checks;
  the last checkpoint stays the resume point;
- with on_bad_step=skip: the update is dropped (optimizer and LR schedule untouched), the
  batch counts as consumed, the step is logged as skipped; more than max_skipped_steps in a
  row stop the run as above.

The guard also applies the drill faults of `resilience.inject`, consumes the batches of
`resilience.skip_steps`, times each rank's step for the straggler report, and beats the
hang watchdog.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from megatron.core.rerun_state_machine import EXIT_CODE_FAILED_ON_RESULT_VALIDATION, RerunDataIterator

from nemotron_train import rundir
from nemotron_train.config.resilience import SPIKE_INJECTION_FACTOR, Fault, parse_faults
from nemotron_train.config.schema import Config
from nemotron_train.training.resilience.rerun import install_rerun_state_machine, validate_local_loss
from nemotron_train.training.resilience.stragglers import StepTimes, TimedIterator, straggler_report, sum_over_ranks
from nemotron_train.training.resilience.watchdog import HangWatchdog

# Exit code of a run stopped by a failed check: megatron-core's "failed on result validation".
EXIT_CODE_BAD_STEP = EXIT_CODE_FAILED_ON_RESULT_VALIDATION

# Every check the agreement table has a column for, and how a message names it.
CHECKS = ("nan_loss", "inf_loss", "spike_loss", "nan_grad", "inf_grad", "large_grad", "injected_error", "other")
CHECK_TITLES = {
    "nan_loss": "NaN loss",
    "inf_loss": "Inf loss",
    "spike_loss": "loss spike",
    "nan_grad": "NaN gradient",
    "inf_grad": "Inf gradient",
    "large_grad": "unexpectedly large gradient",
    "injected_error": "megatron-core injected error",
    "other": "failed result validation",
}
_REPORTED = ("spike_loss", "large_grad")  # not fatal unless spike_action=bad_step
_LOSS_FACTORS = {"nan_loss": math.nan, "inf_loss": math.inf, "spike_loss": SPIKE_INJECTION_FACTOR}
_GRAD_VALUES = {"nan_grad": math.nan, "inf_grad": math.inf}


class BadStepError(RuntimeError):
    """A step failed a check and the run stops; the message names the step, ranks and checks."""

    exit_code = EXIT_CODE_BAD_STEP


@dataclass
class Verdict:
    step: int
    failed: Dict[str, List[int]] = field(default_factory=dict)  # check -> ranks
    bad: bool = False
    diagnosis: Optional[str] = None
    scheduled: bool = False  # a resilience.skip_steps step

    def describe(self) -> str:
        parts = [f"{CHECK_TITLES[c]} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}" for c, r in self.failed.items()]
        text = "; ".join(parts) or "in resilience.skip_steps"
        return f"{text} ({self.diagnosis})" if self.diagnosis else text

    def record(self, action: str) -> Dict[str, Any]:
        """The metrics.jsonl line; action: stopped, skipped or reported."""
        return {"step": self.step, "bad_step": self.bad, "action": action, "checks": dict(self.failed),
                **({"diagnosis": self.diagnosis} if self.diagnosis else {})}


class StepGuard:
    def __init__(self, cfg: Config, rank: int, world_size: int):
        """Before the model is built: megatron-core's DDP asks for the machine."""
        self.cfg, self.r = cfg, cfg.resilience
        self.rank, self.world_size = rank, world_size
        out = cfg.run.output_dir
        rundir.bad_steps_file(out).parent.mkdir(parents=True, exist_ok=True)
        self.machine = install_rerun_state_machine(cfg, str(rundir.bad_steps_file(out)))
        self.faults: Dict[int, List[Fault]] = {}
        for fault in parse_faults(self.r.inject):
            if fault.rank == rank:
                self.faults.setdefault(fault.step, []).append(fault)
        self.step = 1  # the step being run
        self.verdict: Optional[Verdict] = None
        self.skipped_in_a_row = 0
        self.times = StepTimes()
        self.watchdog = HangWatchdog(out, rank, world_size, self.r.hang_timeout_s) if self.r.hang_timeout_s else None

    # ----------------------------------------------------------- set-up hooks

    def wrap_iterator(self, iterator: Iterator) -> RerunDataIterator:
        """Timed (data wait) and replayable (the machine's re-runs) training iterator."""
        return RerunDataIterator(TimedIterator(iterator, self.times))

    def wrap_finalize(self, finalize: Callable) -> Callable:
        """megatron-core's finalize_model_grads with the drill's gradient faults applied first:
        after the backward pass, before the data-parallel reduction and its checks."""

        def finalize_with_faults(model, *args, **kwargs):
            for fault in self.faults.get(self.step, []):
                if fault.kind in _GRAD_VALUES:
                    _poison_one_grad(model, _GRAD_VALUES[fault.kind])
            return finalize(model, *args, **kwargs)

        return finalize_with_faults

    def start(self, completed_steps: int) -> None:
        """Training starts (or resumes) after `completed_steps`."""
        self.step = completed_steps + 1
        # The machine counts iterations from 0 in each process; ours are the run's 1-based steps.
        self.machine.current_iteration = completed_steps
        if self.watchdog is not None:
            self.watchdog.start(completed_steps)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    # ----------------------------------------------------------- inside train_step

    def loss_factor(self) -> Optional[float]:
        """The drill's factor for this rank's loss at this step (None: no loss fault)."""
        factor = None
        for fault in self.faults.get(self.step, []):
            if fault.kind in _LOSS_FACTORS:
                factor = _LOSS_FACTORS[fault.kind] * (factor or 1.0)
        return factor

    def scheduled_skip(self, data_iterator: Iterator, num_microbatches: int) -> bool:
        """A resilience.skip_steps step: consume its batches, run nothing."""
        if self.step not in self.r.skip_steps:
            return False
        for _ in range(num_microbatches):
            next(data_iterator)
        self.machine.current_iteration += 1  # the machine's count stays the run's step
        self.verdict = Verdict(self.step, scheduled=True)
        return True

    def check_loss(self, losses: List[Dict[str, torch.Tensor]]) -> None:
        """This rank's loss over its micro-batches, checked before the data-parallel reduction."""
        if not losses:  # not the last pipeline stage: no loss here
            return
        total = torch.stack([item["lm loss"] for item in losses]).sum(dim=0).tolist()  # the one host sync
        validate_local_loss(self.machine, self.cfg, total[0] / max(total[1], 1.0))

    def discard_update(self) -> bool:
        """After the forward-backward loop: agree on the failures of every rank; True if the
        update of this step must not be applied. A collective: all ranks call it each step."""
        local = torch.zeros(self.world_size, len(CHECKS), dtype=torch.int32)
        for check in self.machine.failures:
            local[self.rank, CHECKS.index(check)] = 1
        table = sum_over_ranks(local)
        failed = {c: [r for r in range(self.world_size) if table[r][i]] for i, c in enumerate(CHECKS)}
        failed = {c: ranks for c, ranks in failed.items() if ranks}
        fatal = [c for c in failed if c not in _REPORTED or (c == "spike_loss" and self.r.spike_action == "bad_step")]
        self.verdict = Verdict(self.step, failed, bool(fatal), self.machine.diagnosis()) if failed else None
        self.machine.end_step()
        return bool(fatal)

    def record_times(self, forward_backward_s: float, optimizer_s: float) -> None:
        self.times.add(forward_backward_s, optimizer_s)

    # ----------------------------------------------------------- after the step

    def end_step(self, step: int, log: bool, metrics) -> Optional[Dict[str, Any]]:
        """Log what the checks found; raise BadStepError to stop; beat the watchdog. Returns
        the straggler report on logging steps (a collective then)."""
        verdict, self.verdict = self.verdict, None
        self.step = step + 1
        if verdict is not None:
            self._act_on(verdict, metrics)
        else:
            self.skipped_in_a_row = 0
        if self.watchdog is not None:
            self.watchdog.beat(step)
        if not log or self.world_size == 1:
            return None
        report = straggler_report(self.times.take(), self.world_size, self.rank)
        if report["straggler_ratio"] > self.r.straggler_warn_ratio:
            metrics.echo(
                f"warning: straggler at step {step}: rank {report['slowest_rank']} takes "
                f"{report['straggler_ratio']:.2f}x the step time of rank {report['fastest_rank']} "
                f"(resilience.straggler_warn_ratio={self.r.straggler_warn_ratio})"
            )
        return report

    def _act_on(self, verdict: Verdict, metrics) -> None:
        if not (verdict.bad or verdict.scheduled):
            self.skipped_in_a_row = 0
            metrics.event(verdict.record("reported"))
            metrics.echo(f"warning: step {verdict.step}: {verdict.describe()} (reported; the step was applied)")
            return
        if verdict.bad and self.r.on_bad_step == "stop":
            metrics.event(verdict.record("stopped"))
            self.close()
            raise BadStepError(
                f"step {verdict.step} failed its checks: {verdict.describe()}. Nothing from step {verdict.step} "
                f"was applied or saved; the latest checkpoint is the resume point "
                f"(resilience.on_bad_step=skip drops such steps instead). Details: {rundir.bad_steps_file(self.cfg.run.output_dir)}"
            )
        self.skipped_in_a_row += int(verdict.bad)  # scheduled skips are not failures
        metrics.event(verdict.record("skipped"))
        metrics.echo(f"step {verdict.step} skipped: {verdict.describe()}")
        if verdict.bad and self.skipped_in_a_row > self.r.max_skipped_steps:
            self.close()
            raise BadStepError(
                f"step {verdict.step} failed its checks ({verdict.describe()}), the {self.skipped_in_a_row}th step "
                f"in a row to be skipped (resilience.max_skipped_steps={self.r.max_skipped_steps}); stopping. "
                "The latest checkpoint is the resume point"
            )


def _poison_one_grad(model_chunks, value: float) -> None:
    """Set one element of this rank's first local gradient to `value`."""
    for chunk in model_chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                grad.view(-1)[0] = value
                return
