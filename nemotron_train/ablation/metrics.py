"""Reading runs' `metrics.jsonl` and reducing them to the numbers a comparison needs.

Training records carry `step` and `loss` (plus lr, grad_norm, tokens_per_sec, step_time_s,
tflops_per_gpu, mfu); validation records carry `step` and `val_loss`. A resumed run appends
to the same file, so a step can appear twice: the last record of a step wins (the resumed
run's; the trainer also trims the file when it resumes). A line torn by a kill is skipped
and counted, or, when the resumed run continued it, its intact record is kept.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from nemotron_train import rundir
from nemotron_train.config.loader import ConfigError

# Fraction of the logged training steps averaged into the "tail loss" (single-step losses
# are too noisy to compare arms on).
TAIL_FRACTION = 0.1
_SEED_SUFFIX = re.compile(r"^(?P<arm>.+)_s(?P<seed>\d+)$")


@dataclass
class RunMetrics:
    label: str
    path: Path
    train: List[Dict[str, Any]] = field(default_factory=list)  # sorted by step, one per step
    val: List[Dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0
    config: Optional[Dict[str, Any]] = None

    @property
    def arm(self) -> str:
        """The label without a `_s<k>` seed suffix (the label itself if it has none)."""
        m = _SEED_SUFFIX.match(self.label)
        return m.group("arm") if m else self.label

    @property
    def seed_index(self) -> Optional[int]:
        m = _SEED_SUFFIX.match(self.label)
        return int(m.group("seed")) if m else None


@dataclass
class RunSummary:
    label: str
    arm: str
    final_step: Optional[int]
    final_loss: float
    min_loss: float
    min_loss_step: Optional[int]
    tail_loss: float
    final_val_loss: Optional[float]
    min_val_loss: Optional[float]
    tokens_per_sec: Optional[float]
    step_time_s: Optional[float]
    tflops_per_gpu: Optional[float]
    mfu: Optional[float]
    precision: str
    seed: Optional[int]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_record(line: str) -> Optional[Dict[str, Any]]:
    """One metrics record, or None. A line torn by a kill and then continued by the resumed
    run (`{"step": 5, "lo{"step": 4, ...}`) still yields the resumed run's record."""
    for start in (0, line.rfind('{"step"')):
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
            int(record["step"])
            return record
        except (ValueError, KeyError, TypeError):
            continue
    return None


def read_run(run_dir: str | Path, label: Optional[str] = None) -> RunMetrics:
    """Load one run directory; ConfigError if it has no metrics.jsonl."""
    path = Path(run_dir)
    metrics = rundir.metrics_file(path)
    if not metrics.is_file():
        raise ConfigError(f"{path}: no {rundir.METRICS_FILE} (is it a run's run.output_dir, and did training log a step?)")
    train: Dict[int, Dict[str, Any]] = {}
    val: Dict[int, Dict[str, Any]] = {}
    skipped = 0
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        record = _parse_record(line)
        if record is None:
            skipped += 1
            continue
        step = int(record["step"])
        if "loss" in record:
            train[step] = record
        if "val_loss" in record:
            val[step] = record
    run = RunMetrics(label or path.name, path, [train[s] for s in sorted(train)], [val[s] for s in sorted(val)], skipped)
    config = rundir.config_file(path)
    if config.is_file():
        try:
            loaded = yaml.safe_load(config.read_text())
            run.config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError:
            run.config = None
    return run


def _median(values: List[Any]) -> Optional[float]:
    values = [v for v in values if _finite(v)]
    return statistics.median(values) if values else None


def _throughput_records(run: RunMetrics) -> List[Dict[str, Any]]:
    # The first logged step includes compilation and allocator warm-up.
    return run.train[1:] if len(run.train) > 2 else run.train


