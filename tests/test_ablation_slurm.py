"""`nemotron-train ablate --slurm` on a real one-node SLURM cluster (slurm-wlm + munge, started
by the `slurm_cluster` fixture of tests/slurm_cluster.py) with the real trainer.

The ablation plan (nemotron_train/ablation/plan.py) goes through the sbatch front door
(launch.sbatch.submit_plan, as `nemotron-train sbatch --arms` does): one batch job per arm,
each trains the smoke model to completion in its own run directory with the shared seed,
and `compare` reports on the finished runs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from typing import List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import slurm_cluster  # noqa: E402,F401

from nemotron_train.config.loader import load_config  # noqa: E402
from nemotron_train.rundir import completed_marker, config_file, metrics_file, summary_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
STEPS = 4
# One rank per run (no tensor parallelism), short sequences, no validation: a quick run.
FAST = ["parallel.tp=1", "parallel.sp=false", "train.seq_length=64", "train.log_interval=1", f"train.steps={STEPS}",
        "train.eval_interval=0", "checkpoint.interval=0"]

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not SMOKE.is_file(), reason="configs/smoke.yaml is missing"),
    pytest.mark.skipif(importlib.util.find_spec("nemotron_train.training") is None, reason="the trainer is not built"),
]


def train_steps(run_dir: Path) -> List[int]:
    path = metrics_file(run_dir)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["step"] for r in records if "loss" in r]


def test_ablate_slurm_trains_every_arm(slurm_cluster, tmp_path):
    root = tmp_path / "abl"
    cmd = [sys.executable, "-m", "nemotron_train", "ablate", str(SMOKE), "--arms", "bf16,fp8", "--slurm",
           "--nodes", "1", "--cpu", "--nproc-per-node", "1", "--time", "00:30:00", "--python", sys.executable,
           "--workdir", str(ROOT), "--name", "abl", "--output-root", str(root), *FAST]
    result = slurm_cluster.run(*cmd, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = re.findall(r"^submitted (\S+): job (\d+)$", result.stdout, re.M)
    assert [name for name, _ in jobs] == ["abl-bf16_s0", "abl-fp8_s0"], result.stdout
    infos = {name: slurm_cluster.wait(job_id, timeout=900) for name, job_id in jobs}
    seeds = set()
    for label, fp8 in (("bf16_s0", False), ("fp8_s0", True)):
        info, run_dir = infos[f"abl-{label}"], root / label
        assert (info.state, info.exit_code) == ("COMPLETED", 0), slurm_cluster.explain(info)
        assert "run complete" in slurm_cluster.job_log(info)
        assert completed_marker(run_dir).read_text().splitlines()[0] == str(STEPS)
        summary = json.loads(summary_file(run_dir).read_text())
        assert summary["steps"] == STEPS and summary["stopped_early"] is None, summary
        assert train_steps(run_dir) == list(range(1, STEPS + 1))
        cfg = load_config(config_file(run_dir))  # what the trainer ran with
        assert cfg.precision.fp8.enabled is fp8 and cfg.logging.wandb.group == "abl" and cfg.run.name == label
        seeds.add(cfg.train.seed)
    assert seeds == {load_config(SMOKE).train.seed}  # both arms: the same init and data order
    assert json.loads((root / "ablation.json").read_text())["arms"] == ["bf16", "fp8"]

    # The command `ablate --slurm` prints for when the jobs are done.
    compare = re.search(r"^\[ablate\] when they finish: (nemotron-train compare .*)$", result.stdout, re.M).group(1)
    args = shlex.split(compare)[1:]
    done = slurm_cluster.run(sys.executable, "-m", "nemotron_train", *args, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (root / "report.md").read_text()
    assert "`bf16_s0` (baseline)" in report and "`fp8_s0`" in report
