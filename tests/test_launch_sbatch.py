"""`nemotron-train sbatch`: the rendered script, the config snapshot, validation, submission
(with a stand-in `sbatch`) and FP8-vs-BF16 ablations."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from launch.sbatch import render_job, submit, submit_plan
from launch.sbatch_script import SbatchOptions, parse_signal, parse_time
from nemotron_train.ablation.plan import ARMS, build_plan, parse_arms
from nemotron_train.ablation.runner import PLAN_FILE
from nemotron_train.cli import main as cli_main
from nemotron_train.config.loader import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# FP8 GEMMs need 16-aligned widths: the smoke model's Mamba in_proj is not, on one rank.
FP8_SMOKE = ["parallel.tp=1", "parallel.sp=false", "model.mamba_num_heads=16"]


def sbatch_options(script: str) -> Dict[str, str]:
    """#SBATCH --key=value lines -> {key: value} (flags map to "")."""
    found = {}
    for line in script.splitlines():
        match = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
        if match:
            found[match.group(1)] = match.group(2) or ""
    return found


def cpu_options(**kw) -> SbatchOptions:
    base = dict(nodes=1, gpus_per_node=0, nproc_per_node=2, time="00:10:00")
    base.update(kw)
    return SbatchOptions(**base)


@pytest.fixture
def smoke_job(tmp_path):
    return render_job(SMOKE, [f"run.output_dir={tmp_path / 'run'}"], cpu_options(workdir=str(tmp_path)))


def test_cpu_script_header(smoke_job, tmp_path):
    text = smoke_job.script.read_text()
    opts = sbatch_options(text)
    assert smoke_job.script == tmp_path / "run" / "sbatch" / "smoke.sbatch"
    assert opts == {
        "job-name": "smoke",
        "nodes": "1",
        "ntasks-per-node": "1",
        "time": "00:10:00",
        "signal": "B:USR1@120",
        "output": f"{tmp_path}/run/logs/%x-%j.out",
        "chdir": str(tmp_path),
    }
    assert "gpus-per-node" not in opts  # CPU ranks: no GPUs requested
    assert (tmp_path / "run" / "logs").is_dir()  # sbatch would not create it
    assert os.access(smoke_job.script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(smoke_job.script)]).returncode == 0


def test_script_body(smoke_job, tmp_path):
    text = smoke_job.script.read_text()
    lines = text.splitlines()
    assert "set -euo pipefail" in lines
    # The completed check comes before anything is launched.
    assert text.index("if run_completed; then") < text.index("srun ")
    assert f"RUN_DIR={tmp_path}/run" in lines and "TRAIN_STEPS=60" in lines
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in lines
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines
    assert "trap 'request_stop USR1' USR1" in lines and "trap 'request_stop TERM' TERM" in lines
    assert '    kill -s USR1 "$SRUN_PID" 2>/dev/null || true' in lines  # TERM is never sent to srun
    assert "--nproc-per-node=2" in text and "--rdzv-backend=c10d" in text
    assert 'launch.nnodes="$SLURM_JOB_NUM_NODES" launch.nproc_per_node=2' in text
    assert 'exit "$EXIT_CODE_RESUMABLE"' in text and "EXIT_CODE_RESUMABLE=75" in lines


def test_config_snapshot_is_the_resolved_config(smoke_job, tmp_path):
    text = smoke_job.script.read_text()
    assert f"CONFIG={smoke_job.config}" in text.splitlines()
    assert smoke_job.config.parent == tmp_path / "run" / "sbatch"
    snap = load_config(smoke_job.config)
    expected = load_config(SMOKE, [f"run.output_dir={tmp_path / 'run'}", "launch.nnodes=1", "launch.nproc_per_node=2"])
    assert snap == expected
    # Rendering again never rewrites the snapshot a queued job reads.
    again = render_job(SMOKE, [f"run.output_dir={tmp_path / 'run'}", "train.steps=7"], cpu_options(workdir=str(tmp_path)))
    assert again.config != smoke_job.config
    assert load_config(smoke_job.config).train.steps == 60 and load_config(again.config).train.steps == 7


