"""Rendered and template sbatch scripts, executed by bash against stand-in `srun`, `scontrol`
and `python` that record what they were asked to run.

This reads the scripts the way SLURM would run them, without SLURM: the batch environment
of a 32-node job, the per-task variables srun would set, the exact torchrun/trainer command
line and environment each rank would get, the trap that forwards the stop signal, and the
exit code a chain acts on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from launch.sbatch import render_job
from launch.sbatch_script import SbatchOptions
from nemotron_train.config.loader import load_config
from nemotron_train.distributed.slurm import rendezvous_port

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
JOB_ID = "4321"
NODELIST = "node[001-032]"

_FAKE_SRUN = """#!{py}
import json, os, sys
args = sys.argv[1:]
opts = []
while args and args[0].startswith("--"):
    opts.append(args.pop(0))
out = os.environ["FAKE_OUT"]
with open(os.path.join(out, "srun.json"), "w") as f:
    json.dump({{"options": opts, "command": args}}, f)
env = dict(os.environ, **json.loads(os.environ.get("FAKE_TASK_ENV", "{{}}")))
# exec: the batch script's `kill $SRUN_PID` then reaches the "rank", as srun's forwarding would.
os.execvpe(args[0], args, env)
"""

_FAKE_PYTHON = """#!/bin/bash
if [[ "${{1:-}} ${{2:-}}" == "-m launch.slurm_env" ]]; then exec {py} "$@"; fi
printf '%s\\n' "$@" > "$FAKE_OUT/python.argv"
env | sort > "$FAKE_OUT/python.env"
grep '^SigIgn' /proc/$$/status > "$FAKE_OUT/python.sigign"
if [[ -n "${{FAKE_TASK:-}}" ]]; then exec {py} "$FAKE_TASK"; fi
if [[ -n "${{FAKE_COMPLETE:-}}" ]]; then echo 60 > "$FAKE_COMPLETE"; fi
exit "${{FAKE_EXIT:-0}}"
"""

_FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
exec {py} -m launch.slurm_env --expand "$3"
"""

# A "rank" that waits for a stop signal, then exits like the trainer does.
_TASK = """
import json, os, signal, sys, time
out = os.environ["FAKE_OUT"]
got = []
for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
open(os.path.join(out, "task.ready"), "w").close()
end = time.time() + 30
while not got and time.time() < end:
    time.sleep(0.05)
json.dump(got, open(os.path.join(out, "task.signals"), "w"))
sys.exit(75 if got else 9)
"""


@pytest.fixture
def harness(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", _FAKE_SRUN), ("python", _FAKE_PYTHON), ("scontrol", _FAKE_SCONTROL)):
        (bin_dir / name).write_text(text.format(py=sys.executable))
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "task.py").write_text(_TASK)
    return Harness(bin_dir, out, tmp_path)


class Harness:
    def __init__(self, bin_dir: Path, out: Path, tmp: Path):
        self.bin_dir, self.out, self.tmp = bin_dir, out, tmp

    def env(self, task_env: Dict[str, str], **extra: str) -> Dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "OMP_"))}
        return dict(
            base,
            PATH=f"{self.bin_dir}:{os.environ['PATH']}",
            PYTHONPATH=str(ROOT),
            PYTHON=str(self.bin_dir / "python"),
            FAKE_OUT=str(self.out),
            FAKE_TASK_ENV=json.dumps(task_env),
            SLURM_JOB_ID=JOB_ID,
            SLURM_JOB_NAME="dry",
            SLURM_JOB_NUM_NODES="32",
            SLURM_JOB_NODELIST=NODELIST,
            SLURM_GPUS_ON_NODE="8",
            **extra,
        )

    def run(self, script: Path, task_env: Dict[str, str], **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script)], env=self.env(task_env, **extra), cwd=self.tmp,
                              capture_output=True, text=True, timeout=60)

    def start(self, script: Path, task_env: Dict[str, str], **extra: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(script)], env=self.env(task_env, FAKE_TASK=str(self.tmp / "task.py"), **extra),
                                cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def argv(self) -> List[str]:
        return (self.out / "python.argv").read_text().splitlines()

    def rank_env(self) -> Dict[str, str]:
        return dict(line.split("=", 1) for line in (self.out / "python.env").read_text().splitlines() if "=" in line)

    def srun(self) -> dict:
        return json.loads((self.out / "srun.json").read_text())

    def ignored(self) -> set:
        mask = int((self.out / "python.sigign").read_text().split()[1], 16)
        return {s.name for s in signal.Signals if mask & (1 << (s.value - 1))}


