"""How a run checkpoint's sharded state is built, written and read: fully in parallel, still
reshardable across TP, PP and DP.

**Optimizer state in model space, written where it lives.** The distributed optimizer keeps,
on each data-parallel rank, a contiguous flat range of every parameter's TP-local tensor (its
main copy and Adam moments). That range is cut into at most 2*ndim-1 rectangular boxes
(`flat_range_boxes`), and each box becomes a ShardedTensor of the parameter's *model-space*
tensor `optimizer.state.<param|exp_avg|exp_avg_sq>.<model key>`, at its global offset. So
every rank writes exactly the state it holds (no gather), and a reader with any other TP, PP
or DP layout asks for its own boxes, which torch.distributed.checkpoint assembles from
whatever boxes were stored. Keys and global shapes are those of megatron-core's
`fully_reshardable` format, whose saves gathered everything on data-parallel rank 0: old
checkpoints load through this path unchanged, and megatron-core's own `fully_reshardable`
loader reads the new ones (the on-disk tensors are the same, only cut differently).

megatron-core 0.16's `fully_sharded_model_space` type describes the same idea with
`ShardedTensor.flattened_range`, which 0.16's own ShardedTensor validation rejects
("flattened_range is not supported"), and it names the main copy `fp32_param`, so old
checkpoints would not load with it. See docs/checkpoints.md.

**Replicated tensors split across data-parallel replicas.** Model weights are the same on
every data-parallel rank; megatron-core's `FullyParallelSaveStrategyWrapper` spreads their
writing over the data-parallel (x context-parallel) group, and
`FullyParallelLoadStrategyWrapper` reads each once and exchanges it.

**No copy on save.** megatron-core's writer clones every CPU tensor that is a view of a larger
storage (so that `torch.save` does not write the whole storage), and parameters and optimizer
state are all views of flat buffers: that clone was a second copy of the shard. Each tensor is
handed over instead as an alias with its own storage of exactly its bytes (`_exact_storage`),
so nothing is copied and the writer processes stream straight from the training memory. An
async save forks its writer, so training may continue while the fork writes its snapshot.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
)

# The on-disk name of the optimizer layout (the same tensors as megatron-core's format of
# that name; see the module docstring).
OPTIM_SHARDING_TYPE = "fully_reshardable"
PARAM_STATE = "param_state"
_TARGETS = "load_targets"
_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")

Box = Tuple[Tuple[int, ...], Tuple[int, ...], int]  # (offset, size, first flat index)


# --------------------------------------------------------------------------- flat ranges as boxes


def flat_range_boxes(shape: Sequence[int], start: int, end: int) -> List[Box]:
    """Rectangular boxes covering the row-major flat range [start, end) of a tensor of `shape`,
    in flat order; each box is itself a contiguous flat range (first index given)."""
    shape = tuple(shape)
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,) * len(shape), (end - start,) * len(shape), start)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (end - 1) // inner
    boxes: List[Box] = []

    def within_row(row: int, lo: int, hi: int) -> None:
        for off, size, flat in flat_range_boxes(shape[1:], lo, hi):
            boxes.append(((row, *off), (1, *size), row * inner + flat))

    if first == last:
        within_row(first, start - first * inner, end - first * inner)
        return boxes
    full_lo, full_hi = first, last + 1
    if start % inner:
        within_row(first, start % inner, inner)
        full_lo += 1
    if end % inner:
        full_hi -= 1
    if full_hi > full_lo:
        boxes.append(((full_lo,) + (0,) * (len(shape) - 1), (full_hi - full_lo, *shape[1:]), full_lo * inner))
    if end % inner:
        within_row(last, 0, end % inner)
    return boxes


def _model_chunks(sh) -> List[Tuple[ShardedTensor, int]]:
    """The ShardedTensors a model entry is saved as, each with its first flat index in the
    local tensor. A factory (e.g. the Mamba in_proj split into z, x, B, C, dt) is built on a
    meta tensor to learn where its pieces lie."""
    if isinstance(sh, ShardedTensor):
        return [(sh, 0)]
    assert isinstance(sh, ShardedTensorFactory), type(sh)
    probe = torch.empty(sh.data.shape, dtype=sh.data.dtype, device="meta")
    chunks = []
    for piece in nested_values(sh.build_fn(sh.key, probe, sh.replica_id, None)):
        assert isinstance(piece, ShardedTensor) and piece.data.is_contiguous(), f"{sh.key}: unsupported factory piece"
        chunks.append((piece, piece.data.storage_offset()))
    return chunks


def _state_boxes(chunk: ShardedTensor, chunk_start: int, lo: int, hi: int, replica_id) -> List[Tuple[int, ShardedTensor]]:
    """ShardedTensors (without data) for the flat range [lo, hi) of the local tensor that fall
    in `chunk`, each with its first flat index in the local tensor."""
    a, b = max(lo, chunk_start), min(hi, chunk_start + chunk.data.numel())
    out = []
    p = chunk.prepend_axis_num
    for off, size, flat in flat_range_boxes(chunk.local_shape, a - chunk_start, b - chunk_start):
        global_offset = tuple(chunk.global_offset[:p]) + tuple(g + o for g, o in zip(chunk.global_offset[p:], off))
        box = replace(chunk, data=None, local_shape=tuple(size), global_offset=global_offset,
                      axis_fragmentations=None, replica_id=replica_id, flattened_range=None)
        out.append((chunk_start + flat, box))
    return out


# --------------------------------------------------------------------------- optimizer state dict


def _distributed_optimizers(optimizer) -> List[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return all(isinstance(o, DistributedOptimizer) for o in _distributed_optimizers(optimizer))


def _param_ranges(dopt):
    """(model_param, start, end) of every parameter range this rank's optimizer owns, in
    megatron-core's order."""
    for gbuf_range_maps in dopt.gbuf_ranges:
        for range_map_for_all_buckets in gbuf_range_maps.values():
            for range_map in range_map_for_all_buckets:
                for model_param, ranges in range_map["param_map"].items():
                    yield model_param, ranges["param"].start, ranges["param"].end