def test_per_gpu_mode_and_cluster_options(tmp_path):
    opts = SbatchOptions(
        nodes=4, gpus_per_node=8, time="1-00:00:00", mode="per-gpu", partition="batch", account="llm",
        container_image="nvcr.io/nvidia/pytorch:25.01-py3", container_mounts="/lustre:/lustre", chain=3,
        job_name="h8b", signal="usr2@300", exclusive=True, cpus_per_task=16, env=["NCCL_IB_HCA=mlx5"],
        extra_sbatch=["--qos=high"], workdir=str(tmp_path),
    )
    job = render_job(SMOKE, [f"run.output_dir={tmp_path / 'r'}", "train.exit_signal=SIGUSR2", "train.global_batch_size=128"], opts)
    text = job.script.read_text()
    opts_found = sbatch_options(text)
    assert opts_found["ntasks-per-node"] == "8" and opts_found["gpus-per-node"] == "8"
    assert opts_found["partition"] == "batch" and opts_found["account"] == "llm"
    assert opts_found["signal"] == "B:USR2@300" and opts_found["dependency"] == "singleton"
    assert opts_found["exclusive"] == "" and opts_found["cpus-per-task"] == "16" and opts_found["qos"] == "high"
    assert job.script.name == "h8b.sbatch"
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--ntasks-per-node=8" in srun and "--wait=120" in srun
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert "--container-mounts=/lustre:/lustre" in srun and f"--container-workdir={tmp_path}" in srun
    assert '"$PYTHON" -m launch.slurm_env --' in text and "torch.distributed.run" not in text
    assert "export NCCL_IB_HCA=mlx5" in text
    assert 'kill -s USR2 "$SRUN_PID"' in text


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(nproc_per_node=None), "needs --nproc-per-node"),
        (dict(gpus_per_node=4, nproc_per_node=8), "exceeds --gpus-per-node"),
        (dict(time="00:01:00"), "not inside --time"),
        (dict(time="ten minutes"), "use HH:MM:SS"),
        (dict(mode="per-rack"), "--mode"),
        (dict(chain=0), "--chain"),
        (dict(env=["NOEQUALS"]), "KEY=VALUE"),
        (dict(signal="KILL@60"), "use one of"),
        (dict(container_mounts="/a:/a"), "needs --container-image"),
    ],
)
def test_bad_options_are_value_errors(tmp_path, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render_job(SMOKE, [f"run.output_dir={tmp_path}"], cpu_options(**kw))


def test_layout_and_signal_are_checked_against_the_config(tmp_path):
    with pytest.raises(ConfigError):  # smoke is tp=2: one rank cannot hold it
        render_job(SMOKE, [f"run.output_dir={tmp_path}"], cpu_options(nproc_per_node=1))
    with pytest.raises(ValueError, match="train.exit_signal=SIGUSR2"):
        render_job(SMOKE, [f"run.output_dir={tmp_path}"], cpu_options(signal="USR2@60"))


def test_time_and_signal_parsing():
    assert parse_time("04:00:00") == 4 * 3600
    assert parse_time("90") == 90 * 60 and parse_time("05:30") == 330
    assert parse_time("2-12") == 2 * 86400 + 12 * 3600
    assert parse_time("1-00:30:15") == 86400 + 30 * 60 + 15
    assert parse_signal("B:USR1@120") == parse_signal("SIGUSR1@120") == ("USR1", 120)
    assert parse_signal("term") == ("TERM", 60)


def test_cli_renders_and_reports(tmp_path, capsys):
    out = tmp_path / "custom.sbatch"
    rc = cli_main(["sbatch", str(SMOKE), "--nodes", "1", "--cpu", "--nproc-per-node", "2", "--time", "00:20:00",
                   "--output", str(out), f"run.output_dir={tmp_path / 'run'}", "train.steps=5", "--job-name", "sm"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sbatch_options(out.read_text())["job-name"] == "sm"
    snap = re.search(r"^CONFIG=(.*)$", out.read_text(), re.M).group(1)
    assert load_config(snap).train.steps == 5


def test_cli_errors(tmp_path, capsys):
    rc = cli_main(["sbatch", str(SMOKE), "--nodes", "1", "--time", "00:20:00", f"run.output_dir={tmp_path}"])
    assert rc == 2 and "--gpus-per-node" in capsys.readouterr().err
    rc = cli_main(["sbatch", str(SMOKE), "--nodes", "1", "--cpu", "--nproc-per-node", "2", "--time", "00:20:00", "train.bogus=1"])
    assert rc == 2 and "unknown config key `train.bogus`" in capsys.readouterr().err
    rc = cli_main(["sbatch", str(SMOKE), "--nodes", "1", "--cpu", "--nproc-per-node", "2", "--time", "00:20:00", "--arms", "bf16"])
    assert rc == 2 and "both --arms and --seeds" in capsys.readouterr().err


def _fake_sbatch(bin_dir: Path, log: Path) -> Dict[str, str]:
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\nn=$(wc -l < {log})\necho "$((1000 + n));cluster"\n')
    fake.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_submit_a_chain(smoke_job, tmp_path, monkeypatch, capsys):
    log = tmp_path / "sbatch.log"
    env = _fake_sbatch(tmp_path / "bin", log)
    assert submit(smoke_job.script, 3, env=env) == ["1001", "1002", "1003"]
    assert log.read_text().splitlines() == [f"--parsable {smoke_job.script}"] * 3
    monkeypatch.setenv("PATH", env["PATH"])
    rc = cli_main(["sbatch", str(SMOKE), "--nodes", "1", "--cpu", "--nproc-per-node", "2", "--time", "00:20:00",
                   "--chain", "2", "--submit", f"run.output_dir={tmp_path / 'c'}"])
    out = capsys.readouterr().out.splitlines()
    logs = tmp_path / "c" / "logs"
    assert rc == 0 and out[1:] == ["submitted smoke: job 1004", f"  log: {logs}/smoke-1004.out",
                                   "submitted smoke: job 1005", f"  log: {logs}/smoke-1005.out"]
    assert sbatch_options(Path(out[0]).read_text())["dependency"] == "singleton"


def test_submit_without_sbatch_is_a_clear_error(smoke_job):
    with pytest.raises(ValueError, match="needs the SLURM client"):
        submit(smoke_job.script, 1, env={"PATH": "/nonexistent"})


def test_ablation_renders_one_job_per_planned_run(tmp_path):
    plan = build_plan(str(SMOKE), ("bf16", "fp8"), seeds=[11, 12], user_overrides=FP8_SMOKE,
                      output_root=str(tmp_path / "abl"))
    jobs = submit_plan(plan, cpu_options(workdir=str(tmp_path)), submit_jobs=False)
    labels = ["bf16_s0", "fp8_s0", "bf16_s1", "fp8_s1"]
    assert [r.label for r in plan.runs] == labels  # the plan's runs, in the plan's order
    assert [j.job_name for j in jobs] == [f"smoke-bf16-vs-fp8-{label}" for label in labels]
    cfgs = [load_config(j.config) for j in jobs]
    assert [c.precision.fp8.enabled for c in cfgs] == [False, True, False, True]
    assert [c.train.seed for c in cfgs] == [11, 11, 12, 12]
    assert {c.logging.wandb.group for c in cfgs} == {"smoke-bf16-vs-fp8"}
    assert [Path(c.run.output_dir) for c in cfgs] == [tmp_path / "abl" / label for label in labels]
    assert [str(j.run_dir) for j in jobs] == plan.run_dirs()
    for job, cfg in zip(jobs, cfgs):
        assert job.script == Path(cfg.run.output_dir) / "sbatch" / f"{job.job_name}.sbatch"
        # Apart from precision, the two arms of a seed train the same run.
        assert sbatch_options(job.script.read_text())["job-name"] == job.job_name
    assert json.loads((tmp_path / "abl" / PLAN_FILE).read_text())["seeds"] == [11, 12]
    a, b = cfgs[0], cfgs[1]
    a.precision.fp8.enabled = b.precision.fp8.enabled = False
    a.run = b.run = None
    assert a == b


def test_ablation_arms_come_from_the_plan(tmp_path):
    with pytest.raises(ValueError, match="available: bf16, fp8"):
        build_plan(str(SMOKE), parse_arms("fp4"), seeds=[1], output_root=str(tmp_path))
    assert ARMS["fp8-delayed"] == ("precision.fp8.enabled=true", "precision.fp8.recipe=delayed")
    rc = cli_main(["sbatch", str(SMOKE), "--nodes", "1", "--cpu", "--nproc-per-node", "1", "--time", "01:00:00",
                   "--arms", "fp4", "--seeds", "1", "--output-root", str(tmp_path)])
    assert rc == 2


def test_ablation_cli_submits_every_job(tmp_path, monkeypatch, capsys):
    env = _fake_sbatch(tmp_path / "bin", tmp_path / "log")
    monkeypatch.setenv("PATH", env["PATH"])
    rc = cli_main(["sbatch", str(SMOKE), "--nodes", "1", "--cpu", "--nproc-per-node", "1", "--time", "01:00:00",
                   "--arms", "bf16,fp8", "--seeds", "5", "--group", "g1", "--submit", "--chain", "2",
                   "--output-root", str(tmp_path / "a"), *FP8_SMOKE])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert [line for line in out if line.startswith("submitted")] == [
        "submitted g1-bf16_s0: job 1001", "submitted g1-bf16_s0: job 1002",
        "submitted g1-fp8_s0: job 1003", "submitted g1-fp8_s0: job 1004",
    ]
    snap = yaml.safe_load(Path(re.search(r"^CONFIG=(.*)$", Path(out[0]).read_text(), re.M).group(1)).read_text())
    assert snap["logging"]["wandb"]["group"] == "g1" and snap["train"]["seed"] == 5
    assert snap["run"]["output_dir"] == str(tmp_path / "a" / "bf16_s0")


def test_ablate_slurm_renders_the_same_jobs_as_sbatch_arms(tmp_path, capsys):
    """`ablate --slurm` and `sbatch --arms` are one code path: the same plan, options and scripts."""
    common = ["--nodes", "1", "--cpu", "--nproc-per-node", "1", "--time", "01:00:00", "--chain", "3", *FP8_SMOKE]
    assert cli_main(["ablate", str(SMOKE), "--arms", "bf16,fp8", "--slurm", "--dry-run", "--name", "x",
                     "--output-root", str(tmp_path / "abl"), *common]) == 0
    out = capsys.readouterr().out.splitlines()
    scripts = [Path(line) for line in out if line.endswith(".sbatch")]
    assert scripts == [tmp_path / "abl" / label / "sbatch" / f"x-{label}.sbatch" for label in ("bf16_s0", "fp8_s0")]
    assert not any(line.startswith("submitted") for line in out) and "rendered 2 runs of x" in out[-2]
    via_ablate = [sbatch_options(p.read_text()) for p in scripts]
    assert cli_main(["sbatch", str(SMOKE), "--arms", "bf16,fp8", "--seeds", str(load_config(SMOKE).train.seed),
                     "--name", "x", "--output-root", str(tmp_path / "abl"), *common]) == 0
    assert [sbatch_options(p.read_text()) for p in scripts] == via_ablate
    assert via_ablate[0]["dependency"] == "singleton" and via_ablate[1]["job-name"] == "x-fp8_s0"
    # Missing or stray SLURM options are named.
    assert cli_main(["ablate", str(SMOKE), "--slurm", "--cpu", "--nproc-per-node", "1", *FP8_SMOKE,
                     "--output-root", str(tmp_path / "b")]) == 2
    assert "needs --nodes N and --time HH:MM:SS" in capsys.readouterr().err
    assert cli_main(["ablate", str(SMOKE), "--dry-run", "--partition", "batch", "--output-root", str(tmp_path / "c")]) == 2
    assert "--partition: SLURM options, used only with --slurm" in capsys.readouterr().err


def _slurm_templates() -> List[Path]:
    return sorted((ROOT / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("template", _slurm_templates(), ids=lambda p: p.name)
def test_hand_templates_are_valid_and_complete(template):
    text = template.read_text()
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    opts = sbatch_options(text)
    assert {"nodes", "ntasks-per-node", "time", "signal", "output"} <= set(opts)
    assert opts["signal"].startswith("B:")
    for needle in ("set -euo pipefail", "COMPLETED", "CUDA_DEVICE_MAX_CONNECTIONS=1", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                   "request_stop", 'kill -s "$FORWARD_SIGNAL" "$SRUN_PID"', "--rdzv-backend=c10d", "launch.slurm_env",
                   "EXIT_CODE_RESUMABLE=75"):
        assert needle in text, f"{template.name} lacks {needle!r}"


def test_templates_exist():
    assert [p.name for p in _slurm_templates()] == ["ablation.sbatch", "pretrain.sbatch"]