def describe_precision(config: Optional[Dict[str, Any]]) -> str:
    """'fp8 tensorwise/hybrid (emulated)' or 'bf16' or 'fp32 (no fp8)', from a resolved config."""
    if not config:
        return "?"
    precision = config.get("precision") or {}
    fp8 = precision.get("fp8") or {}
    dtype = precision.get("params_dtype", "?")
    if fp8.get("enabled"):
        return f"fp8 {fp8.get('recipe', '?')}/{fp8.get('format', '?')} ({fp8.get('backend', '?')})"
    return "bf16" if dtype == "bf16" else f"{dtype} (no fp8)"


def summarize(run: RunMetrics) -> RunSummary:
    losses = [(r["step"], r["loss"]) for r in run.train]
    finite = [(s, v) for s, v in losses if _finite(v)]
    final_step, final_loss = losses[-1] if losses else (None, math.nan)
    min_step, min_loss = min(finite, key=lambda sv: sv[1]) if finite else (None, math.nan)
    n_tail = max(1, int(round(len(losses) * TAIL_FRACTION)))
    tail = [v for _, v in losses[-n_tail:]]
    # Any non-finite loss in the tail makes the tail non-finite: divergence must show.
    tail_loss = statistics.fmean(tail) if tail and all(_finite(v) for v in tail) else math.nan
    vals = [r["val_loss"] for r in run.val if _finite(r.get("val_loss"))]
    perf = _throughput_records(run)
    seed = ((run.config or {}).get("train") or {}).get("seed")
    return RunSummary(
        label=run.label,
        arm=run.arm,
        final_step=final_step,
        final_loss=float(final_loss) if _finite(final_loss) else math.nan,
        min_loss=float(min_loss),
        min_loss_step=min_step,
        tail_loss=tail_loss,
        final_val_loss=float(run.val[-1]["val_loss"]) if run.val and _finite(run.val[-1].get("val_loss")) else None,
        min_val_loss=min(vals) if vals else None,
        tokens_per_sec=_median([r.get("tokens_per_sec") for r in perf]),
        step_time_s=_median([r.get("step_time_s") for r in perf]),
        tflops_per_gpu=_median([r.get("tflops_per_gpu") for r in perf]),
        mfu=_median([r.get("mfu") for r in perf]),
        precision=describe_precision(run.config),
        seed=seed if isinstance(seed, int) else None,
    )


def relative_gap(value: Optional[float], baseline: Optional[float]) -> Optional[float]:
    """(value - baseline) / baseline, or None when either side is missing or baseline is 0."""
    if value is None or baseline is None or not _finite(baseline) or baseline == 0:
        return None
    return (value - baseline) / abs(baseline)


def ratio(value: Optional[float], baseline: Optional[float]) -> Optional[float]:
    if value is None or baseline is None or not baseline:
        return None
    return value / baseline


def pick_baseline(runs: List[RunMetrics], requested: Optional[str] = None) -> RunMetrics:
    """`requested` by label; else the first run of the bf16 arm; else the first run."""
    if requested is not None:
        for run in runs:
            if run.label == requested:
                return run
        raise ConfigError(f"--baseline {requested!r} is not one of the runs: {', '.join(r.label for r in runs)}")
    for run in runs:
        if run.arm == "bf16":
            return run
    return runs[0]


def paired_baselines(runs: List[RunMetrics], baseline: RunMetrics) -> Dict[str, RunMetrics]:
    """What each run is compared with: the baseline arm's run with the same seed index
    (identical init and data order, so the gap excludes seed noise); runs of the baseline
    arm itself, and runs without a seed partner, are compared with `baseline` (for the
    baseline arm that shows the seed-to-seed noise)."""
    by_seed = {r.seed_index: r for r in runs if r.arm == baseline.arm and r.seed_index is not None}
    pairs = {}
    for run in runs:
        partner = by_seed.get(run.seed_index) if run.arm != baseline.arm else None
        pairs[run.label] = partner if partner is not None else baseline
    return pairs


def unique_labels(run_dirs: List[Path]) -> List[str]:
    """Directory names; where two runs share a name, prefix the parent's name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]