NODE5_TASK = {"SLURM_NODEID": "5", "SLURM_PROCID": "5", "SLURM_LOCALID": "0", "SLURM_NTASKS": "32"}
RANK45_TASK = {"SLURM_NODEID": "5", "SLURM_PROCID": "45", "SLURM_LOCALID": "5", "SLURM_NTASKS": "256",
               "SLURM_STEP_TASKS_PER_NODE": "8(x32)"}


@pytest.fixture
def config_56b(tmp_path) -> Path:
    """The 56B recipe; a stand-in basing the 56B model recipe if the run recipe is missing."""
    recipe = ROOT / "configs" / "nemotron_h_56b_pretrain.yaml"
    if recipe.is_file():
        return recipe
    model = ROOT / "configs" / "models" / "nemotron_h_56b.yaml"
    if not model.is_file():
        pytest.skip("neither configs/nemotron_h_56b_pretrain.yaml nor configs/models/nemotron_h_56b.yaml exists")
    path = tmp_path / "h56b.yaml"
    path.write_text(f"base: {model}\nrun: {{name: nemotron-h-56b-pretrain}}\ndata: {{source: mock}}\n"
                    "parallel: {tp: 8, pp: 4, sp: true}\ntrain: {global_batch_size: 768, micro_batch_size: 1}\n")
    return path


def _render_56b(config: Path, tmp_path: Path, mode: str):
    opts = SbatchOptions(nodes=32, gpus_per_node=8, time="04:00:00", mode=mode, partition="batch", account="llm",
                         workdir=str(tmp_path), chain=4)
    return render_job(config, [f"run.output_dir={tmp_path / 'h56b'}"], opts)


def test_56b_on_32x8_per_node_reads_right(harness, config_56b, tmp_path):
    job = _render_56b(config_56b, tmp_path, "per-node")
    text = job.script.read_text()
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))
    assert header["nodes"] == "32" and header["ntasks-per-node"] == "1" and header["gpus-per-node"] == "8"
    assert header["time"] == "04:00:00" and header["signal"] == "B:USR1@120" and header["dependency"] == "singleton"
    assert header["partition"] == "batch" and header["account"] == "llm"
    cfg = load_config(job.config)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.launch.nnodes, cfg.launch.nproc_per_node) == (8, 1, 32, 8)  # the recipe: TP8 PP1 on 256 GPUs

    result = harness.run(job.script, NODE5_TASK)
    port = rendezvous_port(JOB_ID)
    assert harness.argv() == [
        "-m", "torch.distributed.run",
        "--nnodes=32", "--nproc-per-node=8", "--node-rank=5",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=node001:{port}", f"--rdzv-id={JOB_ID}",
        "-m", "nemotron_train", "train", str(job.config), "launch.nnodes=32", "launch.nproc_per_node=8",
    ]
    assert harness.srun()["options"] == ["--ntasks-per-node=1", "--wait=120"]
    env = harness.rank_env()
    for key, value in {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN",
                       "OMP_NUM_THREADS": "1", "MASTER_ADDR": "node001", "MASTER_PORT": str(port),
                       "PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT", "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT",
                       "CONFIG": str(job.config)}.items():
        assert env.get(key) == value, key
    # torchrun must survive the stop signal that SLURM delivers to every process of the step.
    assert {"SIGTERM", "SIGUSR1"} <= harness.ignored()
    assert f"rendezvous at node001:{port}" in result.stdout
    assert result.returncode == 75  # a clean exit without COMPLETED: resumable