def _dopt_param_state(dopt, param_to_sh: Dict[torch.Tensor, Any]) -> Dict[int, Dict[str, list]]:
    """The model-space boxes of one distributed optimizer's state, data attached (views)."""
    state: Dict[int, Dict[str, list]] = {}
    for idx, (model_param, lo, hi) in enumerate(_param_ranges(dopt)):
        if model_param not in param_to_sh:
            raise ValueError(f"parameter of shape {tuple(model_param.shape)} is not in the model's sharded state dict")
        tensors = dopt._get_main_param_and_optimizer_states(model_param)
        entry: Dict[str, list] = {}
        for chunk, chunk_start in _model_chunks(param_to_sh[model_param]):
            assert len(chunk.replica_id) == 3, f"expected a (PP, TP, DP) replica id: {chunk}"
            # Data-parallel ranks own disjoint ranges: every box is a main replica along DP.
            replica_id = (*chunk.replica_id[:2], dopt.distributed_optimizer_instance_id)
            for flat, box in _state_boxes(chunk, chunk_start, lo, hi, replica_id):
                for name in _STATE_KEYS:
                    flat_state = tensors[name]
                    data = flat_state[flat - lo: flat - lo + math.prod(box.local_shape)].view(box.local_shape)
                    entry.setdefault(name, []).append(
                        replace(box, key=f"optimizer.state.{name}.{chunk.key}", data=data, dtype=data.dtype)
                    )
        state[idx] = entry
    return state


