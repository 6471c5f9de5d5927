"""End-to-end training: torchrun layouts agree with one rank, determinism, launch errors."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# The runs of one test session share the tokenised bundled corpus and sample indices (each
# run would otherwise tokenise the corpus into its own run directory first).
SHARED_DATA_CACHE = tempfile.mkdtemp(prefix="nemotron-train-test-data-")
atexit.register(shutil.rmtree, SHARED_DATA_CACHE, ignore_errors=True)
# A short run of the smoke model; one global batch of 8 sequences in every layout.
SHORT = [
    f"data.cache_dir={SHARED_DATA_CACHE}",
    "train.steps=4",
    "train.seq_length=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.eval_iters=1",
    "checkpoint.interval=0",
    "checkpoint.save_at_end=false",
    "logging.progress_bar=false",
]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, *overrides, torchrun_nproc=None, expect_ok=True, timeout=300):
    args = ["train", SMOKE, f"run.output_dir={out}", f"launch.master_port={_free_port()}", *SHORT, *overrides]
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun_nproc}",
               f"--master-port={_free_port()}", "-m", "nemotron_train", *args]
    else:
        cmd = [sys.executable, "-m", "nemotron_train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def losses(out: Path):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "one_rank"
    train(out, "parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1")
    return losses(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,overrides,torchrun",
    [
        ("tp2", ["parallel.tp=2", "parallel.sp=false"], True),
        ("tp2_sp", ["parallel.tp=2", "parallel.sp=true"], False),
        ("pp2", ["parallel.tp=1", "parallel.sp=false", "parallel.pp=2"], True),
        ("dp2", ["parallel.tp=1", "parallel.sp=false"], False),
    ],
)
def test_layouts_follow_the_single_rank_loss_curve(tmp_path, single_rank, name, overrides, torchrun):
    out = tmp_path / name
    if torchrun:
        train(out, *overrides, torchrun_nproc=2)
    else:
        train(out, *overrides, "launch.nproc_per_node=2")
    got = losses(out)
    assert len(got) == len(single_rank) == 4
    for step, (a, b) in enumerate(zip(got, single_rank), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"{name} step {step}: {a} vs {b}"


@pytest.mark.slow
def test_deterministic_runs_are_bitwise_identical(tmp_path, single_rank):
    out = tmp_path / "again"
    train(out, "parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1")
    assert losses(out) == single_rank


@pytest.mark.slow
def test_metrics_and_outputs(tmp_path, single_rank):
    out = tmp_path / "one_rank_outputs"
    train(out, "parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1", "train.eval_interval=2",
          "logging.tensorboard=true", "logging.wandb.enabled=true", "logging.wandb.mode=offline")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s", "tflops_per_gpu", "mfu"):
        assert all(key in r for r in train_lines), key
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in train_lines)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert (out / "config.yaml").exists() and (out / "summary.json").exists() and (out / "COMPLETED").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_batch_size_ramp(tmp_path):
    out = tmp_path / "ramp"
    # Start at 4 sequences, step up by 4 once 8 samples are consumed: 4, 4, 8, 8.
    train(out, "parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1", "scheduler.rampup_batch_size=[4,4,8]")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["consumed_samples"] == 4 + 4 + 8 + 8
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens_per_sec"] * r["step_time_s"] for r in records if "loss" in r]
    assert [round(t) for t in tokens] == [4 * 64, 4 * 64, 8 * 64, 8 * 64]


def test_more_ranks_than_the_layout_can_use(tmp_path):
    proc = train(tmp_path / "x", "launch.nproc_per_node=4", "parallel.tp=2", "train.global_batch_size=2",
                 "train.micro_batch_size=2", expect_ok=False, timeout=120)
    assert proc.returncode != 0
    assert "global_batch_size" in proc.stderr and "Traceback" not in proc.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = train(tmp_path / "x", f"launch.master_port={port}", expect_ok=False, timeout=120)
    assert proc.returncode != 0
    assert "launch.master_port" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "corpus_text_document"
    proc = train(tmp_path / "x", "data.source=blend", f"data.blend=[{{path: {missing}, weight: 1.0}}]",
                 "data.tokenizer.type=byte", "model.vocab_size=512", expect_ok=False, timeout=120)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- user errors under torchrun


def assert_one_user_error_under_torchrun(proc, needle: str) -> None:
    """Our message once (rank 0's), naming `needle`; the ranks exit 2. torchrun itself exits 1
    and prints its own failure summary, but no frame of ours appears."""
    ours = [line for line in proc.stderr.splitlines() if "nemotron-train train: error:" in line]
    assert len(ours) == 1 and needle in proc.stderr.split("nemotron-train train: error:")[1], proc.stderr[-4000:]
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr, proc.stderr[-4000:]
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File ") and "nemotron_train" in line]


def _tracker(out: Path) -> Path:
    return out / "checkpoints" / "latest_checkpointed_iteration.txt"


def _corrupt_tracker(out: Path) -> list:
    _tracker(out).parent.mkdir(parents=True)
    _tracker(out).write_text("not-a-number\n")
    return []


def _missing_dataset(out: Path) -> list:
    missing = out.parent / "nope" / "corpus_text_document"
    return ["data.source=blend", f"data.blend=[{{path: {missing}, weight: 1.0}}]", "data.tokenizer.type=byte",
            "model.vocab_size=512"]


@pytest.mark.slow
@pytest.mark.parametrize("case, prepare, needle", [
    ("fp8_te_on_cpu", lambda out: ["precision.fp8.enabled=true", "precision.fp8.backend=te"], "precision.fp8.backend"),
    ("missing_dataset", _missing_dataset, "nope/corpus_text_document"),
    ("corrupt_tracker", _corrupt_tracker, "latest_checkpointed_iteration.txt"),
])
def test_user_errors_under_torchrun_are_one_message_and_exit_code_2(tmp_path, case, prepare, needle):
    # (A checkpoint of another model under torchrun: test_checkpoint_e2e.py, which has one.)
    out = tmp_path / case
    extra = prepare(out)
    proc = train(out, "parallel.tp=2", "parallel.sp=true", *extra, torchrun_nproc=2, expect_ok=False, timeout=180)
    assert_one_user_error_under_torchrun(proc, needle)
    if case == "fp8_te_on_cpu":  # refused before any model: the trainer never wrote its config
        assert not (out / "config.yaml").exists()
