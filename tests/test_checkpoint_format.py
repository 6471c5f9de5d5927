"""The checkpoint format: flat optimizer ranges as model-space boxes, a checkpoint written by
the first format (optimizer state gathered on data-parallel rank 0) loading into two
data-parallel ranks, and the new format's tensors being bitwise those of the old one while
every rank writes its own part."""

import json
import math
import random
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from nemotron_train.checkpoint.strategy import flat_range_boxes

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "ckpt_fully_reshardable"
# The Mamba tensors megatron-core saves as pieces (its in_proj / conv1d split), in order.
SPLITS = {"in_proj.weight": ["z", "x", "B", "C", "dt"], "conv1d.weight": ["x", "B", "C"], "conv1d.bias": ["x", "B", "C"]}


def test_flat_range_boxes_cover_the_range_exactly():
    rng = random.Random(0)
    for _ in range(2000):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        n = math.prod(shape)
        start = rng.randint(0, n)
        end = rng.randint(start, n)
        ref = torch.arange(n).view(shape)
        boxes = flat_range_boxes(shape, start, end)
        assert len(boxes) <= 2 * len(shape) - 1
        covered = []
        for offset, size, first in boxes:
            values = ref[tuple(slice(o, o + s) for o, s in zip(offset, size))].reshape(-1).tolist()
            assert values == list(range(first, first + len(values))), (shape, start, end, offset, size)
            covered += values
        assert covered == list(range(start, end)), (shape, start, end, boxes)


def _full(tensors, key):
    """A model-space tensor of the checkpoint, its megatron-core pieces put back together."""
    if key in tensors:
        return tensors[key]
    suffix = next(s for s in SPLITS if key.endswith(s))
    return torch.cat([tensors[f"{key}.{piece}"] for piece in SPLITS[suffix]])