def test_56b_on_32x8_per_gpu_maps_the_rank(harness, config_56b, tmp_path):
    job = _render_56b(config_56b, tmp_path, "per-gpu")
    assert re.search(r"^#SBATCH --ntasks-per-node=8$", job.script.read_text(), re.M)
    harness.run(job.script, RANK45_TASK)
    assert harness.srun()["options"][0] == "--ntasks-per-node=8"
    assert harness.argv() == ["-m", "nemotron_train", "train", str(job.config), "launch.nnodes=32", "launch.nproc_per_node=8"]
    env = harness.rank_env()
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "45", "WORLD_SIZE": "256", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "5",
        "MASTER_ADDR": "node001", "MASTER_PORT": str(rendezvous_port(JOB_ID)),
    }
    assert "SIGUSR1" not in harness.ignored()  # the rank itself never ignores the stop signal


@pytest.fixture
def smoke_script(tmp_path):
    def render(mode: str = "per-gpu", **kw):
        opts = SbatchOptions(nodes=1, gpus_per_node=0, nproc_per_node=2, time="00:10:00", mode=mode, workdir=str(tmp_path), **kw)
        return render_job(SMOKE, [f"run.output_dir={tmp_path / 'run'}"], opts)

    return render


@pytest.mark.parametrize(
    "fake, expected",
    [({"FAKE_EXIT": "0"}, 75), ({"FAKE_EXIT": "75"}, 75), ({"FAKE_EXIT": "3"}, 3), ({"FAKE_COMPLETE": "yes"}, 0)],
    ids=["clean-exit-not-done", "resumable", "failure", "completed"],
)
def test_exit_code_for_the_chain(harness, smoke_script, tmp_path, fake, expected):
    job = smoke_script()
    if "FAKE_COMPLETE" in fake:
        fake = {"FAKE_COMPLETE": str(job.run_dir / "COMPLETED")}
    result = harness.run(job.script, RANK45_TASK, **fake)
    assert result.returncode == expected, result.stdout + result.stderr


def test_completed_run_exits_before_launching(harness, smoke_script):
    job = smoke_script()
    (job.run_dir / "COMPLETED").write_text("60\n")
    result = harness.run(job.script, RANK45_TASK)
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert not (harness.out / "srun.json").exists()
    # A marker from a shorter run (train.steps since raised to 60) does not count.
    (job.run_dir / "COMPLETED").write_text("30\n")
    assert harness.run(job.script, RANK45_TASK).returncode == 75
    assert (harness.out / "srun.json").exists()


def _stop_job(harness: Harness, script: Path, sig: signal.Signals, expect_forwarded: str, **extra: str) -> str:
    proc = harness.start(script, RANK45_TASK, **extra)
    try:
        deadline = time.time() + 30
        while not (harness.out / "task.ready").exists():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((harness.out / "task.signals").read_text()) == [expect_forwarded]
    assert proc.returncode == 75, out + err
    return err


@pytest.mark.parametrize("mode", ["per-gpu", "per-node"])
def test_batch_signal_is_forwarded_to_the_ranks(harness, smoke_script, mode):
    err = _stop_job(harness, smoke_script(mode).script, signal.SIGUSR1, "SIGUSR1")
    assert "batch shell got SIGUSR1" in err


def test_term_reaches_the_ranks_as_usr1(harness, smoke_script):
    # srun would SIGKILL the step on its own SIGTERM: the script must not pass TERM on.
    err = _stop_job(harness, smoke_script().script, signal.SIGTERM, "SIGUSR1")
    assert "batch shell got SIGTERM" in err


