"""The on-disk layout of run checkpoints: the one module that writes or parses its names.

    <checkpoint.dir>/                      default <run.output_dir>/checkpoints (rundir.checkpoint_dir)
        iter_0000100/                      megatron-core dist_checkpointing (torch_dist)
            nemotron_train.json            metadata: step, data position, resolved config
        iter_0000100.incomplete/           a save in progress (or an interrupted one)
        latest_checkpointed_iteration.txt  the tracker: the last complete iteration

The staged commit: shards are written into `iter_XXXXXXX.incomplete/` (dist_checkpointing
fsyncs them); then `commit` writes the metadata (fsync), renames the directory to
`iter_XXXXXXX/` and replaces the tracker (temp file, fsync, rename, fsync of the directory).
A crash at any point leaves the previous checkpoint and tracker intact. The Checkpointer
(manager.py) and the model-only save of `import-hf` (`save_model_only`) both commit this way.

`locate_checkpoint` turns what a user passes as `--checkpoint` (a run directory, a checkpoints
directory or one iteration directory) into the iteration directory to read.

Nothing here imports megatron-core at module level, so the command line can import it cheaply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from nemotron_train import rundir
from nemotron_train.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
META = "nemotron_train.json"
INCOMPLETE = ".incomplete"
# A complete iteration moved out of the way while a new save of the same step is published
# (a restart into a run directory that already holds that step), and one being deleted by
# `prune`. Neither name parses as an iteration, so a crash midway never leaves a half-deleted
# or half-replaced directory that looks complete; `recover` tidies them up at the next start.
REPLACED = ".replaced"
PRUNING = ".pruning"
_ITER_PREFIX = "iter_"
_ITER_RE = re.compile(r"iter_(\d+)")


# --------------------------------------------------------------------------- names


def iter_dir_name(step: int) -> str:
    return f"{_ITER_PREFIX}{step:07d}"


def iter_dir(root: Path, step: int) -> Path:
    return Path(root) / iter_dir_name(step)


def iteration_of(path: Path) -> Optional[int]:
    """The step of a complete-iteration directory name (`iter_0000100` -> 100), else None."""
    match = _ITER_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def staging_dir(final: Path) -> Path:
    """Where `final` is written before it is published (`<final>.incomplete`)."""
    final = Path(final)
    return final.with_name(final.name + INCOMPLETE)


def is_staging_dir(path: Path) -> bool:
    return Path(path).name.endswith(INCOMPLETE)


def tracker_file(root: Path) -> Path:
    return Path(root) / TRACKER


def meta_file(iteration_dir: Path) -> Path:
    return Path(iteration_dir) / META


def has_tracker(root: Path) -> bool:
    return tracker_file(root).exists()


def is_iteration_dir(path: Path) -> bool:
    """A complete iteration: its metadata file exists (it is written last, before the rename)."""
    return meta_file(path).is_file()


def complete_iterations(root: Path) -> List[Path]:
    """Complete iteration directories under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(iteration_of(p), p) for p in root.iterdir() if p.is_dir() and iteration_of(p) is not None]
    return [p for _, p in sorted(found) if is_iteration_dir(p)]


def incomplete_iterations(root: Path) -> List[Path]:
    """Leftover staging directories of interrupted saves under `root`."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{_ITER_PREFIX}*{INCOMPLETE}") if p.is_dir())


def holds_checkpoint(root: Path) -> bool:
    """Whether `root` already has a tracker or any iteration directory (complete or not)."""
    root = Path(root)
    return has_tracker(root) or (root.is_dir() and any(root.glob(f"{_ITER_PREFIX}*")))


# --------------------------------------------------------------------------- tracker and metadata


def fsync_write(path: Path, text: str) -> None:
    """Replace `path` with `text` durably: temp file, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_tracker(root: Path) -> Optional[int]:
    """The last complete iteration recorded under `root`, or None without a tracker."""
    tracker = tracker_file(root)
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}; delete it or fix it by hand")
    return int(text)