def _resume_old_save_new(rank, world_size, run_dir, new_root):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from torch.distributed.checkpoint import FileSystemReader

    from nemotron_train.checkpoint.strategy import _param_ranges
    from nemotron_train.config import load_config
    from nemotron_train.resolve import resolve_run
    from nemotron_train.training.loop import Trainer

    overrides = json.loads((FIXTURE / "run.json").read_text())["overrides"]
    # The first format's code did not pad the vocabulary: pad alike (272 rows, a multiple of 16).
    overrides += ["model.make_vocab_size_divisible_by=16"]
    cfg = load_config(SMOKE, [*overrides, f"run.output_dir={run_dir}", f"launch.nproc_per_node={world_size}"])
    trainer = Trainer(resolve_run(cfg, world_size=world_size))
    assert (trainer.state.step, trainer.state.consumed_samples) == (3, 12)
    old = dist_checkpointing.load_plain_tensors(str(Path(run_dir) / "checkpoints" / "iter_0000003"))

    model_sd = trainer.model.module.sharded_state_dict()
    key_of = {sh.data: sh.key for sh in nested_values(model_sd) if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
    dopt = trainer.optimizer.chained_optimizers[0]

    def holds_old_state() -> int:
        """What this data-parallel rank holds is its range of the old, gathered tensors."""
        owned = 0
        for param, lo, hi in _param_ranges(dopt):
            key = key_of[param]
            assert torch.equal(param.detach(), _full(old, key)), key
            state = dopt._get_main_param_and_optimizer_states(param)
            for name in ("param", "exp_avg", "exp_avg_sq"):
                expected = _full(old, f"optimizer.state.{name}.{key}").reshape(-1)[lo:hi]
                assert torch.equal(state[name], expected), (name, key, lo, hi)
            assert float(state["step"]) == 3.0
            owned += hi - lo
        return owned

    owned = holds_old_state()
    assert trainer.scheduler.num_steps == 12

    # Saved again in the new format (as step 4: a resumed run does not save its own step
    # again; nothing is trained in between): the same tensors on disk, bitwise.
    trainer.checkpointer.root = Path(new_root)
    trainer.state.step = 4
    path = trainer.checkpointer.save(trainer.model, trainer.optimizer, trainer.scheduler, trainer.state)
    new = dist_checkpointing.load_plain_tensors(str(path))
    tensors = sorted(k for k, v in old.items() if isinstance(v, torch.Tensor))
    assert tensors == sorted(k for k, v in new.items() if isinstance(v, torch.Tensor))
    assert any(k.startswith("optimizer.state.exp_avg.") for k in tensors)
    different = [k for k in tensors if not torch.equal(old[k], new[k])]
    assert not different, different[:5]

    # megatron-core's own loader of the first format reads the new checkpoint back.
    with torch.no_grad():
        for param, _, _ in _param_ranges(dopt):
            for value in dopt._get_main_param_and_optimizer_states(param).values():
                value.zero_()
    mcore_format = {"distrib_optim_sharding_type": "fully_reshardable"}
    request = trainer.optimizer.sharded_state_dict(trainer.model.module.sharded_state_dict(), is_loading=True, metadata=mcore_format)
    trainer.optimizer.load_state_dict(dist_checkpointing.load({"optimizer": request}, str(path))["optimizer"])
    holds_old_state()

    # Who wrote what: tensor bytes per rank's files, optimizer state and model weights apart.
    written = defaultdict(int)
    metadata = FileSystemReader(str(path)).read_metadata()
    for index, info in metadata.storage_data.items():
        tensor = metadata.state_dict_metadata[index.fqn]
        if not hasattr(tensor, "chunks"):
            continue  # an object, not a tensor
        chunk = next(c for c in tensor.chunks if tuple(c.offsets) == tuple(index.offset))
        writer = int(info.relative_path.split("_")[2])
        written[(writer, index.fqn.startswith("optimizer."))] += math.prod(chunk.sizes) * tensor.properties.dtype.itemsize
    return {"owned": owned, "written": dict(written)}


@pytest.mark.slow
def test_old_format_checkpoint_loads_into_two_ranks_and_saves_the_same_tensors(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoints", run_dir / "checkpoints")
    results = run_distributed(_resume_old_save_new, 2, str(run_dir), str(tmp_path / "new"), timeout_s=240, daemon=False)
    # Two data-parallel ranks own disjoint halves of the optimizer state ...
    owned = [r["owned"] for r in results]
    assert abs(owned[0] - owned[1]) <= 0.1 * sum(owned)
    written = results[0]["written"]
    # ... and each wrote its own half, plus part of the replicated model weights.
    for rank in (0, 1):
        assert written[(rank, True)] >= 0.4 * (written[(0, True)] + written[(1, True)]), written
        assert written[(rank, False)] > 0, written


def _iteration(root: Path, step: int) -> None:
    """A complete iteration `step` under `root` (the fixture's shards, its metadata renamed)."""
    from nemotron_train.checkpoint import layout

    dst = layout.iter_dir(root, step)
    shutil.copytree(FIXTURE / "checkpoints" / "iter_0000003", dst)
    meta = layout.read_meta(dst)
    meta["step"] = step
    layout.meta_file(dst).write_text(json.dumps(meta))
    layout.write_tracker(root, step)


@pytest.mark.parametrize("persistent,non_persistent,loaded,expected", [
    (3, 5, None, "checkpoints_non_persistent/iter_0000005"),  # the newer one wins
    (6, 5, None, "checkpoints/iter_0000006"),
    (5, 5, None, "checkpoints/iter_0000005"),  # a tie goes to the persistent copy
    (None, 2, 7, "checkpoints_non_persistent/iter_0000002"),  # the run's own beats checkpoint.load
    (None, None, 7, "start/iter_0000007"),
])
def test_resume_takes_the_newest_of_persistent_and_non_persistent(tmp_path, persistent, non_persistent, loaded, expected):
    from nemotron_train.checkpoint.manager import Checkpointer
    from nemotron_train.config import load_config

    run = tmp_path / "run"
    overrides = [f"run.output_dir={run}", "checkpoint.non_persistent_interval=2"]
    if persistent is not None:
        _iteration(run / "checkpoints", persistent)
    if non_persistent is not None:
        _iteration(run / "checkpoints_non_persistent", non_persistent)
    if loaded is not None:
        _iteration(tmp_path / "start", loaded)
        overrides.append(f"checkpoint.load={tmp_path / 'start'}")
    ckpt = Checkpointer(load_config(SMOKE, overrides), pgs=None, is_logging_rank=False)
    found = ckpt._resume_dir()
    assert found.relative_to(found.parents[1]).as_posix() == expected


def _plan(*args):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "nemotron_train", "plan", *args], capture_output=True, text=True, cwd=ROOT)
    return proc


def test_plan_reports_checkpoint_size_and_save_time():
    plan = json.loads(_plan(str(SMOKE), "--device", "cpu", "--fs-gbps", "2", "--json").stdout)
    ck = plan["checkpoint"]
    # fp32 weights + Adam: fp32 main copy, exp_avg, exp_avg_sq = 16 bytes per parameter.
    assert ck["bytes_per_param"] == 16
    assert ck["total_bytes"] == plan["total_params"] * 16
    assert ck["per_rank_bytes"] == plan["params_per_rank"] * 16 // plan["parallel"]["dp"]
    assert ck["save_seconds"] == pytest.approx(ck["total_bytes"] / 2e9)
    text = _plan(str(ROOT / "configs" / "nemotron_h_56b_pretrain.yaml")).stdout
    line = next(x for x in text.splitlines() if x.startswith("checkpoint:"))
    assert "14 bytes/param" in line and "at 20 GB/s" in line  # bf16 weights; the default bandwidth
    bad = _plan(str(SMOKE), "--fs-gbps", "0")
    assert bad.returncode == 2 and "--fs-gbps" in bad.stderr and "Traceback" not in bad.stderr
