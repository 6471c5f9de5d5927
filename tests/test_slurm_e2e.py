"""The smoke model across two hosts: rendered sbatch jobs on the session's two-node SLURM
cluster (`nemotron-train local-cluster`: each node a network namespace with its own
hostname, address and slurmd) and plain torchrun across the two nodes.

Every run here has one rank per node (tensor parallelism 2 across the hosts, ranks talking
over the `cluster0` interface via launch.socket_ifname) and is compared step by step with
the same run as two ranks on one host. The jobs ask for `--gpus-per-node 1`, as on a GPU
cluster: the nodes' GPUs are count-only (SLURM grants one and sets CUDA_VISIBLE_DEVICES), and
the trainer, whose torch has no CUDA, says so and trains on CPU. Cuts that a test relies on come from
`train.exit_interval` (a step count), never from the clock, so the assertions hold at any
machine speed; the one time-limit run asserts only what any speed gives.

Contract with the trainer (`python -m nemotron_train train CONFIG ...`): checkpoints in
`<run.output_dir>/checkpoints/iter_XXXXXXX/` with `latest_checkpointed_iteration.txt`,
metrics in `<run.output_dir>/metrics.jsonl`, `COMPLETED` once all train.steps are done, and
on a stop a checkpoint and exit code 75 (see nemotron_train/training/stop.py).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, slurm_cluster, wait_until  # noqa: E402,F401

from launch.sbatch_script import SRUN_WAIT_SECONDS  # noqa: E402
from launch.local_cluster import CLUSTER_IFNAME  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
STEPS = 12
SHARED_DATA_CACHE = tempfile.mkdtemp(prefix="nemotron-train-test-data-")
atexit.register(shutil.rmtree, SHARED_DATA_CACHE, ignore_errors=True)
# The smoke model (tensor parallel over 2 ranks), shortened; every run below uses exactly
# these settings so that its losses can be compared with the one-host reference.
RUN = [
    f"data.cache_dir={SHARED_DATA_CACHE}", f"train.steps={STEPS}", "train.log_interval=1", "train.eval_interval=0",
    "train.eval_iters=1", "checkpoint.interval=5", "checkpoint.keep_last=3", "logging.progress_bar=false",
]
JOB = ["--nodes", "2", "--gpus-per-node", "1", "--time", "00:20:00", "--python", sys.executable,
       "--workdir", str(ROOT)]

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not SMOKE.is_file(), reason="configs/smoke.yaml is missing"),
    pytest.mark.skipif(importlib.util.find_spec("nemotron_train.training") is None, reason="the trainer is not built"),
]


def _env() -> Dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(var, None)
    return env


def records(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in (json.loads(x) for x in path.read_text().splitlines()) if "loss" in r] if path.exists() else []


def losses_by_step(run_dir: Path) -> Dict[int, float]:
    """The last loss logged for each step (a step trained again after a crash overrides)."""
    return {r["step"]: r["loss"] for r in records(run_dir)}


def latest(run_dir: Path) -> int:
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text().strip()) if tracker.exists() else 0


def checkpoints(run_dir: Path) -> List[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("iter_*"))


def sbatch(cluster: SlurmCluster, run_dir: Path, *args: str) -> List[str]:
    """`nemotron-train sbatch ... --submit` against the cluster; returns the job ids."""
    cmd = [sys.executable, "-m", "nemotron_train", "sbatch", str(SMOKE), *JOB, "--submit", *args,
           f"run.output_dir={run_dir}", *RUN, f"launch.socket_ifname={CLUSTER_IFNAME}"]
    result = cluster.run(*cmd, cwd=ROOT, timeout=120, check=False, env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"^submitted \S+: job (\d+)$", result.stdout, re.M)


def assert_on_two_hosts(cluster: SlurmCluster, log: str) -> None:
    a, b = cluster.address("node1"), cluster.address("node2")
    assert a != b
    assert f"ranks by host: node1 ({a}) 0; node2 ({b}) 1" in log or f"ranks by host: node2 ({b}) 0; node1 ({a}) 1" in log, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Dict[int, float]:
    """Per-step losses of the same run as two ranks on one host (no SLURM)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nemotron_train", "train", str(SMOKE), f"run.output_dir={out}", *RUN,
           f"launch.master_port={port}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = losses_by_step(out)
    assert sorted(steps) == list(range(1, STEPS + 1))
    return steps


def test_chain_across_two_nodes_trains_every_step_once(slurm_cluster, reference, tmp_path):
    # torchrun on each node (per-node mode); a 3-job chain cut at steps 5 and 10 by train.exit_interval.
    run_dir = tmp_path / "run"
    ids = sbatch(slurm_cluster, run_dir, "--mode", "per-node", "--chain", "3", "train.exit_interval=5")
    infos = [slurm_cluster.wait(job_id, timeout=600) for job_id in ids]
    explain = "\n".join(slurm_cluster.explain(i) for i in infos)
    assert [i.exit_code for i in infos] == [75, 75, 0], explain
    assert [r["step"] for r in records(run_dir)] == list(range(1, STEPS + 1)), explain  # each step exactly once
    assert losses_by_step(run_dir) == reference
    for info in infos:
        assert_on_two_hosts(slurm_cluster, slurm_cluster.job_log(info))
    assert "stopped_early: exit interval" in slurm_cluster.job_log(infos[0])
    assert "notice: GPUs were granted (CUDA_VISIBLE_DEVICES=0" in slurm_cluster.job_log(infos[0])  # count-only GPU
    assert checkpoints(run_dir)[-1] == STEPS and (run_dir / "COMPLETED").exists()


