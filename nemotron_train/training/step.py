"""One training / evaluation step through megatron-core's forward-backward schedules.

The loss is a per-token mean over the *global* batch: each micro-batch returns its loss
sum and token count, mcore's `calculate_per_token_loss` path divides the gradients by the
total token count across micro-batches and data-parallel ranks. That makes every layout
(TP, PP, DP, gradient accumulation) compute the same loss and the same update.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.rerun_state_machine import get_rerun_state_machine

if TYPE_CHECKING:
    from nemotron_train.training.resilience import StepGuard


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, loss_factor: Optional[float] = None):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    if loss_factor is not None:  # a drill fault (resilience.inject): NaN, Inf or a spike
        loss_sum = loss_sum * loss_factor
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(device: torch.device, data_iterator: Iterator, model: torch.nn.Module, loss_factor: Optional[float] = None):
    batch = next(data_iterator)
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask, loss_factor=loss_factor)


def reduce_loss(losses: List[Dict[str, torch.Tensor]], pgs: ProcessGroupCollection, device: torch.device) -> float:
    """Global per-token loss, visible on every rank (computed on the last PP stage)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses:
        total += item["lm loss"].to(torch.float64)
    dist.all_reduce(total, group=pgs.dp)
    if pgs.pp.size() > 1:
        last = dist.get_global_rank(pgs.pp, pgs.pp.size() - 1)
        dist.broadcast(total, src=last, group=pgs.pp)
    return (total[0] / total[1].clamp(min=1)).item()


def train_step(
    model: torch.nn.Module,
    optimizer,
    scheduler,
    data_iterator: Iterator,
    pgs: ProcessGroupCollection,
    device: torch.device,
    seq_length: int,
    micro_batch_size: int,
    global_batch_size: int,
    guard: Optional["StepGuard"] = None,
) -> Tuple[float, Optional[float], bool]:
    """One step; with a `guard` (training/resilience), the forward-backward pass runs under
    megatron-core's RerunStateMachine (which may re-run it) and a step that failed its checks
    on any rank leaves the optimizer and the LR schedule untouched (returns ok=False)."""
    if guard is not None and guard.scheduled_skip(data_iterator, get_num_microbatches()):
        return float("nan"), None, False
    rerun = get_rerun_state_machine()
    loss_factor = guard.loss_factor() if guard is not None else None
    start = time.perf_counter()
    while rerun.should_run_forward_backward(data_iterator):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=partial(forward_step, device, loss_factor=loss_factor),
            data_iterator=data_iterator,
            model=[model],
            num_microbatches=get_num_microbatches(),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        if guard is not None:
            guard.check_loss(losses)
    forward_backward_s = time.perf_counter() - start
    if guard is not None and guard.discard_update():  # the same answer on every rank
        guard.record_times(forward_backward_s, 0.0)
        return reduce_loss(losses, pgs, device), None, False
    start = time.perf_counter()
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=global_batch_size)
    if guard is not None:
        guard.record_times(forward_backward_s, time.perf_counter() - start)
    return reduce_loss(losses, pgs, device), grad_norm, ok


@torch.no_grad()
def eval_step(model, data_iterator, pgs, device, seq_length, micro_batch_size, num_microbatches) -> float:
    model.eval()
    try:
        losses = get_forward_backward_func()(
            forward_step_func=partial(forward_step, device),
            data_iterator=data_iterator,
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    finally:
        model.train()
    return reduce_loss(losses, pgs, device)