def test_usr2_is_forwarded_as_usr2(harness, tmp_path):
    opts = SbatchOptions(nodes=1, gpus_per_node=0, nproc_per_node=2, time="00:10:00", signal="USR2@60", workdir=str(tmp_path))
    job = render_job(SMOKE, [f"run.output_dir={tmp_path / 'run'}", "train.exit_signal=SIGUSR2"], opts)
    _stop_job(harness, job.script, signal.SIGUSR2, "SIGUSR2")


def _template_env(tmp_path: Path, **extra: str) -> Dict[str, str]:
    return dict(CONFIG="configs/x.yaml", RUN_DIR=str(tmp_path / "trun"), OVERRIDES="train.steps=5 checkpoint.interval=2", **extra)


def test_pretrain_template_per_node(harness, tmp_path):
    result = harness.run(ROOT / "slurm" / "pretrain.sbatch", NODE5_TASK, **_template_env(tmp_path))
    assert result.returncode == 75, result.stderr
    assert harness.argv() == [
        "-m", "torch.distributed.run",
        "--nnodes=32", "--nproc-per-node=8", "--node-rank=5",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=node001:{rendezvous_port(JOB_ID)}", f"--rdzv-id={JOB_ID}",
        "-m", "nemotron_train", "train", "configs/x.yaml", f"run.output_dir={tmp_path / 'trun'}",
        "launch.nnodes=32", "launch.nproc_per_node=8", "train.steps=5", "checkpoint.interval=2",
    ]
    assert {"SIGTERM", "SIGUSR1"} <= harness.ignored()


def test_pretrain_template_per_gpu_and_stop(harness, tmp_path):
    result = harness.run(ROOT / "slurm" / "pretrain.sbatch", RANK45_TASK, MODE="per-gpu", **_template_env(tmp_path))
    assert result.returncode == 75, result.stderr
    assert harness.srun()["options"][0] == "--ntasks-per-node=8"
    assert harness.rank_env()["RANK"] == "45" and harness.argv()[:4] == ["-m", "nemotron_train", "train", "configs/x.yaml"]
    (harness.out / "srun.json").unlink()
    err = _stop_job(harness, ROOT / "slurm" / "pretrain.sbatch", signal.SIGTERM, "SIGUSR1", MODE="per-gpu", **_template_env(tmp_path))
    assert "batch shell got SIGTERM" in err


@pytest.mark.parametrize("task, arm, seed", [("0", "bf16", "1"), ("4", "fp8", "2"), ("2", "fp8-delayed", "1")])
def test_ablation_template_maps_array_task_to_arm_and_seed(harness, tmp_path, task, arm, seed):
    env = dict(CONFIG="configs/x.yaml", ARMS="bf16 fp8 fp8-delayed", SEEDS="1 2", BASE_DIR=str(tmp_path / "abl"),
               GROUP="g", SLURM_ARRAY_TASK_ID=task)
    result = harness.run(ROOT / "slurm" / "ablation.sbatch", NODE5_TASK, **env)
    assert result.returncode == 75, result.stderr
    argv = harness.argv()
    enabled = "false" if arm == "bf16" else "true"
    assert f"precision.fp8.enabled={enabled}" in argv and f"train.seed={seed}" in argv
    assert f"run.output_dir={tmp_path / 'abl'}/{arm}-s{seed}" in argv and "logging.wandb.group=g" in argv
    assert ("precision.fp8.recipe=delayed" in argv) == (arm == "fp8-delayed")


def test_ablation_template_rejects_tasks_beyond_the_grid(harness, tmp_path):
    env = dict(ARMS="bf16 fp8", SEEDS="1", SLURM_ARRAY_TASK_ID="2", BASE_DIR=str(tmp_path))
    result = harness.run(ROOT / "slurm" / "ablation.sbatch", NODE5_TASK, **env)
    assert result.returncode == 2 and "shrink --array" in result.stderr
