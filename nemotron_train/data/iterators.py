"""Micro-batch iterators in Megatron's sample order (MegatronPretrainingSampler).

Samples are taken in dataset order starting at `consumed_samples`, in groups of
micro_batch_size x dp_size: each group is one micro-batch per data-parallel rank, rank r
taking the r-th slice. A global batch is num_microbatches consecutive groups, so a
global batch is split across DP ranks first and then into micro-batches, and the order
does not depend on the batch-size ramp. A run resumed at `consumed_samples` (saved in
its checkpoint) therefore sees exactly the samples the uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import torch
from torch.utils.data import DataLoader

from nemotron_train.errors import DataError
from nemotron_train.config.schema import Config


@dataclass
class DataLoaderState:
    """Position in the sample stream; the trainer keeps it in its checkpoints."""

    consumed_samples: int = 0

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "DataLoaderState":
        return cls(consumed_samples=int(state.get("consumed_samples", 0)))


class PretrainingSampler:
    """Batch sampler yielding this DP rank's index list for each micro-batch.

    `cyclic` wraps around at the end (for evaluation, which may ask for more samples than a
    small validation set holds); otherwise iteration stops at the last full group."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, cyclic: bool = False) -> None:
        if total_samples <= 0:
            raise DataError("the dataset has no samples; check data.blend and data.split")
        if not 0 <= dp_rank < dp_size or micro_batch_size <= 0:
            raise ValueError(f"bad data-parallel layout: rank {dp_rank} of {dp_size}, micro batch {micro_batch_size}")
        if consumed_samples < 0 or (consumed_samples >= total_samples and not cyclic):
            raise DataError(
                f"consumed_samples={consumed_samples} is beyond the {total_samples} samples of the dataset; "
                "the checkpoint belongs to a longer run (raise train.steps)"
            )
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.group = micro_batch_size * dp_size
        self.start = dp_rank * micro_batch_size
        self.cyclic = cyclic

    def __len__(self) -> int:
        return (self.total - self.consumed % self.total) // self.group

    def __iter__(self) -> Iterator[List[int]]:
        idx = self.consumed % self.total if self.cyclic else self.consumed
        while True:
            end = idx + self.group
            if end > self.total:
                if not self.cyclic:
                    return
                # Wrap: the group continues from the start of the dataset.
                group = [i % self.total for i in range(idx, end)]
                idx = end % self.total
            else:
                group = list(range(idx, end))
                idx = end
            yield group[self.start : self.start + self.mbs]


class MicroBatchIterator:
    """Iterator of micro-batches (dict of tensors [micro_batch_size, seq_length]) that keeps
    `state.consumed_samples` in step with what the whole data-parallel group has drawn."""

    def __init__(self, dataset: Any, sampler: PretrainingSampler, num_workers: int) -> None:
        self.state = DataLoaderState(sampler.consumed)
        self._group = sampler.group
        loader = DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
            persistent_workers=False, collate_fn=_collate,
        )
        self._it = iter(loader)

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch = next(self._it)
        self.state.consumed_samples += self._group
        return batch


def _collate(items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.as_tensor(values)
    return out


def make_train_iterator(train_ds: Any, cfg: Config, dp_rank: int, dp_size: int, consumed_samples: int) -> MicroBatchIterator:
    """This DP rank's training micro-batches from `consumed_samples` on."""
    sampler = PretrainingSampler(len(train_ds), consumed_samples, cfg.train.micro_batch_size, dp_rank, dp_size)
    return MicroBatchIterator(train_ds, sampler, cfg.data.num_workers)


def make_eval_iterator(valid_ds: Any, cfg: Config, dp_rank: int, dp_size: int, consumed_samples: int = 0) -> MicroBatchIterator:
    """Evaluation micro-batches; starts at `consumed_samples` (0: every evaluation sees the
    same samples, comparable across steps) and wraps around instead of running out."""
    sampler = PretrainingSampler(len(valid_ds), consumed_samples, cfg.train.micro_batch_size, dp_rank, dp_size, cyclic=True)
    return MicroBatchIterator(valid_ds, sampler, cfg.data.num_workers)
