"""`ablate` on the smoke model: both arms train from the same init and data, FP8 is really
applied (losses differ) and stays close to the baseline; `compare` writes report and plot."""

import json
import subprocess
import sys

import pytest

from test_train_e2e import ROOT, SMOKE, _env, _free_port, losses

pytestmark = pytest.mark.slow


def test_bf16_vs_fp8_ablation_on_the_smoke_model(tmp_path):
    root = tmp_path / "ablation"
    cmd = [sys.executable, "-m", "nemotron_train", "ablate", SMOKE, "--arms", "bf16,fp8", "--output-root", str(root),
           "train.steps=20", "train.seq_length=64", "train.eval_interval=0", "checkpoint.interval=0",
           "checkpoint.save_at_end=false", f"launch.master_port={_free_port()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bf16, fp8 = losses(root / "bf16_s0"), losses(root / "fp8_s0")
    assert len(bf16) == len(fp8) > 3
    assert bf16[0] == pytest.approx(fp8[0], rel=1e-2)  # same init and first batch
    assert bf16 != fp8  # FP8 quantisation really changed the computation
    assert abs(fp8[-1] - bf16[-1]) <= 0.10 * bf16[-1]
    cfg = (root / "fp8_s0" / "config.yaml").read_text()
    assert "enabled: true" in cfg
    report = (root / "report.md").read_text()
    assert "bf16_s0" in report and "fp8_s0" in report and "loss_curves.png" in report
    assert (root / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # compare on its own reproduces the report for the given runs
    out = tmp_path / "cmp"
    subprocess.run([sys.executable, "-m", "nemotron_train", "compare", str(root / "bf16_s0"), str(root / "fp8_s0"),
                    "--output", str(out)], check=True, env=_env(), cwd=ROOT, timeout=120)
    assert (out / "report.md").exists() and (out / "loss_curves.png").exists()