def write_tracker(root: Path, step: int) -> None:
    fsync_write(tracker_file(root), str(step))


def make_meta(step: int, consumed_samples: int, config: Mapping[str, Any], **extra: Any) -> Dict[str, Any]:
    """The metadata of one iteration: step, data position, the resolved config (a dict)."""
    return {"step": step, "consumed_samples": consumed_samples, **extra, "config": dict(config)}


def read_meta(iteration_dir: Path) -> Dict[str, Any]:
    path = meta_file(iteration_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {iteration_dir} is not a complete checkpoint") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint metadata is damaged") from None


# --------------------------------------------------------------------------- staged commit


def fresh_staging_dir(final: Path) -> Path:
    """An empty `<final>.incomplete/` (a leftover of an interrupted save is removed)."""
    staging = staging_dir(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish_dir(staging: Path, final: Path) -> None:
    """Rename a fully written staging directory to its final name, durably."""
    final = Path(final)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # an empty directory the user created as the target
    os.replace(staging, final)
    fsync_dir(final.parent)


def commit(root: Path, staging: Path, meta: Mapping[str, Any]) -> Path:
    """Publish a staged iteration once all its shards are on disk (one process, rank 0):
    metadata (fsync), rename to `iter_XXXXXXX/`, tracker replaced (fsync). Returns the
    iteration directory.

    An `iter_XXXXXXX/` of the same step left by an earlier run in this directory is replaced:
    moved to `<name>.replaced` first and deleted only once the tracker names the new one, so
    a crash in between leaves one complete copy that `recover` puts back."""
    step = int(meta["step"])
    final = iter_dir(root, step)
    assert Path(staging) == staging_dir(final), f"{staging} is not the staging directory of {final}"
    fsync_write(meta_file(staging), json.dumps(dict(meta), indent=1))
    aside = final.with_name(final.name + REPLACED)
    if final.is_dir() and any(final.iterdir()):
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        fsync_dir(final.parent)
    publish_dir(staging, final)
    write_tracker(root, step)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    return final


def recover(root: Path) -> List[str]:
    """Tidy what a crash inside `commit` or `prune` left behind (rank 0, at start, under the
    run lock). A `.replaced` copy goes back to its name when the new copy never got there;
    otherwise it and any `.pruning` directory are deleted. Returns what was done, for the log."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = []
    for aside in sorted(root.glob(f"{_ITER_PREFIX}*{REPLACED}")):
        final = aside.with_name(aside.name[: -len(REPLACED)])
        if not is_iteration_dir(final) and is_iteration_dir(aside):
            if final.exists():
                shutil.rmtree(final)
            os.replace(aside, final)
            fsync_dir(root)
            done.append(f"restored {final.name} (a replacement of it was interrupted)")
        else:
            shutil.rmtree(aside, ignore_errors=True)
            done.append(f"removed {aside.name} (left by an interrupted replacement)")
    for pruning in sorted(root.glob(f"{_ITER_PREFIX}*{PRUNING}")):
        shutil.rmtree(pruning, ignore_errors=True)
        done.append(f"removed {pruning.name} (left by an interrupted prune)")
    return done


def prune(root: Path, keep_last: int) -> List[Path]:
    """Delete all but the newest `keep_last` complete iterations, by step, counted from the
    one the tracker names. The tracker's own iteration is never deleted, nor any iteration
    after it (those belong to an earlier run in this directory and are replaced when this run
    saves those steps). Each is renamed to `<name>.pruning` before it is deleted, so a crash
    midway never leaves a half-deleted directory that looks complete."""
    if keep_last <= 0:
        return []
    tracked = read_tracker(root)
    if tracked is None:
        return []
    ours = [p for p in complete_iterations(root) if iteration_of(p) <= tracked]
    removed = []
    for old in ours[:-keep_last]:
        if iteration_of(old) == tracked:
            continue
        doomed = old.with_name(old.name + PRUNING)
        os.replace(old, doomed)
        delay = float(os.environ.get("NEMOTRON_TRAIN_PRUNE_DELAY_S", "0"))
        if delay:  # fault-injection window for the crash-safety campaign (bench/faults.py)
            time.sleep(delay)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    if removed:
        fsync_dir(root)
    return removed


def unreadable_reason(path: Path) -> Optional[str]:
    """Why a complete-looking iteration cannot be loaded (None when it looks loadable): its
    metadata must parse and name its step, and the shard index (`.metadata`) must be there."""
    try:
        meta = read_meta(path)
    except CheckpointError as exc:
        return str(exc)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or meta.get("step") != iteration_of(path):
        return f"{meta_file(path)}: does not describe step {iteration_of(path)}"
    index = Path(path) / ".metadata"
    if not index.is_file() or index.stat().st_size == 0:
        return f"{index}: missing or empty (the shard index of the checkpoint)"
    return _missing_shard_bytes(Path(path))


def _missing_shard_bytes(path: Path) -> Optional[str]:
    """Every byte range the shard index names must exist in its file (a truncated or deleted
    shard file is found here, before any rank starts loading)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data or {}
    except Exception as exc:  # any damage to the index: unpickling errors vary
        return f"{path / '.metadata'}: unreadable ({type(exc).__name__}: {exc})"
    needed: Dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"{shard}: missing"
        if shard.stat().st_size < size:
            return f"{shard}: {shard.stat().st_size} bytes, the index expects at least {size} (truncated)"
    return None


def resume_candidates(root: Path) -> List[Path]:
    """Where a resume may start, best first: the tracker's iteration, then every complete
    iteration before it, newest first (the fallback when the newest cannot be read). Empty
    without a tracker."""
    tracked = read_tracker(root)
    if tracked is None:
        return []
    older = [p for p in complete_iterations(root) if iteration_of(p) < tracked]
    return [iter_dir(root, tracked)] + older[::-1]


def save_model_only(model, root: Path, config: Mapping[str, Any], source: str) -> Path:
    """A step-0 checkpoint holding only the model (one process, e.g. `import-hf`), written and
    committed like every other save. Training from it starts with a fresh optimizer."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = fresh_staging_dir(iter_dir(root, 0))
    sd = {"model": model.sharded_state_dict(), "train_state": {"step": 0, "consumed_samples": 0}}
    dist_checkpointing.save(sd, str(staging))
    return commit(root, staging, make_meta(0, 0, config, model_only=True, source=source))


def is_model_only(meta: Mapping[str, Any]) -> bool:
    return bool(meta.get("model_only"))


# --------------------------------------------------------------------------- locating a checkpoint


def locate_checkpoint(checkpoint: str | Path, iteration: Optional[int] = None) -> Path:
    """The iteration directory for `--checkpoint`: a checkpoints directory (its tracker, or
    `iteration`), a run directory holding `checkpoints/`, or an iteration directory itself."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such directory")
    if is_staging_dir(path):
        raise CheckpointError(f"--checkpoint {path} is an interrupted save; point at a complete iter_XXXXXXX directory")
    if is_iteration_dir(path):
        if iteration is not None:
            raise CheckpointError(f"--checkpoint {path} is already one iteration; drop --iteration or pass the checkpoints directory")
        return path
    root = path
    if not has_tracker(root) and has_tracker(rundir.checkpoint_dir(root)):
        root = rundir.checkpoint_dir(root)
    step = iteration if iteration is not None else read_tracker(root)
    if step is None:
        raise CheckpointError(
            f"--checkpoint {path}: no {TRACKER} and no {META}; pass a checkpoints directory, "
            f"a run directory with {rundir.CHECKPOINTS_DIR}/, or an iter_XXXXXXX directory"
        )
    found = iter_dir(root, step)
    if not is_iteration_dir(found):
        available = [p.name for p in complete_iterations(root)]
        raise CheckpointError(
            f"{found} is missing or incomplete; complete iterations in {root}: {', '.join(available) or 'none'}"
        )
    return found
