"""bench/gpu/validate.sh --dry-run: every step of the GPU validation kit runs on CPU (tiny,
two steps each) and the JSON and markdown summaries come out."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["install", "device", "smoke", "bf16", "kernels", "slice_bf16", "slice_fp8"]


@pytest.mark.slow
def test_validate_dry_run_wires_every_step(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "validate.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "validate.json").read_text())
    assert report["dry_run"] and report["ok"]
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    assert all(s["status"] == "ok" for s in steps.values()), steps
    # The smoke run reproduces the first losses of the stored CPU reference exactly enough.
    assert steps["smoke"]["figures"]["max_rel_diff"] <= 1e-4
    for name in ("slice_bf16", "slice_fp8"):
        assert steps[name]["figures"]["steps"] == 2 and steps[name]["figures"]["tokens_per_sec"] > 0
    md = (tmp_path / "validate.md").read_text()
    assert all(f"| {name} | ok |" in md for name in STEPS)
