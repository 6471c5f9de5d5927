"""The run directory: the one place that names every file a run writes or reads.

    <run.output_dir>/
        config.yaml            the resolved config (written by rank 0 at the start)
        metrics.jsonl          one JSON line per logged step / validation
        summary.json           written when training ends (also on an early stop)
        COMPLETED              written after the final checkpoint of a finished run
        run.lock               held by the run using this directory (host, pid)
        checkpoints/           default `checkpoint.dir` (layout: nemotron_train/checkpoint/layout.py)
        checkpoints_non_persistent/  default `checkpoint.non_persistent_dir` (same layout, newest only)
        data_cache/            default `data.cache_dir` (blend sample indices, tokenised corpus)
        tensorboard/           TensorBoard events (logging.tensorboard)
        sbatch/                rendered sbatch scripts and their config snapshots
        logs/                  SLURM job output (`#SBATCH --output`)
        heartbeats/            one progress file per rank (the hang watchdog)
        stacks/                per-rank Python stack dumps of a detected hang
        bad_steps.log          failed step checks, one line each (megatron-core's rerun tracker format)

Writers and readers both call these functions, so a file name is spelled once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
COMPLETED_MARKER = "COMPLETED"
LOCK_FILE = "run.lock"
CHECKPOINTS_DIR = "checkpoints"
NON_PERSISTENT_CHECKPOINTS_DIR = "checkpoints_non_persistent"
DATA_CACHE_DIR = "data_cache"
TENSORBOARD_DIR = "tensorboard"
SBATCH_DIR = "sbatch"
LOGS_DIR = "logs"
HEARTBEATS_DIR = "heartbeats"
STACKS_DIR = "stacks"
BAD_STEPS_FILE = "bad_steps.log"


def config_file(run_dir: PathLike) -> Path:
    return Path(run_dir) / CONFIG_FILE


def metrics_file(run_dir: PathLike) -> Path:
    return Path(run_dir) / METRICS_FILE


def summary_file(run_dir: PathLike) -> Path:
    return Path(run_dir) / SUMMARY_FILE


def completed_marker(run_dir: PathLike) -> Path:
    return Path(run_dir) / COMPLETED_MARKER


def lock_file(run_dir: PathLike) -> Path:
    return Path(run_dir) / LOCK_FILE


def checkpoint_dir(run_dir: PathLike, configured: Optional[str] = None) -> Path:
    """`checkpoint.dir` when set, else `<run_dir>/checkpoints`."""
    return Path(configured) if configured else Path(run_dir) / CHECKPOINTS_DIR


def non_persistent_checkpoint_dir(run_dir: PathLike, configured: Optional[str] = None) -> Path:
    """`checkpoint.non_persistent_dir` when set, else `<run_dir>/checkpoints_non_persistent`."""
    return Path(configured) if configured else Path(run_dir) / NON_PERSISTENT_CHECKPOINTS_DIR


def data_cache_dir(run_dir: PathLike, configured: Optional[str] = None) -> str:
    """`data.cache_dir` when set, else `<run_dir>/data_cache`; absolute, as the cache manifest stores it."""
    return os.path.abspath(configured or os.path.join(os.fspath(run_dir), DATA_CACHE_DIR))


def tensorboard_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / TENSORBOARD_DIR


def sbatch_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / SBATCH_DIR


def logs_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / LOGS_DIR


def heartbeat_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / HEARTBEATS_DIR


def stacks_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / STACKS_DIR


def bad_steps_file(run_dir: PathLike) -> Path:
    return Path(run_dir) / BAD_STEPS_FILE
