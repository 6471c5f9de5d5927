"""megatron-core's RerunStateMachine, initialised explicitly, with every failed check recorded.

megatron-core validates results through one process-wide RerunStateMachine: its DDP checks
each bucket's local gradient norm before the data-parallel reduction (NaN, Inf, and with
`check_for_large_grads` unexpectedly large norms), and the training step validates each
rank's loss the same way (Megatron-LM's pretrain scripts: NaN, Inf, spiky loss). Two
changes to how the machine is used here:

- every check that fails is recorded by name, so the step guard can agree across ranks on
  what failed where, and stop or skip the step on every rank together;
- in mode `disabled`, megatron-core raises on the one rank whose check failed; the other
  ranks would then wait in the next collective until its timeout. Here a failed check is
  recorded (and written to the tracker file) instead, and the step guard acts on it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, List, Optional

import torch
from megatron.core import rerun_state_machine as mcore_rerun
from megatron.core.rerun_state_machine import (
    RerunDiagnostic,
    RerunErrorInjector,
    RerunMode,
    RerunState,
    RerunStateMachine,
)

from nemotron_train.config.schema import Config

# Our rerun_mode names -> megatron-core's.
RERUN_MODES = {
    "disabled": RerunMode.DISABLED,
    "validate_results": RerunMode.VALIDATE_RESULTS,
    "report_stats": RerunMode.REPORT_DETERMINISM_STATS,
}

# Messages of the loss checks (as Megatron-LM words them); the grad checks are megatron-core's.
NAN_LOSS_MESSAGE = "found NaN in local forward loss calculation"
INF_LOSS_MESSAGE = "found Inf in local forward loss calculation"
SPIKE_LOSS_MESSAGE = "Spiky loss"


def check_of(message: str) -> str:
    """The check a validation message belongs to (one of guard.CHECKS)."""
    if message == NAN_LOSS_MESSAGE:
        return "nan_loss"
    if message == INF_LOSS_MESSAGE:
        return "inf_loss"
    if message == SPIKE_LOSS_MESSAGE:
        return "spike_loss"
    if "grad" in message:  # megatron-core's DDP bucket checks
        if "NaN" in message:
            return "nan_grad"
        if "Inf" in message:
            return "inf_grad"
        return "large_grad"
    return "other"


class RecordingRerunStateMachine(RerunStateMachine):
    """megatron-core's machine; `failures` lists the checks that failed in the current step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures: List[str] = []

    def validate_result(
        self,
        result: Any,
        rejection_func: Callable[[Any], bool],
        message: str,
        comparison_func: Optional[Callable[[Any, Any], float]] = None,
        tolerance: float = 0.0,
        fatal: bool = True,
    ) -> None:
        check = check_of(message)

        def recording(value: Any) -> bool:
            rejected = bool(rejection_func(value))
            if rejected:
                self.failures.append(check)
            return rejected

        if self.mode == RerunMode.DISABLED:
            # Not fatal here: the guard stops every rank together (see the module docstring).
            super().validate_result(result, recording, message, comparison_func, tolerance, fatal=False)
            return
        if self.mode == RerunMode.REPORT_DETERMINISM_STATS:
            # The machine only collects statistics in this mode; the checks still apply.
            if self.state == RerunState.INITIAL_RUN:
                recording(result)
            super().validate_result(result, rejection_func, message, comparison_func, tolerance, fatal)
            return
        initial, before = self.state == RerunState.INITIAL_RUN, self.rerun_requested
        super().validate_result(result, rejection_func, message, comparison_func, tolerance, fatal)
        if initial and self.rerun_requested and not before:
            injected = self.error_injector.injected_error_type is not None
            self.failures.append("injected_error" if injected else check)

    def diagnosis(self) -> Optional[str]:
        """After the step's forward-backward loop in mode validate_results: what the in-place
        re-run of a failed step found."""
        if self.mode != RerunMode.VALIDATE_RESULTS or not self.failures:
            return None
        if self.state == RerunState.RERUNNING_IN_PLACE:
            return "not reproduced by a re-run on the same device: a transient fault"
        if self.state == RerunState.WILL_RERUN_FROM_CHECKPOINT:
            return (
                "reproduced by a re-run on the same device: resume the last checkpoint on other nodes "
                "to tell a faulty device from a data or model problem"
            )
        return "reported, not fatal"

    def end_step(self) -> None:
        """Back to the state between steps whatever the step found: the guard, not the
        machine, decides how a failed step ends (megatron-core would save and exit here)."""
        self.first_iteration_complete = True
        self.state = RerunState.NOT_RUNNING_YET
        self.failures = []


def install_rerun_state_machine(cfg: Config, tracker_file: str) -> RecordingRerunStateMachine:
    """Initialise megatron-core's machine explicitly for this run (replacing any earlier one)."""
    r = cfg.resilience
    machine = RecordingRerunStateMachine(
        mode=RERUN_MODES[r.rerun_mode],
        error_injector=RerunErrorInjector(
            error_injection_rate=r.error_injection_rate,
            error_injection_type=RerunDiagnostic(r.error_injection_type),
        ),
        result_rejected_tracker_filename=tracker_file,
    )
    mcore_rerun.destroy_rerun_state_machine()
    mcore_rerun._set_rerun_state_machine(machine)  # initialize_rerun_state_machine() takes no class
    return machine


def validate_local_loss(machine: RerunStateMachine, cfg: Config, local_loss: float) -> None:
    """Megatron-LM's loss checks on this rank's loss (a host value: no device sync here)."""
    r = cfg.resilience
    value = torch.tensor(local_loss, dtype=torch.float64)
    if r.check_nan_in_loss:
        machine.validate_result(value, torch.isnan, NAN_LOSS_MESSAGE, tolerance=0.0, fatal=True)
        machine.validate_result(value, torch.isinf, INF_LOSS_MESSAGE, tolerance=0.0, fatal=True)
    if r.spike_factor:
        spiky = partial(machine.is_unexpectedly_large, threshold=r.spike_factor, context="loss", num_samples=r.spike_window)
        machine.validate_result(value, spiky, SPIKE_LOSS_MESSAGE, tolerance=0.0, fatal=r.spike_action == "bad_step")
