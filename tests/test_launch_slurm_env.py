"""SLURM host lists, rendezvous and the SLURM -> torch.distributed environment mapping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemotron_train.distributed.slurm import (
    RDZV_PORT_BASE,
    RDZV_PORT_SPAN,
    expand_hostlist,
    expand_tasks_per_node,
    job_nodes,
    rendezvous_endpoint,
    rendezvous_port,
    torch_env_from_slurm,
    torchrun_command,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "spec, hosts",
    [
        ("vm", ["vm"]),
        ("n1,n2", ["n1", "n2"]),
        ("node[001-004,010],gpu-a[1-2]", ["node001", "node002", "node003", "node004", "node010", "gpu-a1", "gpu-a2"]),
        ("host-[01-03]x", ["host-01x", "host-02x", "host-03x"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a[3],b", ["a3", "b"]),
        (" c[1-2] , d ", ["c1", "c2", "d"]),
        ("pool0-[0007,0003]", ["pool0-0007", "pool0-0003"]),  # SLURM's order is kept
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


def test_expand_hostlist_large_job():
    hosts = expand_hostlist("dgx[0001-0512]")
    assert len(hosts) == 512 and hosts[0] == "dgx0001" and hosts[-1] == "dgx0512"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("node[1-4", "without a matching ']'"),
        ("node1-4]", "without a matching '['"),
        ("node[4-1]", "backwards"),
        ("node[a-b]", "not a number"),
        ("node[]", "empty brackets"),
        ("a,,b", "empty entry"),
        ("n[1-[2]]", "nested"),
        ("n[1-99999999999]", "more than"),
    ],
)
def test_expand_hostlist_rejects_malformed(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand_hostlist(spec)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8(x4),2") == [8, 8, 8, 8, 2]
    assert expand_tasks_per_node("1") == [1]
    with pytest.raises(ValueError, match="N\\(xM\\)"):
        expand_tasks_per_node("8x4")


def test_rendezvous_port_is_a_function_of_the_job_id():
    assert rendezvous_port(123456) == rendezvous_port("123456") == RDZV_PORT_BASE + 123456 % RDZV_PORT_SPAN
    ports = {rendezvous_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100  # consecutive jobs of a chain never share a port
    assert all(RDZV_PORT_BASE <= p < RDZV_PORT_BASE + RDZV_PORT_SPAN < 32768 for p in ports)
    assert rendezvous_port("777_3") == rendezvous_port(777)  # array task ids
    with pytest.raises(ValueError, match="not a number"):
        rendezvous_port("abc")


def _step_env(procid: int, nodes: str = "node[001-002]", tasks_per_node: int = 8, job_id: str = "4242") -> dict:
    n_nodes = len(expand_hostlist(nodes))
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_JOB_NUM_NODES": str(n_nodes),
        "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(n_nodes * tasks_per_node),
        "SLURM_LOCALID": str(procid % tasks_per_node),
        "SLURM_NODEID": str(procid // tasks_per_node),
        "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{n_nodes})",
    }


def test_torch_env_for_one_task_per_gpu():
    env = torch_env_from_slurm(_step_env(9))
    assert env == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "NODE_RANK": "1",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "node001",
        "MASTER_PORT": str(rendezvous_port(4242)),
    }


def test_torch_env_uneven_tasks_and_overrides():
    step = dict(_step_env(4, nodes="a,b"), SLURM_NTASKS="5", SLURM_STEP_TASKS_PER_NODE="4,1", SLURM_LOCALID="0", SLURM_NODEID="1")
    env = torch_env_from_slurm(step, master_addr="10.1.2.3", master_port=31000)
    assert env["LOCAL_WORLD_SIZE"] == "1" and env["WORLD_SIZE"] == "5"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.1.2.3", "31000")


def test_torch_env_outside_a_job_step_is_a_clear_error():
    step = _step_env(0)
    del step["SLURM_PROCID"]
    with pytest.raises(ValueError, match="SLURM_PROCID is not set.*under srun"):
        torch_env_from_slurm(step)
    with pytest.raises(ValueError, match="outside"):
        torch_env_from_slurm(dict(_step_env(0), SLURM_PROCID="16"))


def test_endpoint_is_the_first_node():
    env = _step_env(0, nodes="gpu-b[07-09],gpu-a1")
    assert job_nodes(env) == ["gpu-b07", "gpu-b08", "gpu-b09", "gpu-a1"]
    assert rendezvous_endpoint(env) == ("gpu-b07", rendezvous_port(4242))
    # Outside a step, sbatch's older name SLURM_NODELIST is used.
    assert job_nodes({"SLURM_NODELIST": "x[1-2]"}) == ["x1", "x2"]


def test_torchrun_command_for_one_task_per_node():
    env = _step_env(3, nodes="node[001-032]", tasks_per_node=1, job_id="99")
    cmd = torchrun_command(8, ["python3", "-m", "nemotron_train", "train", "cfg.yaml"], env=env, python="/py")
    assert cmd == [
        "/py", "-m", "torch.distributed.run",
        "--nnodes=32", "--nproc-per-node=8", "--node-rank=3",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=node001:{rendezvous_port(99)}", "--rdzv-id=99",
        "-m", "nemotron_train", "train", "cfg.yaml",
    ]
    assert torchrun_command(2, ["train.py", "x"], env=env, python="/py")[-2:] == ["train.py", "x"]
    other = torchrun_command(2, ["bash", "run.sh"], env=env, python="/py")
    assert other[-3:] == ["--no-python", "bash", "run.sh"]
    with pytest.raises(ValueError, match="at least 1"):
        torchrun_command(0, ["x.py"], env=env)


def _run_module(args, env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-m", "launch.slurm_env", *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_execs_the_command_with_the_mapped_env():
    probe = "import json, os; print(json.dumps({k: os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}))"
    result = _run_module(["--", sys.executable, "-c", probe], _step_env(12))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {"RANK": "12", "WORLD_SIZE": "16", "LOCAL_RANK": "4", "MASTER_ADDR": "node001", "MASTER_PORT": str(rendezvous_port(4242))}


def test_cli_exec_keeps_the_process_and_exit_code():
    result = _run_module(["--", sys.executable, "-c", "import sys; sys.exit(75)"], _step_env(0))
    assert result.returncode == 75


def test_cli_per_node_print_and_expand():
    env = _step_env(1, nodes="n[1-2]", tasks_per_node=1, job_id="7")
    result = _run_module(["--mode", "per-node", "--nproc-per-node", "4", "--print", "--", "-m", "pkg", "a"], env)
    assert result.returncode == 0, result.stderr
    assert "--nnodes=2 --nproc-per-node=4 --node-rank=1 --rdzv-backend=c10d" in result.stdout
    assert f"--rdzv-endpoint=n1:{rendezvous_port(7)} --rdzv-id=7 -m pkg a" in result.stdout
    expanded = _run_module(["--expand", "n[01-03],m"], {})
    assert expanded.stdout.split() == ["n01", "n02", "n03", "m"]


def test_cli_errors_are_reported_not_raised():
    result = _run_module(["--", "true"], {"SLURM_JOB_NODELIST": "n1"})
    assert result.returncode == 2 and "SLURM_PROCID is not set" in result.stderr
    result = _run_module(["--mode", "per-node", "--", "-m", "x"], _step_env(0))
    assert result.returncode == 2 and "--nproc-per-node" in result.stderr
    result = _run_module([], _step_env(0))
    assert result.returncode == 2 and "no command" in result.stderr
