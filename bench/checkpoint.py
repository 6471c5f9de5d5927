"""Checkpoint save and load throughput next to the disk's raw write speed, at 1 and 2 ranks.

    python bench/checkpoint.py [--hidden 1024 --layers 12] [--layouts 1,dp2,tp2] [--dir DIR] [--no-write]

For each layout (one rank; two data-parallel ranks; two tensor-parallel ranks) the ranks build
the smoke architecture, widened, take one optimizer step so the Adam state exists, then:

- save: `Checkpointer.save` (model + optimizer state, every rank writing its own shard,
  committed with fsync + rename), timed from a barrier to the last rank's return; the first
  save of a process is shown apart (it also starts megatron-core's writer-result queue), the
  GB/s are the median of the next three saves, what every later save of a run costs (no
  older checkpoint is deleted inside them);
- raw: every rank writes as many bytes as it saves with one sequential write + fsync, at the
  same time, once before and once after the timed saves; the faster is the reference (the
  disk's speed for plain files, measured in the same run);
- load: the page cache is dropped (when allowed) and `Checkpointer.load_latest` is timed;
- memory: a second save, during which each rank's peak extra host memory is measured: the
  growth of its own peak RSS (VmHWM, reset before the save) plus the peak private memory
  (USS) of the writer processes it forks. Compared with the bytes the rank wrote (its shard).

Results replace the `## Checkpoints` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.doc_section import update_section  # noqa: E402

LAYOUTS = {
    "1": ("1 rank", 1, ["parallel.tp=1"]),
    "dp2": ("DP2", 2, ["parallel.tp=1"]),
    "tp2": ("TP2", 2, ["parallel.tp=2"]),
}


def dir_bytes(path: Path, prefix: str = "") -> int:
    return sum(f.stat().st_size for f in path.rglob(f"{prefix}*") if f.is_file())


def raw_write_seconds(path: Path, nbytes: int) -> float:
    """Seconds for one sequential write of `nbytes` with fsync (what the disk gives a plain file)."""
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class SaveMemory:
    """Peak extra host memory of this process and the writer processes it forks, during a block."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.children_peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def _sample(self):
        while not self._stop.wait(0.02):
            total = 0
            for child in self.proc.children(recursive=True):
                try:
                    total += child.memory_full_info().uss
                except Exception:  # a writer that just exited
                    pass
            self.children_peak = max(self.children_peak, total)

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5\n")  # reset VmHWM to the current RSS
        self.rss_before = self._status("VmRSS")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.own_growth = max(0, self._status("VmHWM") - self.rss_before)
        self.extra = self.own_growth + self.children_peak


def build(args, out: Path, world: int, overrides):
    from nemotron_train.config import load_config
    from nemotron_train.resolve import resolve_run
    from nemotron_train.training.loop import Trainer

    h, n = args.hidden, args.layers
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"run.output_dir={out}", "parallel.sp=false", f"launch.nproc_per_node={world}", *overrides,
        f"model.hidden_size={h}", f"model.ffn_hidden_size={4 * h}", f"model.num_layers={n}",
        f"model.pattern={('M*-' * n)[:n]}", f"model.mamba_num_heads={2 * h // 64}", "model.mamba_head_dim=64",
        "model.num_attention_heads=8", f"model.kv_channels={h // 8}", "data.source=mock", "data.tokenizer.type=byte",
        "train.seq_length=64", "train.micro_batch_size=1", f"train.global_batch_size={world}", "train.steps=10",
        # keep_last: no older checkpoint is deleted inside a timed save (deleting is not writing)
        "scheduler.warmup_steps=1", "checkpoint.keep_last=10", "checkpoint.save_at_end=false",
    ])
    return Trainer(resolve_run(cfg, world_size=world))


def _timed(fn):
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    result = fn()
    dist.barrier()
    return time.perf_counter() - start, result


