"""Checkpoint save and load throughput next to the disk's raw write speed.

    python bench/checkpoint.py [--hidden 1024 --layers 12] [--dir DIR] [--no-write]

Builds a single-rank model (the smoke architecture, widened), takes one optimizer step so
the Adam state exists, then times `Checkpointer.save` (model + fully reshardable optimizer
state, committed with fsync + rename) and `Checkpointer.load_latest`. The raw figure writes
the same number of bytes with one large `write` + fsync. Results replace the
`## Checkpoints` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.doc_section import update_section  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def raw_write_speed(directory: Path, nbytes: int) -> float:
    """GB/s of one sequential write of `nbytes` with fsync (what the disk gives a plain file)."""
    block = os.urandom(1 << 20)
    path = directory / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return nbytes / elapsed / 1e9


def build(args, out: Path):
    from nemotron_train.config import load_config
    from nemotron_train.resolve import resolve_run
    from nemotron_train.training.loop import Trainer

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"run.output_dir={out}", "parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1",
        f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={4 * args.hidden}",
        f"model.num_layers={args.layers}", f"model.pattern={('M*-' * args.layers)[: args.layers]}",
        f"model.mamba_num_heads={2 * args.hidden // 64}", "model.mamba_head_dim=64",
        "model.num_attention_heads=8", "model.kv_channels=" + str(args.hidden // 8),
        "data.source=mock", "data.tokenizer.type=byte", "train.seq_length=64",
        "train.micro_batch_size=1", "train.global_batch_size=1", "checkpoint.keep_last=1",
    ])
    return Trainer(resolve_run(cfg, world_size=1))


def run(args) -> dict:
    from nemotron_train.data import make_train_iterator
    from nemotron_train.training.step import train_step

    out = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    shutil.rmtree(out, ignore_errors=True)
    trainer = build(args, out)
    it = make_train_iterator(trainer.train_ds, trainer.cfg, 0, 1, 0)
    train_step(trainer.model, trainer.optimizer, trainer.scheduler, it, trainer.pgs, trainer.device, 64, 1, 1)
    trainer.state.step = 1
    params = sum(p.numel() for p in trainer.model.parameters())
    start = time.perf_counter()
    path = trainer.checkpointer.save(trainer.model, trainer.optimizer, trainer.scheduler, trainer.state)
    save_s = time.perf_counter() - start
    nbytes = dir_bytes(path)
    start = time.perf_counter()
    trainer.checkpointer.load_latest(trainer.model, trainer.optimizer, trainer.scheduler)
    load_s = time.perf_counter() - start
    raw = raw_write_speed(out, nbytes)
    shutil.rmtree(out, ignore_errors=True)
    return {"params": params, "bytes": nbytes, "save_s": save_s, "load_s": load_s, "raw_gbs": raw}


def render(args, r) -> str:
    gb = r["bytes"] / 1e9
    return "\n".join([
        "Single rank, CPU: model + Adam state (fp32 weights, exp_avg, exp_avg_sq and master params,",
        "fully reshardable layout), written by megatron-core `dist_checkpointing` (torch_dist) and",
        "committed with fsync + rename; load includes resharding bookkeeping. Raw: one sequential",
        "write of the same size with fsync. Reproduce: `python bench/checkpoint.py`.",
        "",
        f"- model: {r['params'] / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers); checkpoint {gb:.2f} GB",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}",
        "",
        "| | seconds | GB/s | vs raw write |",
        "|---|---:|---:|---:|",
        f"| save | {r['save_s']:.2f} | {gb / r['save_s']:.2f} | {gb / r['save_s'] / r['raw_gbs']:.0%} |",
        f"| load | {r['load_s']:.2f} | {gb / r['load_s']:.2f} | {gb / r['load_s'] / r['raw_gbs']:.0%} |",
        f"| raw sequential write + fsync | {gb / r['raw_gbs']:.2f} | {r['raw_gbs']:.2f} | 100% |",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    r = run(args)
    body = render(args, r)
    print(body)
    if not args.no_write:
        update_section("## Checkpoints", body)
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
