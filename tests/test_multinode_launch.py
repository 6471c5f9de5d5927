"""Multi-node launch settings without a cluster: the step-count stop (train.exit_interval),
launch.nnodes/node_rank/socket_ifname for plain torchrun, the rank-to-host report, and what
sbatch rendering refuses or quotes. The same paths run for real on two hosts in
tests/test_slurm_e2e.py and tests/test_slurm_cluster.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.sbatch import render_job
from launch.sbatch_script import SbatchOptions
from nemotron_train.cli import main as cli_main
from nemotron_train.commands.train import _multi_node_rendezvous
from nemotron_train.config import ConfigError, load_config
from nemotron_train.config.validate import validate_config
from nemotron_train.distributed.hosts import describe_rank_hosts, interface_address
from nemotron_train.errors import LaunchError
from nemotron_train.training.stop import should_exit

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


# --------------------------------------------------------------------------- exit interval


def test_exit_interval_stops_at_each_multiple_only():
    now = time.time()
    stops = [step for step in range(1, 13) if should_exit(None, now, None, step=step, exit_interval=5)]
    assert stops == [5, 10]
    assert should_exit(None, now, None, step=5, exit_interval=5) == "exit interval"
    assert should_exit(None, now, None, step=5) is None  # no interval: no stop
    assert should_exit(None, now - 3600, 1.0, step=5, exit_interval=5) == "time limit"  # the clock is named first


def test_exit_interval_must_be_positive():
    with pytest.raises(ConfigError, match="train.exit_interval=0"):
        validate_config(load_config(SMOKE, ["train.exit_interval=0"]), 2)


# --------------------------------------------------------------------------- plain torchrun, several nodes


def test_node_rank_and_socket_ifname_are_checked():
    with pytest.raises(ConfigError, match=r"launch.node_rank=2 must be in 0..1"):
        validate_config(load_config(SMOKE, ["launch.nnodes=2", "launch.node_rank=2"]), 4)
    with pytest.raises(ConfigError, match="launch.socket_ifname"):
        validate_config(load_config(SMOKE, ["launch.socket_ifname='eth0; rm -rf x'"]), 2)


def test_multi_node_rendezvous_is_c10d_at_node_zero():
    cfg = load_config(SMOKE, ["launch.nnodes=2", "launch.node_rank=1", "launch.master_addr=10.1.2.3",
                              "launch.master_port=29411", "launch.socket_ifname=lo"])
    assert _multi_node_rendezvous(cfg) == [
        "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.1.2.3:29411", "--rdzv-id=smoke",
        "--local-addr=127.0.0.1",  # this node's address on launch.socket_ifname
    ]
    cfg.launch.master_addr = "127.0.0.1"
    with pytest.raises(ConfigError, match="loopback"):
        _multi_node_rendezvous(cfg)


def test_train_refuses_a_multi_node_run_without_a_reachable_master(capsys):
    assert cli_main(["train", str(SMOKE), "launch.nnodes=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "launch.master_addr" in err[0]


def test_interface_address_and_rank_report():
    assert interface_address("lo") == "127.0.0.1"
    with pytest.raises(LaunchError, match="'nope0' has no IPv4 address"):
        interface_address("nope0")
    hosts = [("node1", "10.0.0.1"), ("node1", "10.0.0.1"), ("node2", "10.0.0.2"), ("node1", "10.0.0.1")]
    assert describe_rank_hosts(hosts) == "ranks by host: node1 (10.0.0.1) 0-1,3; node2 (10.0.0.2) 2"


# --------------------------------------------------------------------------- sbatch: quoting and refusals


def _opts(**kw) -> SbatchOptions:
    base = dict(nodes=2, gpus_per_node=0, nproc_per_node=1, time="00:10:00", python=sys.executable)
    return SbatchOptions(**{**base, **kw})


def _render(tmp_path: Path, overrides=(), **kw):
    return render_job(SMOKE, [f"run.output_dir={tmp_path / 'run'}", *overrides], _opts(workdir=str(tmp_path), **kw))


@pytest.mark.parametrize("field, value, named", [
    ("job_name", "a\nb", "--job-name"),
    ("partition", "p\rq", "--partition"),
    ("account", "a\tb", "--account"),
    ("python", "py\nthon", "--python"),
    ("env", ["K=a\nb"], "--env"),
    ("extra_sbatch", ["--qos=a\n#x"], "--sbatch-option"),
])
def test_control_characters_are_refused_naming_the_option(tmp_path, field, value, named):
    with pytest.raises(LaunchError, match=f"^{named} .*control character"):
        _render(tmp_path, **{field: value})
    assert not (tmp_path / "run" / "sbatch").exists()  # nothing written


def test_a_newline_in_run_name_is_refused(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"base: {SMOKE}\nrun:\n  name: \"x\\n$(touch {tmp_path}/pwned)\"\n")
    code = cli_main(["sbatch", str(config), "--nodes", "1", "--cpu", "--nproc-per-node", "2", "--time", "00:10:00",
                     f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "run.name" in err[0] and "control character" in err[0]
    assert not (tmp_path / "run" / "sbatch").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("bad", ["--qos high", "-q=high", "--qos", "--qos=a --begin=now", "--qos='a'", "qos=high"])
def test_sbatch_option_takes_only_key_value(tmp_path, bad):
    with pytest.raises(LaunchError, match="--sbatch-option"):
        _render(tmp_path, extra_sbatch=[bad])


def test_shell_values_are_quoted(tmp_path):
    marker = tmp_path / "pwned"
    job = _render(tmp_path, python=f"$(touch {marker})", env=[f"NT_X=$(touch {marker})"], extra_sbatch=["--qos=high"])
    text = job.script.read_text()
    assert "#SBATCH --qos=high" in text
    subprocess.run(["bash", "-n", str(job.script)], check=True)
    # The interpreter and environment lines, run on their own, set the literal text.
    lines = [line for line in text.splitlines() if line.startswith(("PYTHON=", "export NT_X="))]
    out = subprocess.run(["bash", "-c", "\n".join(lines) + '\nprintf "%s|%s" "$PYTHON" "$NT_X"'], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert out == f"$(touch {marker})|$(touch {marker})" and not marker.exists()


def test_socket_ifname_is_rendered(tmp_path):
    per_node = _render(tmp_path, ["launch.socket_ifname=cluster0"], mode="per-node").script.read_text()
    assert "export GLOO_SOCKET_IFNAME=cluster0 NCCL_SOCKET_IFNAME=cluster0" in per_node
    assert "MASTER_ADDR=$(ip -4 -o addr show dev cluster0" in per_node
    assert '${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"}' in per_node
    per_gpu = _render(tmp_path, ["launch.socket_ifname=cluster0"], mode="per-gpu").script.read_text()
    assert '-m launch.slurm_env --master-addr "$MASTER_ADDR" --' in per_gpu
    plain = _render(tmp_path, mode="per-node").script.read_text()
    assert "GLOO_SOCKET_IFNAME" not in plain.replace("#   export NCCL_SOCKET_IFNAME", "") and "scontrol show hostnames" in plain


def test_wait_needs_submit(capsys):
    assert cli_main(["sbatch", str(SMOKE), "--nodes", "1", "--cpu", "--nproc-per-node", "2", "--time", "1:00",
                     "--wait"]) == 2
    assert "--wait" in capsys.readouterr().err


def test_local_cluster_status_without_a_cluster(tmp_path, capsys):
    assert cli_main(["local-cluster", "status", "--state-dir", str(tmp_path / "none")]) == 1
    assert "no local cluster is up" in capsys.readouterr().err
    assert cli_main(["local-cluster", "down", "--state-dir", str(tmp_path / "none")]) == 0


def test_local_cluster_gpus_are_count_only_placeholders(tmp_path):
    # What `local-cluster up --gpus-per-node G` gives slurmd: G GPUs per node, each a File=
    # placeholder (slurm 22.05 drops a file-less GPU) that is no real device.
    from launch import local_cluster

    st = local_cluster.ClusterState(state_dir=str(tmp_path), nodes=2, cpus_per_node=2, tag="t", subnet="10.0.0.0/24",
                                    controller="c", bridge="b", gpus_per_node=2)
    text = local_cluster._gres_conf(st)
    assert text == f"AutoDetect=off\nName=gpu Count=2 File={tmp_path}/gpus/gpu[0-1]\n"
    placeholders = sorted((tmp_path / "gpus").iterdir())
    assert [p.name for p in placeholders] == ["gpu0", "gpu1"] and all(p.stat().st_size == 0 for p in placeholders)
    st.gpus_per_node = 0
    assert local_cluster._gres_conf(st) == "AutoDetect=off\n"
    with pytest.raises(LaunchError, match="--gpus-per-node -1"):
        local_cluster.up(1, state_dir=tmp_path / "c", gpus_per_node=-1)


@pytest.mark.parametrize("mode", ["per-node", "per-gpu"])
def test_sbatch_for_one_gpu_per_node_runs_one_rank_per_node(tmp_path, mode):
    opts = SbatchOptions(nodes=2, gpus_per_node=1, time="00:20:00", mode=mode, python=sys.executable)
    job = render_job(SMOKE, [f"run.output_dir={tmp_path / 'run'}"], opts)
    text = job.script.read_text()
    assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "launch.nproc_per_node=1" in text and load_config(job.config).launch.nproc_per_node == 1
