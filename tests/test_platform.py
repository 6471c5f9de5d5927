"""The CPU platform layer: active only without a GPU, and it makes mcore's CUDA calls work."""

import subprocess
import sys
import textwrap

import pytest
import torch

from nemotron_train.platform import detect_platform


def _run(code: str, env_extra=None) -> str:
    import os

    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_detect_platform_on_cpu():
    p = detect_platform()
    assert (p.device_type, p.backend) == ("cpu", "gloo")
    assert p.device == torch.device("cpu")


def test_forcing_cuda_without_gpu_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so forcing cuda is valid")
    monkeypatch.setenv("NEMOTRON_TRAIN_DEVICE", "cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        detect_platform()
    monkeypatch.setenv("NEMOTRON_TRAIN_DEVICE", "tpu")
    with pytest.raises(ValueError, match="NEMOTRON_TRAIN_DEVICE"):
        detect_platform()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are installed only on CPU")
def test_shims_redirect_cuda_calls_only_after_setup():
    out = _run(
        """
        import torch
        before = torch.cuda.current_device
        try:
            torch.empty(1, device="cuda"); print("cuda-literal-worked-before")
        except Exception:
            print("cuda-literal-failed-before")
        from nemotron_train.platform import setup_platform
        p = setup_platform()
        print(p.device_type, p.backend)
        print(torch.cuda.current_device())
        print(torch.empty(3, device="cuda").device.type)
        print(torch.zeros(2).cuda().device.type)
        print(torch.zeros(2).type(), torch.zeros(2, dtype=torch.bfloat16).type())
        torch.cuda.synchronize(); torch.cuda.nvtx.range_push("x"); torch.cuda.nvtx.range_pop()
        e = torch.cuda.Event(enable_timing=True); e.record(); torch.cuda.current_stream().wait_event(e)
        torch.cuda.manual_seed(7); a = torch.rand(3)
        torch.cuda.manual_seed(7); b = torch.rand(3)
        state = torch.cuda.get_rng_state(); c = torch.rand(3); torch.cuda.set_rng_state(state); d = torch.rand(3)
        print(bool(torch.equal(a, b)), bool(torch.equal(c, d)))
        """
    ).split("\n")
    assert out[0] == "cuda-literal-failed-before"
    assert out[1] == "cpu gloo"
    assert out[2] == "0"
    assert out[3] == "cpu" and out[4] == "cpu"
    assert out[5] == "torch.cuda.FloatTensor torch.cuda.BFloat16Tensor"
    assert out[6] == "True True"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are installed only on CPU")
def test_mcore_rng_tracker_forks_on_cpu():
    out = _run(
        """
        import torch
        from nemotron_train.platform import setup_platform
        setup_platform()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.add("model-parallel-rng", 1234)
        torch.manual_seed(1)
        outside_a = torch.rand(2)
        with tracker.fork():
            inside = torch.rand(2)
        with tracker.fork():
            inside2 = torch.rand(2)
        print(bool(torch.equal(inside, inside2)))
        """
    )
    # Successive forks continue the tracked stream rather than replaying it.
    assert out.strip() == "False"


def test_cpu_fallback_notice_names_the_granted_gpus():
    from nemotron_train.platform import Platform, cpu_fallback_notice

    cpu, cuda = Platform("cpu", "gloo"), Platform("cuda", "nccl")
    # What SLURM's gres/gpu sets on a node of a job with --gpus-per-node=1.
    slurm = {"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "0", "SLURM_GPUS_ON_NODE": "1"}
    notice = cpu_fallback_notice(slurm, cpu)
    assert notice is not None and "\n" not in notice
    assert "CUDA_VISIBLE_DEVICES=0" in notice and "SLURM_GPUS_ON_NODE=1" in notice and "training on CPU" in notice
    assert cpu_fallback_notice(slurm, cuda) is None  # the GPU is used: nothing to say
    assert cpu_fallback_notice(dict(slurm, NEMOTRON_TRAIN_DEVICE="cpu"), cpu) is None  # CPU asked for
    assert cpu_fallback_notice({}, cpu) is None
    assert cpu_fallback_notice({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "0"}, cpu) is None
    assert cpu_fallback_notice({"CUDA_VISIBLE_DEVICES": "-1"}, cpu) is None
    assert cpu_fallback_notice({"SLURM_GPUS_ON_NODE": "2"}, cpu) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of a process granted GPUs")
def test_setup_platform_with_granted_gpus_and_no_cuda_trains_on_cpu_with_one_notice():
    granted = {"CUDA_VISIBLE_DEVICES": "0", "SLURM_GPUS_ON_NODE": "1"}
    out = _run(
        """
        import os
        from nemotron_train.platform import setup_platform
        os.environ["RANK"] = "1"
        print("rank1", setup_platform().device_type)
        os.environ["RANK"] = "0"
        print("rank0", setup_platform().device_type)
        """,
        dict(granted, NEMOTRON_TRAIN_DEVICE=""),
    ).splitlines()
    assert out[0] == "rank1 cpu"  # no notice from other ranks
    assert out[1].startswith("notice: GPUs were granted (CUDA_VISIBLE_DEVICES=0, SLURM_GPUS_ON_NODE=1)"), out
    assert out[2] == "rank0 cpu" and len(out) == 3
