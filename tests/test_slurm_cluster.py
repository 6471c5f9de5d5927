"""Rendered sbatch scripts on a real one-node SLURM cluster (slurm-wlm + munge, started by
the `slurm_cluster` fixture), with a stand-in trainer that obeys the graceful-stop contract.

What is real here: sbatch/srun/scancel, the batch script, the trap, srun's signal
forwarding, torchrun's c10d rendezvous and launch.slurm_env's rank mapping (nemotron_train.distributed.slurm), two gloo ranks
agreeing through should_exit, singleton chains and exit codes. Only the model is not:
test_slurm_e2e.py runs the same jobs with the real trainer.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, slurm_cluster, wait_until, write_stub_trainer  # noqa: E402,F401

from launch import local_cluster  # noqa: E402
from nemotron_train.errors import LaunchError  # noqa: E402

from launch.sbatch import RenderedJob, render_job  # noqa: E402
from launch.sbatch_script import SbatchOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

pytestmark = pytest.mark.slurm


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class StubRun:
    """Render, submit and inspect jobs of one run that uses the stand-in trainer."""

    def __init__(self, cluster: SlurmCluster, tmp: Path, step_seconds: float = 0.3):
        self.cluster, self.tmp = cluster, tmp
        self.run_dir = tmp / "run"
        stub = write_stub_trainer(tmp / "stub")
        # The stand-in shadows the real package: first on PYTHONPATH, and the job runs in tmp.
        self.env = {"PYTHONPATH": f"{stub}:{ROOT}", "STUB_STEP_SECONDS": str(step_seconds)}

    def render(self, mode: str, overrides: List[str], **opts) -> RenderedJob:
        options = SbatchOptions(nodes=1, gpus_per_node=0, nproc_per_node=2, time=opts.pop("time", "00:10:00"),
                                mode=mode, python=sys.executable, workdir=str(self.tmp), **opts)
        return render_job(SMOKE, [f"run.output_dir={self.run_dir}", *overrides], options)

    def submit(self, job: RenderedJob, count: int = 1) -> List[str]:
        return [self.cluster.sbatch(str(job.script), env=self.env, cwd=self.tmp) for _ in range(count)]

    def metrics(self) -> List[dict]:
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def latest(self) -> Optional[int]:
        tracker = self.run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
        return int(tracker.read_text()) if tracker.exists() else None


def test_cluster_runs_a_trivial_job(slurm_cluster, tmp_path):
    info = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
    assert info == ["node1", "idle", "node2", "idle"]
    # Count-only GPUs: one per node, granted to a job like a real one (no device behind it).
    assert slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %G").stdout.split() == ["node1", "gpu:1", "node2", "gpu:1"]
    # One task on each node: each is its own host with its own address on the bridge.
    job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "-o", str(tmp_path / "out.txt"), "--wrap",
                                  "srun bash -c 'echo $SLURM_JOB_ID $(hostname) $(getent hosts $(hostname) | cut -d\" \" -f1);"
                                  " echo $CUDA_VISIBLE_DEVICES $SLURM_GPUS_ON_NODE > gpus-$(hostname)'",
                                  cwd=tmp_path)
    done = slurm_cluster.wait(job_id, timeout=60)
    assert (done.state, done.exit_code) == ("COMPLETED", 0), slurm_cluster.explain(done)
    lines = sorted((tmp_path / "out.txt").read_text().split("\n"))[1:]
    assert lines == [f"{job_id} {node} {slurm_cluster.address(node)}" for node in ("node1", "node2")]
    assert [(tmp_path / f"gpus-{node}").read_text().split() for node in ("node1", "node2")] == [["0", "1"]] * 2
    with pytest.raises(RuntimeError, match="Requested node configuration is not available"):
        slurm_cluster.sbatch("--nodes=1", "--gpus-per-node=2", "--wrap", "true", cwd=tmp_path)  # more GPUs than a node has
    assert slurm_cluster.address("node1") != slurm_cluster.address("node2")
    failed = slurm_cluster.wait(slurm_cluster.sbatch("--wrap", "exit 75", cwd=tmp_path), timeout=60)
    assert (failed.state, failed.exit_code) == ("FAILED", 75)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per-node", "per-gpu"])
def test_rendered_job_trains_to_completion(slurm_cluster, tmp_path, mode):
    run = StubRun(slurm_cluster, tmp_path)
    job = run.render(mode, ["train.steps=8"])
    info = slurm_cluster.wait(run.submit(job)[0], timeout=180)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), slurm_cluster.explain(info)
    assert (run.run_dir / "COMPLETED").read_text().splitlines()[0] == "8"
    assert run.latest() == 8 and (run.run_dir / "checkpoints" / "iter_0000008").is_dir()
    assert [m["step"] for m in run.metrics()] == list(range(1, 9))
    ranks = read_jsonl(run.run_dir / "ranks.jsonl")
    assert sorted(r["RANK"] for r in ranks) == ["0", "1"] and {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert all(r["argv"][1] == str(job.config) for r in ranks)  # the snapshot, not the original
    log = slurm_cluster.job_log(info)
    assert "run complete" in log and f"logs/smoke-{info.job_id}.out" in info.fields["StdOut"]


@pytest.mark.slow
def test_chain_stops_on_time_resumes_and_drains(slurm_cluster, tmp_path):
    run = StubRun(slurm_cluster, tmp_path, step_seconds=0.5)
    # ~6 steps fit in each job's 3 s, so 10 steps take 2 jobs, 3 at worst; the 4th finds COMPLETED.
    job = run.render("per-gpu", ["train.steps=10", "train.exit_duration_minutes=0.05"], chain=4)
    ids = run.submit(job, count=4)
    infos = [slurm_cluster.wait(job_id, timeout=240) for job_id in ids]
    codes = [i.exit_code for i in infos]
    assert codes[0] == 75 and codes[-1] == 0, "\n".join(slurm_cluster.explain(i) for i in infos)
    assert (run.run_dir / "COMPLETED").exists() and run.latest() == 10
    trained = [i for i in infos if any(m["job"] == i.job_id for m in run.metrics())]
    assert len(trained) >= 2
    assert [c for c in codes[: len(trained)]] == [75] * (len(trained) - 1) + [0]
    # Each job resumed where the previous one checkpointed: no step twice, none skipped.
    assert [m["step"] for m in run.metrics()] == list(range(1, 11))
    # Jobs after completion exit at once without starting any rank.
    for info in infos[len(trained):]:
        assert info.exit_code == 0 and "nothing to do" in slurm_cluster.job_log(info)
    # singleton: each job starts only once the previous one has ended (ISO times sort as text).
    for before, after in zip(infos, infos[1:]):
        assert after.fields["StartTime"] >= before.fields["EndTime"]


def _wait_for_progress(run: StubRun, job_id: str, steps: int) -> None:
    def progressed() -> bool:
        info = run.cluster.job(job_id)
        assert not info.done, run.cluster.explain(info)
        return len(run.metrics()) >= steps

    wait_until(progressed, 120, f"job {job_id} to train {steps} steps")


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, how",
    # Each mode and each way of stopping once; the real-trainer test covers per-gpu + USR1 too.
    [("per-node", "batch-usr1"), ("per-gpu", "steps-term")],
)
def test_cancel_checkpoints_then_resubmission_resumes(slurm_cluster, tmp_path, mode, how):
    run = StubRun(slurm_cluster, tmp_path, step_seconds=0.3)
    job = run.render(mode, ["train.steps=30"])
    job_id = run.submit(job)[0]
    _wait_for_progress(run, job_id, 3)
    if how == "batch-usr1":  # what `--signal=B:USR1@120` does before the time limit
        slurm_cluster.scancel(job_id, "USR1", batch=True)
        expected = "signal SIGUSR1"
    else:  # a TERM straight to every process of the step (preemption, admins)
        slurm_cluster.scancel(job_id, "TERM")
        expected = "signal SIGTERM"
    info = slurm_cluster.wait(job_id, timeout=120)
    assert info.exit_code == 75, slurm_cluster.explain(info)
    stops = read_jsonl(run.run_dir / "stops.jsonl")
    assert sorted(s["rank"] for s in stops) == [0, 1]
    assert {s["reason"] for s in stops} == {expected} and len({s["step"] for s in stops}) == 1
    stopped_at = stops[0]["step"]
    assert 3 <= stopped_at < 30 and run.latest() == stopped_at and not (run.run_dir / "COMPLETED").exists()

    again = slurm_cluster.wait(run.submit(job)[0], timeout=180)
    assert again.exit_code == 0, slurm_cluster.explain(again)
    resumed = [m["step"] for m in run.metrics() if m["job"] == again.job_id]
    assert resumed[0] == stopped_at + 1 and resumed[-1] == 30
    assert run.latest() == 30 and (run.run_dir / "COMPLETED").exists()


@pytest.mark.slow
def test_time_limit_warning_stops_the_job_in_time(slurm_cluster, tmp_path):
    run = StubRun(slurm_cluster, tmp_path, step_seconds=0.3)
    # SLURM sends B:USR1 50 s before the 1-minute limit (its timer is coarse: up to a minute early).
    job = run.render("per-node", ["train.steps=100000"], time="00:01:00", signal="USR1@50")
    start = time.time()
    info = slurm_cluster.wait(run.submit(job)[0], timeout=150)
    assert info.exit_code == 75 and info.state == "FAILED", slurm_cluster.explain(info)
    assert time.time() - start < 60 + 30
    assert {s["reason"] for s in read_jsonl(run.run_dir / "stops.jsonl")} == {"signal SIGUSR1"}
    assert "batch shell got SIGUSR1" in slurm_cluster.job_log(info)
    assert run.latest() == read_jsonl(run.run_dir / "stops.jsonl")[0]["step"]


def test_injection_in_names_runs_nothing(slurm_cluster, tmp_path):
    # `$(...)` and backquotes in run.name (an #SBATCH value), --python and --env (shell
    # values): the job runs, and none of them does anything (a newline is refused outright:
    # tests/test_multinode_launch.py).
    name = "$(>pwned-name)`>pwned-tick`"  # one word: each would create a file if a shell ran it
    config = tmp_path / "cfg.yaml"
    config.write_text(f"base: {SMOKE}\nrun:\n  name: '{name}'\n")
    cmd = [sys.executable, "-m", "nemotron_train", "sbatch", str(config), "--nodes", "1", "--cpu", "--nproc-per-node", "2",
           "--time", "00:05:00", "--mode", "per-gpu", "--python", "$(touch pwned-python)", "--env", "NT_X=`touch pwned-env`",
           "--workdir", str(tmp_path), "--submit", "--wait", f"run.output_dir={tmp_path / 'run'}"]
    env = {k: v for k, v in slurm_cluster.env.items() if k != "PYTHON"}
    result = slurm_cluster.run(*cmd, cwd=tmp_path, check=False, timeout=120, env=env)
    job_id = re.search(r"^submitted \S+: job (\d+)$", result.stdout, re.M).group(1)
    info = slurm_cluster.job(job_id)
    assert info.done and info.fields["JobName"] == name, result.stdout + result.stderr
    # The literal interpreter name does not exist: the job fails, and --wait exits with its code.
    assert info.exit_code != 0 and result.returncode == info.exit_code, slurm_cluster.explain(info)
    assert f"exit code {info.exit_code}: log " in result.stdout
    assert f"({name})" in slurm_cluster.job_log(info)
    made = {"pwned-name", "pwned-tick", "pwned-python", "pwned-env"}
    assert not [p for p in [*tmp_path.rglob("pwned*"), *Path.cwd().glob("pwned*")] if p.name in made]


def _leftovers(state: "local_cluster.ClusterState") -> List[str]:
    """Namespaces, links and daemons of `state` that still exist."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left = [ns for ns in state.namespaces if ns in netns] + [link for link in state.veths if f" {link}:" in links or f" {link}@" in links]
    return left + [name for name, pid in state.pids.items() if local_cluster._pid_alive(pid, name)]


def test_local_cluster_is_idempotent_and_leaves_nothing(slurm_cluster, tmp_path):
    # slurm_cluster: only so that this skips where the session's cluster cannot run.
    state = local_cluster.up(1, state_dir=tmp_path / "c")
    assert local_cluster.up(1, state_dir=tmp_path / "c").pids == state.pids  # up again: the same daemons
    with pytest.raises(LaunchError, match="already up"):
        local_cluster.up(2, state_dir=tmp_path / "c")
    assert state.namespaces and not [x for x in state.veths + state.namespaces if x not in _leftovers(state)]
    assert local_cluster.down(tmp_path / "c") and not _leftovers(state) and not (tmp_path / "c").exists()
    # A failed start (munged cannot bind a socket path this long) removes whatever it made.
    deep = tmp_path / ("d" * 100)
    with pytest.raises(LaunchError, match="did not come up"):
        local_cluster.up(1, state_dir=deep)
    tag = local_cluster.hashlib.sha1(str(deep.resolve()).encode()).hexdigest()[:5]
    assert f"ntc{tag}" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"ntc{tag}" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not deep.exists()
