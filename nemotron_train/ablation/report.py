"""`compare`: a Markdown report with a loss-curve plot for a set of runs.

Written to OUTPUT/report.md and OUTPUT/loss_curves.png. Runs are labelled by their
directory names; gaps and ratios are relative to the baseline run (the bf16 arm when
present, else the first run, or --baseline).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nemotron_train.ablation.metrics import (
    TAIL_FRACTION,
    RunMetrics,
    RunSummary,
    paired_baselines,
    pick_baseline,
    ratio,
    read_run,
    relative_gap,
    summarize,
    unique_labels,
)
from nemotron_train.config.loader import ConfigError

REPORT_FILE = "report.md"
PLOT_FILE = "loss_curves.png"


def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return f"{x:.{digits}f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _smooth(values: List[float], window: int) -> List[float]:
    """Trailing moving average (NaNs stay NaN so divergence remains visible)."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _smoothed_curve(run: RunMetrics, window: int) -> Dict[int, float]:
    return dict(zip([r["step"] for r in run.train], _smooth([r["loss"] for r in run.train], window)))


def plot_losses(runs: List[RunMetrics], pairs: Dict[str, RunMetrics], path: Path) -> None:
    """Loss curves (raw, faint; smoothed, solid; validation as markers) and each run's
    smoothed relative difference to its paired baseline at the steps both logged."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_gap) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, height_ratios=[3, 2])
    longest = max((len(r.train) for r in runs), default=1)
    window, gap_window = max(1, longest // 50), max(1, longest // 20)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        steps = [r["step"] for r in run.train]
        ax_loss.plot(steps, [r["loss"] for r in run.train], color=color, alpha=0.25, linewidth=0.8)
        ax_loss.plot(steps, list(_smoothed_curve(run, window).values()), color=color, linewidth=1.6, label=run.label)
        if run.val:
            ax_loss.plot([r["step"] for r in run.val], [r["val_loss"] for r in run.val], "o--", color=color,
                         markersize=4, linewidth=0.8, label=f"{run.label} (val)")
        partner = pairs[run.label]
        if partner is not run:
            mine, ref = _smoothed_curve(run, gap_window), _smoothed_curve(partner, gap_window)
            common = [s for s in mine if ref.get(s)]
            ax_gap.plot(common, [100 * (mine[s] - ref[s]) / ref[s] for s in common], color=color,
                        label=f"{run.label} vs {partner.label}")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"Training loss (moving average over {window} logged steps)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_gap.axhline(0.0, color="black", linewidth=0.8)
    ax_gap.set_ylabel("loss vs baseline (%)")
    ax_gap.set_title(f"Relative difference (moving average over {gap_window} logged steps)", fontsize=10)
    ax_gap.set_xlabel("step")
    ax_gap.grid(alpha=0.3)
    if len(runs) > 1:
        ax_gap.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_table(summaries: List[RunSummary], base: RunSummary, pairs: Dict[str, RunSummary]) -> List[str]:
    lines = [
        "| run | precision | seed | steps | final loss | min loss (step) | tail loss | vs | tail gap "
        "| final val loss | val gap | tokens/s | tokens/s ratio | step time (s) | TFLOP/s/GPU | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ref = pairs[s.label]
        is_base = s is base
        lines.append(
            f"| `{s.label}`{' (baseline)' if is_base else ''} | {s.precision} | {s.seed if s.seed is not None else '-'} "
            f"| {s.final_step if s.final_step is not None else '-'} | {_fmt(s.final_loss)} "
            f"| {_fmt(s.min_loss)} ({s.min_loss_step if s.min_loss_step is not None else '-'}) | {_fmt(s.tail_loss)} "
            f"| {'-' if is_base else f'`{ref.label}`'} "
            f"| {'-' if is_base else _pct(relative_gap(s.tail_loss, ref.tail_loss))} "
            f"| {_fmt(s.final_val_loss)} | {'-' if is_base else _pct(relative_gap(s.final_val_loss, ref.final_val_loss))} "
            f"| {_num(s.tokens_per_sec)} | {_fmt(ratio(s.tokens_per_sec, ref.tokens_per_sec), 3)} "
            f"| {_fmt(s.step_time_s, 3)} | {_fmt(s.tflops_per_gpu, 2)} | {_fmt(s.mfu, 3)} |"
        )
    return lines


def _mean_std(values: List[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(statistics.fmean(values))} ± {_fmt(statistics.stdev(values))}"


def _arm_table(summaries: List[RunSummary], base_arm: str) -> List[str]:
    """Seeds aggregated per arm, with the seed spread to judge whether a gap is noise."""
    arms: Dict[str, List[RunSummary]] = OrderedDict()
    for s in summaries:
        arms.setdefault(s.arm, []).append(s)
    if all(len(v) < 2 for v in arms.values()):
        return []
    base_tail = [s.tail_loss for s in arms.get(base_arm, [])]
    base_mean = statistics.fmean(base_tail) if base_tail else None
    lines = [
        "## Per arm (seeds aggregated)",
        "",
        "| arm | seeds | tail loss (mean ± std) | gap vs baseline arm | seed spread (max-min)/mean "
        "| final val loss (mean ± std) | tokens/s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, runs in arms.items():
        tails = [s.tail_loss for s in runs]
        mean = statistics.fmean(tails)
        spread = (max(tails) - min(tails)) / mean if len(tails) > 1 and mean else None
        spread_text = f"{100 * spread:.2f}%" if spread is not None and math.isfinite(spread) else "-"
        tps = [s.tokens_per_sec for s in runs if s.tokens_per_sec is not None]
        gap = "-" if arm == base_arm else _pct(relative_gap(mean, base_mean))
        lines.append(
            f"| {arm} | {len(runs)} | {_mean_std(tails)} | {gap} | {spread_text} "
            f"| {_mean_std([s.final_val_loss for s in runs])} | {_num(statistics.fmean(tps)) if tps else '-'} |"
        )
    return lines + [""]


def render_report(runs: List[RunMetrics], baseline: RunMetrics, output: Path, plot_name: str = PLOT_FILE) -> str:
    summaries = [summarize(r) for r in runs]
    by_label = {s.label: s for s in summaries}
    base = by_label[baseline.label]
    pairs = {label: by_label[ref.label] for label, ref in paired_baselines(runs, baseline).items()}
    lines = [
        "# Run comparison",
        "",
        f"Baseline: `{baseline.label}`. Runs:",
        "",
        *[f"- `{r.label}`: `{os.path.relpath(r.path, output)}`" for r in runs],
        "",
        f"![Loss curves]({plot_name})",
        "",
        "## Per run",
        "",
        *_run_table(summaries, base, pairs),
        "",
        *_arm_table(summaries, baseline.arm),
        "## Definitions",
        "",
        f"- *tail loss*: mean training loss over the last {int(TAIL_FRACTION * 100)}% of logged steps (at least one); "
        "*tail gap* is its relative difference to the run in *vs*: positive means a higher loss.",
        "- *vs*: the baseline arm's run with the same seed index (same init and data order) when there is one, "
        "else the baseline run; runs of the baseline arm are compared with the baseline run (seed noise).",
        "- *val gap*: relative difference of the last validation loss to that of the run in *vs*.",
        "- *tokens/s*, *step time*, *TFLOP/s/GPU*, *MFU*: medians over logged steps, the first one excluded "
        "(warm-up) when more than two were logged. *tokens/s ratio* is relative to the run in *vs*.",
    ]
    skipped = [(r.label, r.skipped_lines) for r in runs if r.skipped_lines]
    if skipped:
        lines.append("- Unparsable metrics lines skipped: " + ", ".join(f"`{l}`: {n}" for l, n in skipped) + ".")
    return "\n".join(lines) + "\n"


def default_output(run_dirs: Sequence[Path]) -> Path:
    parents = {p.resolve().parent for p in run_dirs}
    if len(parents) != 1:
        raise ConfigError("the runs are in different directories; say where the report goes with --output DIR")
    return parents.pop()


def compare_runs(run_dirs: Sequence[str | Path], output: Optional[str | Path] = None, baseline: Optional[str] = None) -> Path:
    """Read the runs, write report.md and the plot into `output`; returns the report path."""
    # Plain files are skipped so `compare ROOT/*` works after a first report was written there.
    paths = [Path(p) for p in run_dirs if not Path(p).is_file()]
    if not paths:
        raise ConfigError("compare needs at least one run directory (a run's run.output_dir)")
    runs = [read_run(p, label) for p, label in zip(paths, unique_labels(paths))]
    empty = [r.label for r in runs if not r.train]
    if empty:
        raise ConfigError(f"run(s) {', '.join(empty)} have no training records (lines with `step` and `loss`) yet")
    out = Path(output) if output is not None else default_output(paths)
    out.mkdir(parents=True, exist_ok=True)
    base = pick_baseline(runs, baseline)
    plot_losses(runs, paired_baselines(runs, base), out / PLOT_FILE)
    report = out / REPORT_FILE
    report.write_text(render_report(runs, base, out))
    return report
