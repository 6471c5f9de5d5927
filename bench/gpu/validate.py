"""One-shot GPU validation: every GPU claim of the project checked in one run (< 8 min on one
H100/H200), written to one JSON and one markdown summary.

    python -m bench.gpu.validate [--out DIR] [--dry-run] [--wheels DIR]

Steps (each reports ok / skipped / failed with its figures):
  install     what is missing of megatron-core and the GPU kernels, installed from --wheels
  smoke       the smoke model, local spec on CUDA/NCCL, 30 steps; first losses vs the CPU run's
  bf16        the same with bf16 parameters: finite and learning
  kernels     our torch twins vs mamba-ssm / causal-conv1d (tests/test_ssd_gpu.py), if they build
  slice_bf16  MFU and tokens/s of an 8B-shaped slice (local spec, BF16)
  slice_fp8   the same slice with precision.fp8.backend=scaled_mm: step time vs BF16

`--dry-run` runs every step on CPU with tiny sizes and 2 steps (emulated FP8 stands in for
scaled_mm, which needs sm_89+, and the scaled_mm config is resolved for an H100 instead), so a
CI test proves the kit is wired end to end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
RECIPE_8B = ROOT / "configs" / "nemotron_h_8b_pretrain.yaml"
REFERENCE = Path(__file__).resolve().parent / "reference_cpu_losses.json"

# One GPU, the local spec, no TP: the smoke model as the CPU reference run trains it.
ONE_RANK = ["model.spec=local", "parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1",
            "logging.progress_bar=false", "train.log_interval=1", "train.eval_interval=0",
            "checkpoint.interval=0", "checkpoint.save_at_end=false"]
# An 8B-shaped slice: the 8B recipe's widths (hidden 4096, FFN 21504, 128 Mamba heads of 64,
# state 128, 32/8 attention heads) with 6 of its 52 layers, sequence 8192, on one GPU.
SLICE = ["model.pattern=M-M*-M-", "model.num_layers=7", "parallel.tp=1", "parallel.pp=1", "parallel.sp=false",
         "launch.nproc_per_node=1", "launch.nnodes=1", "model.spec=local", "data.source=mock",
         "precision.params_dtype=bf16", "precision.fp8.enabled=false", "train.micro_batch_size=1",
         "train.global_batch_size=4", "train.log_interval=1", "train.eval_interval=0", "train.eval_iters=0",
         "data.tokenizer.type=byte", "data.tokenizer.path=null",
         "checkpoint.interval=0", "checkpoint.save_at_end=false", "checkpoint.async_save=false",
         "logging.wandb.enabled=false", "logging.tensorboard=false", "logging.progress_bar=false",
         "scheduler.warmup_steps=1", "scheduler.type=constant", "scheduler.wsd_decay_steps=null",
         # The recipe's TE/apex fusions do not apply to the local spec.
         "performance.gradient_accumulation_fusion=false", "performance.persist_layer_norm=false",
         "performance.masked_softmax_fusion=false", "performance.tp_comm_overlap=false"]
# Dry run: the slice shrunk to CPU size (same layer pattern and code path).
TINY_SLICE = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.kv_channels=16", "model.mamba_num_heads=16", "model.mamba_head_dim=8",
              "model.mamba_state_dim=16", "model.mamba_num_groups=2", "model.chunk_size=16", "model.vocab_size=512",
              "train.seq_length=64"]
SCALED_MM = ["precision.fp8.enabled=true", "precision.fp8.recipe=tensorwise", "precision.fp8.first_last_layers_bf16=0",
             "precision.fp8.backend=scaled_mm"]


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | skipped | failed
    seconds: float = 0.0
    figures: Dict[str, Any] = field(default_factory=dict)
    note: str = ""


class Kit:
    def __init__(self, out: Path, dry_run: bool, wheels: Optional[Path], budget_s: float) -> None:
        self.out, self.dry, self.wheels = out, dry_run, wheels
        self.deadline = time.time() + budget_s
        self.steps: List[Step] = []
        self.env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.env["NEMOTRON_TRAIN_DEVICE"] = "cpu" if dry_run else "cuda"
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(var, None)

    # ---------------------------------------------------------------- helpers

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, cmd: List[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=max(5.0, min(timeout, self.left())))

    def train(self, name: str, config: Path, overrides: List[str], timeout: float) -> List[Dict[str, Any]]:
        """Train in a subprocess; the metrics.jsonl lines of the run."""
        run_dir = self.out / "runs" / name
        # One tokenised corpus for every run of the kit.
        cache = f"data.cache_dir={self.out / 'data_cache'}"
        cmd = [sys.executable, "-m", "nemotron_train", "train", str(config), *overrides, cache, f"run.output_dir={run_dir}"]
        proc = self.run(cmd, timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    def step(self, name: str, fn) -> Step:
        st = Step(name)
        start = time.time()
        try:
            result = fn(st)
            st.status = result or "ok"
        except Exception as exc:  # noqa: BLE001 - every step reports, the kit goes on
            st.status, st.note = "failed", f"{type(exc).__name__}: {exc}"[-3000:]
        st.seconds = round(time.time() - start, 1)
        self.steps.append(st)
        print(f"[{st.status:>7}] {name} ({st.seconds} s) {json.dumps(st.figures)} {st.note[:300]}", flush=True)
        return st

    # ---------------------------------------------------------------- steps

    def install(self, st: Step) -> str:
        # The project's runtime dependencies (pyproject.toml) and the GPU kernels; wandb is
        # imported only when logging.wandb is on, pytest only by the kernels step.
        wanted = {"megatron.core": "megatron-core", "numpy": "numpy", "yaml": "pyyaml", "einops": "einops",
                  "psutil": "psutil", "tqdm": "tqdm", "pytest": "pytest", "tokenizers": "tokenizers",
                  "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}
        missing = [pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None]
        st.figures["missing"] = missing
        if self.dry:
            st.note = f"dry run: would install {missing or 'nothing'} from --wheels"
            return "ok"
        if missing and self.wheels and self.wheels.is_dir():
            # Everything comes from the wheels brought along: the GPU host has no network.
            proc = self.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(self.wheels),
                             *missing], timeout=180)
            st.figures["pip_rc"] = proc.returncode
            st.note = proc.stdout[-500:] + proc.stderr[-500:]
        still = [pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None]
        st.figures["still_missing"] = still
        required = [pkg for pkg in still if pkg not in ("mamba-ssm", "causal-conv1d")]
        if required:
            raise RuntimeError(f"{required} not importable; pass --wheels with wheels for this Python (docs/gpu-validation.md)")
        return "ok"

    def device(self, st: Step) -> str:
        import torch

        if self.dry:
            st.figures.update(device="cpu (dry run)", torch=torch.__version__)
            return "ok"
        from nemotron_train.platform.devices import match_device

        name = torch.cuda.get_device_name()
        dev = match_device(name)
        st.figures.update(device=name, table_entry=dev.name if dev else None, torch=torch.__version__,
                          capability=list(torch.cuda.get_device_capability()))
        return "ok"

    def smoke(self, st: Step) -> str:
        steps = 2 if self.dry else 30
        got = self.train("smoke", SMOKE, [*ONE_RANK, f"train.steps={steps}"], timeout=240)
        losses = [x["loss"] for x in got]
        ref = json.loads(REFERENCE.read_text())["losses"]
        n = 2 if self.dry else 5
        # Same model and data; CPU fp32 vs CUDA (different kernels, TF32 off by default in torch).
        tol = 1e-4 if self.dry else 2e-2
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses[:n], ref[:n]))
        st.figures.update(steps=len(losses), first_losses=losses[:n], cpu_reference=ref[:n],
                          max_rel_diff=worst, final_loss=losses[-1])
        if worst > tol:
            raise AssertionError(f"first {n} losses differ from the CPU run by up to {worst:.2e} (> {tol})")
        return "ok"

    def bf16(self, st: Step) -> str:
        steps = 2 if self.dry else 30
        got = self.train("bf16", SMOKE, [*ONE_RANK, f"train.steps={steps}", "precision.params_dtype=bf16"], timeout=240)
        losses = [x["loss"] for x in got]
        st.figures.update(first_loss=losses[0], final_loss=losses[-1])
        if not all(abs(x) < 1e4 for x in losses):
            raise AssertionError(f"non-finite bf16 losses: {losses}")
        if not self.dry and not min(losses[-5:]) < losses[0] - 0.3:
            raise AssertionError(f"bf16 run does not learn: {losses[0]} -> {losses[-5:]}")
        return "ok"

    def kernels(self, st: Step) -> str:
        test = ROOT / "tests" / "test_ssd_gpu.py"
        if self.dry:
            proc = self.run([sys.executable, "-m", "pytest", "-q", "--collect-only", str(test)], timeout=60)
            st.note = "dry run: the comparison test collects (it skips without CUDA)"
            return "ok" if proc.returncode in (0, 5) else "failed"
        if importlib.util.find_spec("mamba_ssm") is None:
            st.note = "mamba-ssm did not build/install in the time box: kernels not compared"
            return "skipped"
        proc = self.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)], timeout=240)
        st.figures["pytest"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0:
            raise AssertionError(proc.stdout[-2000:])
        return "ok"

    def _slice(self, name: str, extra: List[str], steps: int) -> Dict[str, float]:
        size = TINY_SLICE if self.dry else ["train.seq_length=8192"]
        got = self.train(name, RECIPE_8B, [*SLICE, *size, *extra, f"train.steps={steps}"], timeout=300)
        timed = got[2:] or got  # steps 1-2 warm up (allocator, autotuning)
        return {
            "steps": len(got),
            "step_time_s": statistics.median(x["step_time_s"] for x in timed),
            "tokens_per_sec": statistics.median(x["tokens_per_sec"] for x in timed),
            "tflops_per_gpu": statistics.median(x["tflops_per_gpu"] for x in timed),
            "mfu": statistics.median(x["mfu"] for x in timed),
            "final_loss": got[-1]["loss"],
        }

    def slice_bf16(self, st: Step) -> str:
        st.figures.update(self._slice("slice_bf16", [], 2 if self.dry else 10))
        return "ok"

    def slice_fp8(self, st: Step) -> str:
        bf16 = next((s for s in self.steps if s.name == "slice_bf16" and s.status == "ok"), None)
        if self.dry:
            # scaled_mm needs sm_89+: resolve its config for an H100, train its CPU twin.
            proc = self.run([sys.executable, "-m", "nemotron_train", "plan", str(RECIPE_8B), *SLICE, *SCALED_MM,
                             "--device", "h100", "--engine", "--json"], timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            assert json.loads(proc.stdout)["fp8_backend"] == "scaled_mm"
            twin = [x.replace("scaled_mm", "emulated") for x in SCALED_MM]
            st.figures.update(self._slice("slice_fp8", twin, 2))
            st.note = "dry run: scaled_mm resolved for h100; its CPU twin (emulated) trained"
            return "ok"
        st.figures.update(self._slice("slice_fp8", SCALED_MM, 10))
        if bf16:
            st.figures["speedup_vs_bf16"] = bf16.figures["step_time_s"] / st.figures["step_time_s"]
        return "ok"

    # ---------------------------------------------------------------- report

    def write(self) -> Dict[str, Any]:
        report = {"dry_run": self.dry, "steps": [asdict(s) for s in self.steps],
                  "ok": all(s.status in ("ok", "skipped") for s in self.steps)}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "validate.json").write_text(json.dumps(report, indent=2))
        lines = [f"# GPU validation {'(dry run on CPU)' if self.dry else ''}", "",
                 "| step | status | seconds | figures | note |", "| --- | --- | --- | --- | --- |"]
        for s in self.steps:
            figs = ", ".join(f"{k}={_fmt(v)}" for k, v in s.figures.items())
            lines.append(f"| {s.name} | {s.status} | {s.seconds} | {figs} | {s.note[:200].replace('|', '/')} |")
        (self.out / "validate.md").write_text("\n".join(lines) + "\n")
        return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-validation")
    ap.add_argument("--dry-run", action="store_true", help="every step on CPU, tiny and short (CI)")
    ap.add_argument("--wheels", type=Path, default=None, help="directory of wheels to install missing packages from")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new work after this long")
    ap.add_argument("--write-reference", action="store_true",
                    help=f"train the smoke model 30 steps on CPU and write {REFERENCE.name} (the losses the GPU run is held to)")
    args = ap.parse_args(argv)
    kit = Kit(args.out, args.write_reference or args.dry_run, args.wheels, args.budget_s)
    if args.write_reference:
        losses = [x["loss"] for x in kit.train("reference", SMOKE, [*ONE_RANK, "train.steps=30"], timeout=1800)]
        REFERENCE.write_text(json.dumps({"config": "configs/smoke.yaml", "overrides": ONE_RANK, "device": "cpu",
                                         "losses": losses}, indent=1) + "\n")
        print(f"wrote {REFERENCE}")
        return 0
    for name in ("install", "device", "smoke", "bf16", "kernels", "slice_bf16", "slice_fp8"):
        if kit.left() <= 10:
            kit.steps.append(Step(name, "skipped", note="time budget spent"))
            continue
        kit.step(name, getattr(kit, name))
    report = kit.write()
    print(f"wrote {args.out / 'validate.json'} and {args.out / 'validate.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
