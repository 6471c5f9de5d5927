"""Training output: console lines, a progress bar with ETA, metrics.jsonl, wandb, TensorBoard.

Only the logging rank writes. Throughput figures use the hybrid FLOP count of `plan`
(Megatron's formula, forward + backward), so TFLOP/s and MFU are comparable with it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from nemotron_train import rundir
from nemotron_train.config.schema import Config
from nemotron_train.errors import ConfigError
from nemotron_train.training.resilience.stragglers import format_report

def gpu_peak_tflops(cuda_name: str, fp8_gemms: bool) -> float:
    """Dense peak of the GPU called `cuda_name` (platform/devices.py): the FP8 peak when the
    GEMMs run in FP8 (TE or scaled_mm; NVIDIA's published FP8 MFU divides by it), else BF16.
    An unknown GPU is taken for an H100 SXM (say so with NEMOTRON_TRAIN_PEAK_TFLOPS)."""
    from nemotron_train.platform.devices import DEFAULT_DEVICE, get_device, match_device

    device = match_device(cuda_name) or get_device(DEFAULT_DEVICE)
    return device.peak_tflops(fp8_gemms)


def device_peak_tflops(device_type: str, fp8_gemms: bool = False) -> float:
    """Peak TFLOP/s of one device; on CPU a measured fp32 matmul rate stands in for it."""
    env = os.environ.get("NEMOTRON_TRAIN_PEAK_TFLOPS")
    if env:
        return float(env)
    if device_type == "cuda":
        return gpu_peak_tflops(torch.cuda.get_device_name(), fp8_gemms)
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start, reps = time.perf_counter(), 8
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def peak_memory_bytes(device_type: str) -> int:
    if device_type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class MetricsLogger:
    def __init__(self, cfg: Config, is_logging_rank: bool, flops_per_token: float, world_size: int, device_type: str,
                 fp8_gemms: bool = False, hardware_flops_per_token: Optional[float] = None):
        self.cfg = cfg
        self.enabled = is_logging_rank
        self.flops_per_token = flops_per_token
        # With activation recompute the GPUs also redo forward work: HFU counts it, MFU does not.
        self.hardware_flops_per_token = hardware_flops_per_token or flops_per_token
        self.world_size = world_size
        self.device_type = device_type
        self.peak_tflops = device_peak_tflops(device_type, fp8_gemms) if is_logging_rank else 1.0
        self.out_dir = Path(cfg.run.output_dir)
        self._jsonl = None
        self._bar = None
        self._wandb = None
        self._tb = None
        self.history: list[Dict[str, Any]] = []

    def start(self, first_step: int) -> None:
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dropped = trim_metrics(rundir.metrics_file(self.out_dir), first_step)
        if dropped:
            print(f"metrics: dropped {dropped} line(s) of {rundir.METRICS_FILE} after step {first_step} "
                  "(a torn last line, or steps this run trains again from its checkpoint)", file=sys.stderr, flush=True)
        self._jsonl = open(rundir.metrics_file(self.out_dir), "a", buffering=1)
        if self.cfg.logging.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.cfg.train.steps, initial=first_step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
        if self.cfg.logging.wandb.enabled:
            self._wandb = _start_wandb(self.cfg)
        if self.cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ConfigError("logging.tensorboard=true needs the `tensorboard` package (pip install tensorboard)") from exc
            self._tb = SummaryWriter(log_dir=str(rundir.tensorboard_dir(self.out_dir)))

    def echo(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def train_step(self, step: int, loss: float, lr: float, grad_norm: Optional[float], step_time: float, tokens: int, log: bool,
                   stragglers: Optional[Dict[str, Any]] = None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}")
        if not log:
            return
        tokens_per_sec = tokens / step_time if step_time > 0 else 0.0
        tflops = self.flops_per_token * tokens_per_sec / self.world_size / 1e12
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "step_time_s": step_time,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak_tflops,
            "hfu": tflops * self.hardware_flops_per_token / self.flops_per_token / self.peak_tflops,
            "peak_memory_bytes": peak_memory_bytes(self.device_type),
            **(stragglers or {}),
        }
        self._write(record)
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        self.echo(
            f"step {step:>6}/{self.cfg.train.steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {gn} | "
            f"{tokens_per_sec:,.0f} tok/s | {step_time * 1000:.0f} ms/step | {tflops:.3f} TFLOP/s/GPU | "
            f"MFU {record['mfu'] * 100:.1f}%"
            + (f" (HFU {record['hfu'] * 100:.1f}%)" if record["hfu"] != record["mfu"] else "")
            + f" | peak mem {record['peak_memory_bytes'] / 2**30:.2f} GiB"
            + (f" | {format_report(stragglers)}" if stragglers else "")
        )

    def event(self, record: Dict[str, Any]) -> None:
        """A metrics.jsonl record other than a step line (e.g. a skipped or reported step)."""
        if self.enabled:
            self._write(record)

    def validation(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "val_loss": val_loss})
        self.echo(f"step {step:>6} | validation loss {val_loss:.4f}")

    def _write(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])

    def close(self, summary: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.summary.update(summary)
            self._wandb.finish()
        rundir.summary_file(self.out_dir).write_text(json.dumps(summary, indent=2) + "\n")
        lines = [f"  {k}: {v}" for k, v in summary.items()]
        print("training summary\n" + "\n".join(lines), flush=True)


def trim_metrics(path: Path, through_step: int) -> int:
    """Keep the records of steps up to `through_step` (where this run starts) and drop the
    rest: a line torn by a kill, and the records of steps after the checkpoint, which the
    resumed run logs again. Readers then see one record per step, this run's. The file is
    replaced atomically. Returns the number of lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= through_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += bool(line.strip())
    if dropped or (path.stat().st_size and not path.read_bytes().endswith(b"\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _start_wandb(cfg: Config):
    import dataclasses

    import wandb

    w = cfg.logging.wandb
    return wandb.init(
        project=w.project,
        entity=w.entity,
        group=w.group,
        name=cfg.run.name,
        mode=w.mode,
        dir=str(Path(cfg.run.output_dir)),
        config=dataclasses.asdict(cfg),
    )
