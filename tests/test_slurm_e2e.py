"""The smoke model trained by rendered sbatch scripts on a real one-node SLURM cluster.

Contract with the trainer (`python -m nemotron_train train CONFIG ...`): checkpoints in
`<run.output_dir>/checkpoints/iter_XXXXXXX/` with `latest_checkpointed_iteration.txt`,
metrics in `<run.output_dir>/metrics.jsonl`, `COMPLETED` once all train.steps are done, and
on a stop signal or `train.exit_duration_minutes` a checkpoint and exit code 75 (see
nemotron_train/training/stop.py). test_slurm_cluster.py covers the same jobs with a stand-in trainer.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import slurm_cluster, wait_until  # noqa: E402,F401

from launch.sbatch import RenderedJob, render_job  # noqa: E402
from launch.sbatch_script import SbatchOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
STEPS = 30  # a shortened smoke run (train.steps override below)

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not SMOKE.is_file(), reason="configs/smoke.yaml is missing"),
    pytest.mark.skipif(importlib.util.find_spec("nemotron_train.training") is None, reason="the trainer is not built"),
]


def render(tmp_path: Path, mode: str, overrides: List[str], **opts) -> RenderedJob:
    options = SbatchOptions(nodes=1, gpus_per_node=0, nproc_per_node=2, time="00:30:00", mode=mode,
                            python=sys.executable, workdir=str(ROOT), **opts)
    return render_job(SMOKE, [f"run.output_dir={tmp_path / 'run'}", "train.log_interval=1", f"train.steps={STEPS}",
                              "train.eval_interval=0", *overrides], options)


def train_steps(run_dir: Path) -> List[int]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["step"] for r in records if "loss" in r]


def latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip())


def test_smoke_chain_stops_on_time_and_resumes(slurm_cluster, tmp_path):
    # Each link stops after 6 s of training (train.exit_duration_minutes=0.1), but only after a
    # step: the trainer checks the limit once per step. So every link trains at least one step,
    # STEPS links finish the run on any machine, and one more finds it complete. How many
    # links that takes depends on the machine's speed; that the chain ends COMPLETED does not.
    links = STEPS + 1
    job = render(tmp_path, "per-gpu", ["train.exit_duration_minutes=0.1"], chain=links)
    ids = [slurm_cluster.sbatch(str(job.script), cwd=ROOT) for _ in range(links)]
    infos = []
    try:
        for job_id in ids:
            infos.append(slurm_cluster.wait(job_id, timeout=900))
            if infos[-1].exit_code != 75:  # done (0), or a failure the asserts below report
                break
        if infos[-1].exit_code == 0 and len(infos) < links:  # the link after the one that completed
            infos.append(slurm_cluster.wait(ids[len(infos)], timeout=300))
    finally:
        # The rest of the chain would only drain, one "nothing to do" after another.
        pending = ids[len(infos):]
        if pending:
            slurm_cluster.run("scancel", *pending, check=False)
    codes = [i.exit_code for i in infos]
    explain = "\n".join(slurm_cluster.explain(i) for i in infos)
    # Stopped on time at least once, resumed, finished; the next link found the run complete.
    assert len(codes) >= 3 and set(codes[:-2]) == {75} and codes[-2:] == [0, 0], explain
    for info in infos[:-2]:
        assert "stopped_early: time limit" in slurm_cluster.job_log(info), slurm_cluster.explain(info)
    assert (job.run_dir / "COMPLETED").exists() and latest(job.run_dir) == STEPS
    # Every job resumed from the previous checkpoint: each step trained exactly once.
    assert train_steps(job.run_dir) == list(range(1, STEPS + 1)), explain
    assert "nothing to do" in slurm_cluster.job_log(infos[-1])


def test_smoke_cancel_checkpoints_and_resubmission_trains_to_completion(slurm_cluster, tmp_path):
    # torchrun on the node (per-node) here; the chain test above runs one task per rank (per-gpu).
    job = render(tmp_path, "per-node", [])
    job_id = slurm_cluster.sbatch(str(job.script), cwd=ROOT)

    def progressed() -> bool:
        info = slurm_cluster.job(job_id)
        assert not info.done, slurm_cluster.explain(info)
        return len(train_steps(job.run_dir)) >= 5

    wait_until(progressed, 600, "5 training steps")
    slurm_cluster.scancel(job_id, "USR1", batch=True)
    info = slurm_cluster.wait(job_id, timeout=600)
    assert info.exit_code == 75, slurm_cluster.explain(info)
    stopped = latest(job.run_dir)
    assert 5 <= stopped < STEPS and not (job.run_dir / "COMPLETED").exists()
    assert (job.run_dir / "checkpoints" / f"iter_{stopped:07d}").is_dir()
    trained_before = len(train_steps(job.run_dir))

    again = slurm_cluster.wait(slurm_cluster.sbatch(str(job.script), cwd=ROOT), timeout=900)
    assert (again.state, again.exit_code) == ("COMPLETED", 0), slurm_cluster.explain(again)
    resumed = train_steps(job.run_dir)[trained_before:]
    assert resumed[0] == stopped + 1 and resumed[-1] == STEPS
    assert (job.run_dir / "COMPLETED").exists() and latest(job.run_dir) == STEPS
    assert (job.run_dir / "checkpoints" / f"iter_{STEPS:07d}").is_dir()