def optimizer_sharded_state_dict(optimizer, model_sd, is_loading: bool) -> Dict[str, Any]:
    """The optimizer part of a checkpoint: each rank's own state as model-space boxes (see the
    module docstring). A non-distributed optimizer keeps megatron-core's own mapping."""
    if not _is_distributed(optimizer):
        return optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    param_to_sh = {sh.data: sh for sh in nested_values(model_sd) if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
    dopts = _distributed_optimizers(optimizer)
    parts = []
    for i, dopt in enumerate(dopts):
        param_state = _dopt_param_state(dopt, param_to_sh)
        part = {**dopt.state_dict(), PARAM_STATE: param_state, "param_state_sharding_type": OPTIM_SHARDING_TYPE}
        if is_loading:  # where each box goes: handed back untouched by the load
            part[_TARGETS] = LocalNonpersistentObject(
                {idx: {name: [box.data for box in boxes] for name, boxes in entry.items()} for idx, entry in param_state.items()}
            )
        if len(dopts) > 1:  # megatron-core's key prefix for chained optimizers
            from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

            add_prefix_for_sharding(part, f"chained_{i}.")
        parts.append(part)
    return parts[0] if len(parts) == 1 else dict(enumerate(parts))


def load_optimizer_state(optimizer, loaded: Dict[str, Any]) -> None:
    """Restore the optimizer from what `dist_checkpointing.load` returned for
    `optimizer_sharded_state_dict(..., is_loading=True)`: each box of state into the live
    optimizer state, then param groups and step."""
    if not _is_distributed(optimizer):
        optimizer.load_state_dict(loaded)
        return
    dopts = _distributed_optimizers(optimizer)
    parts = [loaded] if len(dopts) == 1 else [loaded[i] for i in range(len(dopts))]
    for dopt, part in zip(dopts, parts):
        _copy_into(part[_TARGETS], part[PARAM_STATE])
        common = {k: v for k, v in part.items() if k not in (PARAM_STATE, _TARGETS, "param_state_sharding_type")}
        # Param groups and step; torch keeps (or converts) the state tensors filled above.
        dopt.load_state_dict(common)
    if len(dopts) > 1:
        optimizer._synchronize_steps()


@torch.no_grad()
def _copy_into(targets: Dict[int, Dict[str, list]], loaded: Dict[int, Dict[str, list]]) -> None:
    """Boxes not read in place (e.g. received from another replica) are copied into the
    optimizer state they were asked for."""
    for idx, entry in targets.items():
        for name, views in entry.items():
            for view, value in zip(views, loaded[idx][name], strict=True):
                if value.data_ptr() != view.data_ptr():
                    view.copy_(value)


# --------------------------------------------------------------------------- save and load


def _exact_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` (a contiguous CPU view) as a tensor over the same memory whose storage is exactly
    its own bytes, so the writer neither clones it nor writes the whole underlying buffer."""
    t = t.detach()
    if t.device.type != "cpu" or t.dim() == 0 or t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    assert t.is_contiguous(), "checkpoint tensors are contiguous views"
    raw = torch.from_numpy(t.reshape(-1).view(torch.uint8).numpy())
    return raw.view(t.dtype).view(t.shape)


def _strategies(pgs):
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistLoadShardedStrategy,
        TorchDistSaveShardedStrategy,
    )

    save = FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1), pgs.dp_cp)
    load = FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), pgs.dp_cp)
    return save, load


def save(sd: Dict[str, Any], directory: Path, pgs, async_save: bool):
    """Write `sd` into `directory` from every rank; returns megatron-core's AsyncRequest when
    `async_save` (the caller schedules it), else None once this rank's shards are on disk."""
    # The zip CRC32 torch.save computes over every byte is never checked by torch.load (a
    # flipped byte loads silently), so it only costs write time; shard files are checked by
    # length at resume (layout.unreadable_reason). Process-wide: the writers are forked later.
    torch.serialization.set_crc32_options(False)
    apply_factories(sd)  # pieces of a split tensor become their own contiguous tensors
    for sh in nested_values(sd):
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            sh.data = _exact_storage(sh.data)
    strategy, _ = _strategies(pgs)
    return dist_checkpointing.save(sd, str(directory), strategy, async_sharded_save=async_save)


def load(sd: Dict[str, Any], directory: Path, pgs) -> Dict[str, Any]:
    """Read the state `sd` asks for; each data-parallel replica reads part and shares it."""
    _, strategy = _strategies(pgs)
    return dist_checkpointing.load(sd, str(directory), strategy)
