"""Batches read once per tensor-parallel group and broadcast to the other TP ranks.

All ranks of a TP group train on the same micro-batches, so only TP rank 0 builds the
datasets and reads the `.bin/.idx` files (megatron-core's `is_built_on_rank`); the other
ranks receive each micro-batch over the TP group, as Megatron's `get_batch_on_this_tp_rank`
does. Each pipeline stage receives only what it uses: the first stage the inputs (`tokens`,
`position_ids`), the last stage the targets (`labels`, `loss_mask`); keys a stage does not
use are zero placeholders of the same shape, so the step function is the same everywhere.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

# key -> dtype on the wire; the shape is [micro_batch_size, seq_length] for all of them.
BATCH_KEYS: Dict[str, torch.dtype] = {
    "tokens": torch.int64,
    "position_ids": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
}
FIRST_STAGE_KEYS = ("tokens", "position_ids")
LAST_STAGE_KEYS = ("labels", "loss_mask")


def stage_keys(is_first_stage: bool, is_last_stage: bool) -> Tuple[str, ...]:
    """The batch keys a pipeline stage needs from the data."""
    keys: Tuple[str, ...] = ()
    if is_first_stage:
        keys += FIRST_STAGE_KEYS
    if is_last_stage:
        keys += LAST_STAGE_KEYS
    return keys


class TPBroadcastIterator:
    """Wraps TP rank 0's micro-batch iterator; on the other TP ranks `source` is None and each
    `next()` receives the batch from TP rank 0 of the same group.

    `device` is where the broadcast happens (the GPU with NCCL, the CPU with gloo)."""

    def __init__(self, source: Optional[Iterator[Dict[str, Any]]], tp_group: Any, shape: Tuple[int, int],
                 device: torch.device, is_first_stage: bool, is_last_stage: bool) -> None:
        self.group = tp_group
        self.is_src = tp_group.rank() == 0
        if self.is_src and source is None:
            raise ValueError("TP rank 0 reads the data: it needs a source iterator")
        self.source = source if self.is_src else None
        self.src_rank = dist.get_global_rank(tp_group, 0)
        self.shape = shape
        self.device = device
        self.keys = stage_keys(is_first_stage, is_last_stage)

    @property
    def state(self):
        """The source's position (TP rank 0 only; the trainer keeps its own sample count)."""
        return getattr(self.source, "state", None)

    def __iter__(self) -> "TPBroadcastIterator":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch: Dict[str, torch.Tensor] = {}
        if self.is_src:
            try:
                raw = next(self.source)
                ok = torch.ones(1, dtype=torch.int64, device=self.device)
            except StopIteration:
                raw, ok = None, torch.zeros(1, dtype=torch.int64, device=self.device)
            # The receivers learn whether there is a batch at all before waiting for one.
            dist.broadcast(ok, src=self.src_rank, group=self.group)
            if raw is None:
                raise StopIteration
            for key in self.keys:
                tensor = raw[key].to(device=self.device, dtype=BATCH_KEYS[key]).contiguous()
                dist.broadcast(tensor, src=self.src_rank, group=self.group)
                batch[key] = tensor
        else:
            ok = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.broadcast(ok, src=self.src_rank, group=self.group)
            if not ok.item():
                raise StopIteration
            for key in self.keys:
                tensor = torch.empty(self.shape, dtype=BATCH_KEYS[key], device=self.device)
                dist.broadcast(tensor, src=self.src_rank, group=self.group)
                batch[key] = tensor
        for key, dtype in BATCH_KEYS.items():
            if key not in batch:
                batch[key] = torch.zeros(self.shape, dtype=dtype, device=self.device)
        return batch


def tp_broadcast_iterator(source: Optional[Iterator[Dict[str, Any]]], pgs: Any, micro_batch_size: int,
                          seq_length: int, device: torch.device) -> Iterator[Dict[str, Any]]:
    """`source` itself for TP size 1, else a TPBroadcastIterator over `pgs.tp`."""
    if pgs.tp.size() == 1:
        assert source is not None
        return source
    pp_rank, pp_size = pgs.pp.rank(), pgs.pp.size()
    return TPBroadcastIterator(source, pgs.tp, (micro_batch_size, seq_length), device,
                               is_first_stage=pp_rank == 0, is_last_stage=pp_rank == pp_size - 1)


def reads_data(pgs: Any) -> bool:
    """Whether this rank builds the datasets and reads the files: TP rank 0 of its group."""
    return pgs.tp.rank() == 0