def worker(rank: int, world: int, port: int, args, overrides, out: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from nemotron_train.training.step import train_step

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    trainer = build(args, Path(out), world, overrides)
    it = trainer._train_iterator()  # TP rank 0 reads, the others receive its batches
    train_step(trainer.model, trainer.optimizer, trainer.scheduler, it, trainer.pgs, trainer.device, 64, 1, world)
    ckpt, state = trainer.checkpointer, trainer.state

    def save(step: int):
        state.step = step
        return ckpt.save(trainer.model, trainer.optimizer, trainer.scheduler, state)

    # The first save of a process also starts megatron-core's writer-result queue (a process
    # of its own); training pays that once, then every save costs what the second one does.
    first_s, path = _timed(lambda: save(1))
    own = dir_bytes(path, f"__{rank}_")
    total = dir_bytes(path)
    raw = Path(out) / f"raw{rank}.bin"
    raw_before, _ = _timed(lambda: raw_write_seconds(raw, own))
    steady = [_timed(lambda step=step: save(step)) for step in (2, 3, 4)]
    save_s, path = sorted(steady, key=lambda r: r[0])[1]  # the median of three
    raw_after, _ = _timed(lambda: raw_write_seconds(raw, own))
    # This disk's speed drifts with what was written before: the faster of the two raw writes
    # around the saves is the reference (the conservative one for the ratio).
    raw_s = min(raw_before, raw_after)
    if rank == 0:
        dropped = drop_page_cache()
    dist.barrier()
    load_s, _ = _timed(lambda: ckpt.load_latest(trainer.model, trainer.optimizer, trainer.scheduler))
    with SaveMemory() as mem:
        save(5)
    dist.barrier()
    row = {"rank": rank, "own": own, "total": total, "first_s": first_s, "save_s": save_s, "raw_s": raw_s, "load_s": load_s,
           "extra": mem.extra, "own_growth": mem.own_growth, "children": mem.children_peak,
           "params": sum(p.numel() for p in trainer.model.parameters())}
    if rank == 0:
        row["dropped"] = dropped
    results.put(row)
    dist.barrier()
    dist.destroy_process_group()


def run_layout(args, key: str) -> dict:
    import torch.multiprocessing as mp

    from nemotron_train.platform import free_port

    name, world, overrides = LAYOUTS[key]
    out = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")) / key
    shutil.rmtree(out, ignore_errors=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, overrides, str(out), results)) for r in range(world)]
    for p in procs:
        p.start()
    rows = []
    try:
        while len(rows) < world:
            try:
                rows.append(results.get(timeout=5))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{name}: a rank exited with code {dead[0]} (its traceback is above)") from None
    finally:
        for p in procs:
            p.join(timeout=60 if len(rows) == world else 0.1)
            if p.is_alive():
                p.terminate()
    rows.sort(key=lambda r: r["rank"])
    shutil.rmtree(out, ignore_errors=True)
    total = rows[0]["total"]
    first_s, save_s, raw_s, load_s = (max(r[k] for r in rows) for k in ("first_s", "save_s", "raw_s", "load_s"))
    return {
        "name": name, "world": world, "params": rows[0]["params"], "gb": total / 1e9,
        "save_gbs": total / save_s / 1e9, "load_gbs": total / load_s / 1e9,
        "raw_gbs": sum(r["own"] for r in rows) / raw_s / 1e9, "first_s": first_s, "save_s": save_s, "load_s": load_s,
        "dropped": rows[0]["dropped"], "ranks": rows,
    }


def render(args, results) -> str:
    lines = [
        "Model + Adam state (fp32 weights, main params, exp_avg, exp_avg_sq) written by megatron-core",
        "`dist_checkpointing` (torch_dist) with every rank writing its own shard (model-space optimizer",
        "boxes, replicated weights split across data-parallel ranks; `nemotron_train/checkpoint/strategy.py`),",
        "committed with fsync + rename; GB/s: the median of three saves after the first (the first also starts megatron-core's",
        "writer-result queue, once per process). Raw: every rank writes as many bytes as it saved, one sequential",
        "write + fsync, at the same time, before and after the saves (the faster counts). Load: after dropping the page cache"
        + ("" if all(r["dropped"] for r in results) else " (not permitted here: load read from the page cache)") + ".",
        "Memory: each rank's peak extra host memory during a save (its own peak RSS growth plus its",
        "writer processes' private memory) against the bytes that rank wrote.",
        "Reproduce: `python bench/checkpoint.py`.",
        "",
        f"- model: {results[0]['params'] / 1e6:.1f}M parameters per rank at one rank (hidden {args.hidden}, "
        f"{args.layers} layers); checkpoint {results[0]['gb']:.2f} GB",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; {time.strftime('%Y-%m-%d')}",
        "",
        "| layout | first save s | save s | save GB/s | load s | load GB/s | raw write GB/s | save / raw | load / raw | peak extra memory / own shard, per rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        mem = ", ".join(f"{x['extra'] / 1e6:.0f} MB / {x['own'] / 1e6:.0f} MB = {x['extra'] / x['own']:.2f}x" for x in r["ranks"])
        lines.append(
            f"| {r['name']} | {r['first_s']:.2f} | {r['save_s']:.2f} | {r['save_gbs']:.2f} | {r['load_s']:.2f} | {r['load_gbs']:.2f} | "
            f"{r['raw_gbs']:.2f} | {r['save_gbs'] / r['raw_gbs']:.0%} | {r['load_gbs'] / r['raw_gbs']:.0%} | {mem} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--layouts", default="1,dp2,tp2", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = [run_layout(args, key) for key in args.layouts.split(",")]
    body = render(args, results)
    print(body)
    if not args.no_write:
        update_section("## Checkpoints", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
