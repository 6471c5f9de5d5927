"""The on-disk checkpoint layout (nemotron_train/checkpoint/layout.py): staged commit,
tracker, metadata and locating a checkpoint. No megatron-core: directories only."""

import json

import pytest

from nemotron_train.checkpoint import layout
from nemotron_train.errors import CheckpointError, UserError


def _save(root, step, **extra):
    staging = layout.fresh_staging_dir(layout.iter_dir(root, step))
    (staging / "shard.distcp").write_text("weights")
    return layout.commit(root, staging, layout.make_meta(step, 8 * step, {"model": {}}, **extra))


def test_commit_publishes_the_staged_iteration_and_replaces_the_tracker(tmp_path):
    root = tmp_path / "checkpoints"
    first = _save(root, 3)
    assert first == root / "iter_0000003" and (first / "shard.distcp").exists()
    assert not (root / "iter_0000003.incomplete").exists()
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert json.loads((first / "nemotron_train.json").read_text()) == {"step": 3, "consumed_samples": 24, "config": {"model": {}}}
    _save(root, 10, model_only=True, source="x")
    assert layout.read_tracker(root) == 10 and layout.is_model_only(layout.read_meta(root / "iter_0000010"))
    assert [p.name for p in layout.complete_iterations(root)] == ["iter_0000003", "iter_0000010"]
    assert not list(root.glob("*.tmp"))


def test_an_interrupted_save_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 3)
    staging = layout.fresh_staging_dir(layout.iter_dir(root, 6))
    (staging / "shard.distcp").write_text("half")
    assert layout.read_tracker(root) == 3
    assert [p.name for p in layout.complete_iterations(root)] == ["iter_0000003"]
    assert layout.incomplete_iterations(root) == [staging]
    assert layout.locate_checkpoint(root) == root / "iter_0000003"
    with pytest.raises(CheckpointError, match="interrupted save"):
        layout.locate_checkpoint(staging)


def test_locate_from_a_run_dir_a_checkpoints_dir_or_an_iteration(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 2)
    _save(root, 4)
    assert layout.locate_checkpoint(tmp_path / "run") == root / "iter_0000004"
    assert layout.locate_checkpoint(root) == root / "iter_0000004"
    assert layout.locate_checkpoint(root, iteration=2) == root / "iter_0000002"
    assert layout.locate_checkpoint(root / "iter_0000002") == root / "iter_0000002"
    with pytest.raises(CheckpointError, match="already one iteration"):
        layout.locate_checkpoint(root / "iter_0000002", iteration=2)
    with pytest.raises(CheckpointError, match="iter_0000002, iter_0000004"):
        layout.locate_checkpoint(root, iteration=3)


def test_locate_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        layout.locate_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt"):
        layout.locate_checkpoint(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("soon")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        layout.read_tracker(tmp_path)
    assert layout.holds_checkpoint(tmp_path) and not layout.holds_checkpoint(tmp_path / "new")