def _kill_training_on(cluster: SlurmCluster, node: str, job_id: str) -> List[int]:
    """SIGKILL every training rank on `node` (not torchrun, which then sees its worker die)."""
    ranks = {pid: cmd for pid, cmd in cluster.node_processes(node, "nemotron_train train", job_id).items()
             if "torch.distributed.run" not in cmd}
    assert ranks, f"no training process on {node}"
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    return list(ranks)


def test_usr1_stop_then_node_failure_then_resume(slurm_cluster, reference, tmp_path):
    # One srun task per rank (per-gpu mode), a chain of 3: the first job is stopped by
    # `scancel --signal=USR1`, the second loses every rank of node2 to SIGKILL, the third
    # finishes from the last checkpoint; the final losses are those of an uninterrupted run.
    run_dir = tmp_path / "run"
    first, second, third = sbatch(slurm_cluster, run_dir, "--mode", "per-gpu", "--chain", "3")

    def running_until(job_id: str, done):
        def check() -> bool:
            info = slurm_cluster.job(job_id)
            assert not info.done, slurm_cluster.explain(info)
            return done()
        return check

    wait_until(running_until(first, lambda: len(records(run_dir)) >= 2), 300, "the first job to train 2 steps", interval=0.1)
    slurm_cluster.scancel(first, "USR1", batch=True)
    info = slurm_cluster.wait(first, timeout=300)
    stopped = latest(run_dir)
    assert info.exit_code == 75, slurm_cluster.explain(info)
    assert 2 <= stopped < 5 and checkpoints(run_dir) == [stopped], slurm_cluster.explain(info)  # the one stop checkpoint
    assert "stopped_early: signal SIGUSR1" in slurm_cluster.job_log(info)
    assert [r["step"] for r in records(run_dir)] == list(range(1, stopped + 1))

    # The next job of the chain resumes there; once it has saved step 5 and trains on, node2
    # loses its ranks (mid-step: the survivors' collective fails at once).
    wait_until(running_until(second, lambda: latest(run_dir) >= 5 and records(run_dir)[-1]["step"] >= 6), 300,
               "the second job to save step 5 and train on", interval=0.1)
    assert records(run_dir)[stopped]["step"] == stopped + 1
    killed_at = time.monotonic()
    _kill_training_on(slurm_cluster, "node2", second)
    info = slurm_cluster.wait(second, timeout=SRUN_WAIT_SECONDS + 120)
    assert info.state == "FAILED" and info.exit_code not in (0, 75), slurm_cluster.explain(info)
    assert time.monotonic() - killed_at < SRUN_WAIT_SECONDS + 30, "the job outlived srun's --wait"
    for node in slurm_cluster.nodes:  # nothing of the failed job left hanging anywhere
        assert not slurm_cluster.node_processes(node, "nemotron_train", job_id=second), node
    checkpoint = latest(run_dir)
    assert checkpoint >= 5 and not (run_dir / "COMPLETED").exists()

    info = slurm_cluster.wait(third, timeout=600)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), slurm_cluster.explain(info)
    log = slurm_cluster.job_log(info)
    assert_on_two_hosts(slurm_cluster, log)
    assert "notice: GPUs were granted (CUDA_VISIBLE_DEVICES=0" in log  # count-only GPU
    assert re.search(rf"resumed from \S+iter_{checkpoint:07d} at step {checkpoint} ", log), log
    assert [r["step"] for r in records(run_dir)] == list(range(1, STEPS + 1))  # steps trained again replace the lost ones
    assert losses_by_step(run_dir) == reference
    assert (run_dir / "COMPLETED").exists() and latest(run_dir) == STEPS


def test_plain_torchrun_across_two_nodes(slurm_cluster, reference, tmp_path):
    # No SLURM: `nemotron-train train` on each node with launch.nnodes/node_rank, a c10d
    # rendezvous at node1's address. Also the time-limit run: a limit this short stops it
    # after its first step on any machine (the limit is checked once per step).
    run_dir = tmp_path / "run"
    port = 29400
    common = [sys.executable, "-m", "nemotron_train", "train", str(SMOKE), f"run.output_dir={run_dir}", *RUN,
              "launch.nproc_per_node=1", "launch.nnodes=2", f"launch.master_addr={slurm_cluster.address('node1')}",
              f"launch.master_port={port}", f"launch.socket_ifname={CLUSTER_IFNAME}", "train.exit_duration_minutes=0.0001"]
    procs = [slurm_cluster.on_node(node, *common, f"launch.node_rank={rank}", cwd=ROOT, env=_env(), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank, node in enumerate(slurm_cluster.nodes)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    log = "\n".join(outs)
    assert_on_two_hosts(slurm_cluster, log)
    assert "stopped_early: time limit" in log
    trained = losses_by_step(run_dir)
    assert trained and len(trained) < STEPS and latest(run_dir) == max(trained)
    assert trained == {step: reference[step] for step in trained}
    assert not (run_dir / "COMPLETED").exists()
