"""Activation memory per micro-batch, measured, next to `plan`'s estimate.

For each shape (the smoke model; a slice of the 8B: a few layers at its real widths and a
shorter sequence) and each recompute mode, one forward of one micro-batch runs on CPU under
autograd's saved-tensor hooks. Every tensor saved for backward is recorded with the layer
(type) that was running; at the end of the forward the bytes still held by those storages
are summed, each storage once, parameters excluded. That is exact: storages that
selective recompute frees after use (resized to 0) count as 0, and full recompute leaves
only the checkpointed chunk inputs. With `--cuda` the same model runs on the GPU and
`torch.cuda.max_memory_allocated` over the forward is reported as well.

    python bench/memory.py [--shapes smoke,8b-slice] [--no-write] [--cuda]

Prints one table per shape and replaces the `## Activation memory` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.doc_section import replace_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Activation memory"

SMOKE = [
    "model.pattern=M*-M-", "model.num_layers=5", "model.hidden_size=64", "model.ffn_hidden_size=256",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16", "model.mamba_num_heads=8",
    "model.mamba_head_dim=16", "model.mamba_state_dim=16", "model.mamba_num_groups=2", "model.chunk_size=32",
    "model.vocab_size=512", "train.seq_length=256",
]
# Nemotron-H-8B's widths (configs/models/nemotron_h_8b.yaml), six layers, 1K tokens, bf16.
SLICE_8B = [
    "model.pattern=M-M*-M", "model.num_layers=6", "train.seq_length=1024", "model.vocab_size=4096",
]
SHAPES = {
    "smoke": (None, SMOKE + ["precision.params_dtype=fp32"]),
    # Two ranks (run under torchrun by this script): per-rank bytes with TP2 + sequence parallel.
    "smoke-tp2-sp": (None, SMOKE + ["precision.params_dtype=fp32", "parallel.tp=2", "parallel.sp=true"]),
    "8b-slice": ("configs/models/nemotron_h_8b.yaml", SLICE_8B + ["precision.params_dtype=bf16"]),
}
# First in the override list, so a shape can change the layout.
COMMON = ["model.spec=local", "data.source=mock", "train.micro_batch_size=1", "train.global_batch_size=1",
          "parallel.tp=1", "parallel.pp=1", "optimizer.use_distributed_optimizer=false"]
MODES = {
    "none": [],
    "selective core_attn": ["recompute.granularity=selective", "recompute.modules=[core_attn]"],
    "selective mlp": ["recompute.granularity=selective", "recompute.modules=[mlp]"],
    "selective mamba": ["recompute.granularity=selective", "recompute.modules=[mamba]"],
    "selective norm": ["recompute.granularity=selective", "recompute.modules=[norm]"],
    "selective all": ["recompute.granularity=selective", "recompute.modules=[core_attn,mlp,mamba,norm]"],
    "full uniform/1": ["recompute.granularity=full", "recompute.method=uniform", "recompute.num_layers=1"],
    "full block/2": ["recompute.granularity=full", "recompute.method=block", "recompute.num_layers=2"],
}
KIND = {"M": "Mamba-2", "*": "attention", "-": "MLP"}


class SavedTensors:
    """Saved-for-backward storages of one forward, attributed to the module running."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.storages: Dict[int, Tuple[str, torch.UntypedStorage]] = {}
        self.where = "embedding"

    def pack(self, t: torch.Tensor):
        # Keyed by the storage object, not its address: a storage freed for recompute keeps
        # its object alive here, while the allocator may hand its address to a new tensor.
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.params and key not in self.storages and storage.nbytes() > 0:
            self.storages[key] = (self.where, storage)
        return t

    def bytes_by_place(self) -> Dict[str, int]:
        """Bytes still held at this moment (storages freed for recompute count 0)."""
        out: Dict[str, int] = defaultdict(int)
        for where, storage in self.storages.values():
            out[where] += storage.nbytes()
        return dict(out)


@contextmanager
def recording(model, saved: SavedTensors):
    """Saved-tensor hooks plus pre-hooks that name the running layer `<index>:<kind>`."""
    handles = []
    decoder = model.decoder
    for layer, kind in zip(decoder.layers, decoder.layer_types):
        name = f"{layer.layer_number - 1}:{kind}"
        handles.append(layer.register_forward_pre_hook(lambda *_, n=name: setattr(saved, "where", n)))
    head = [m for m in (getattr(decoder, "final_norm", None), getattr(model, "output_layer", None)) if m is not None]
    for m in head:
        handles.append(m.register_forward_pre_hook(lambda *_: setattr(saved, "where", "head")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            yield
    finally:
        for h in handles:
            h.remove()


def build(config_path: Optional[str], overrides: List[str], device: str):
    from nemotron_train.config import load_config
    from nemotron_train.distributed.groups import init_process_groups
    from nemotron_train.models.build import build_model
    from nemotron_train.platform import setup_platform
    from nemotron_train.resolve import resolve_run

    cfg = load_config(str(REPO / config_path) if config_path else None, overrides)
    platform_ = setup_platform(force_cpu=device == "cpu")
    run = resolve_run(cfg, int(os.environ.get("WORLD_SIZE", "1")), platform_)
    pgs = init_process_groups(cfg, platform_)
    torch.manual_seed(cfg.train.seed)
    return cfg, run, build_model(run, pgs)


def measure(config_path: Optional[str], overrides: List[str], device: str = "cpu") -> Dict[str, object]:
    """One forward of one micro-batch: saved bytes per place, and (CUDA) the allocator's peak."""
    cfg, _, model = build(config_path, overrides, device)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    s = cfg.train.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (1, s), generator=g).to(dev)
    labels = torch.randint(0, cfg.model.vocab_size, (1, s), generator=g).to(dev)
    pos = torch.arange(s, device=dev)[None]
    saved = SavedTensors(model)
    cuda_bytes = None
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with recording(model, saved):
        # With labels, as in training: the head's cross entropy saves what it needs too.
        loss = model(tokens, pos, None, labels=labels)
    places = saved.bytes_by_place()
    if device == "cuda":
        torch.cuda.synchronize()
        # Held after the forward (the per-token loss is an output, not a saved activation), and
        # the allocator's peak during it (transient buffers included).
        held = torch.cuda.memory_allocated() - before - loss.numel() * loss.element_size()
        cuda_bytes = {"held": held, "peak": torch.cuda.max_memory_allocated() - before}
    del loss
    return {"cfg": cfg, "places": places, "cuda_bytes": cuda_bytes, "layer_types": model.decoder.layer_types}


def per_kind(places: Dict[str, int]) -> Dict[str, int]:
    out: Dict[str, int] = defaultdict(int)
    for place, nbytes in places.items():
        kind = KIND.get(place.split(":")[-1], place)
        out[kind] += nbytes
    return dict(out)


def estimate(cfg, layer_types: str) -> Dict[str, float]:
    """plan's numbers for the same run: bytes per place for one micro-batch (one stage)."""
    from nemotron_train.models.activations import stage_bytes_per_token

    tokens = cfg.train.micro_batch_size * cfg.train.seq_length
    per_token = stage_bytes_per_token(cfg, "local", layer_types, first=True, last=True)
    est = {KIND.get(k, k): v * tokens for k, v in per_token.items()}
    return est


def compare(measured: Dict[str, int], est: Dict[str, float], full: bool) -> List[Tuple[str, int, float]]:
    """Rows (place, measured, estimate). Under full recompute the chunk inputs are saved
    while the layers run, so only the total is compared there."""
    rows = []
    if not full:
        for kind in ("Mamba-2", "attention", "MLP", "embedding", "head"):
            if measured.get(kind, 0) or est.get(kind, 0):
                rows.append((kind, measured.get(kind, 0), est.get(kind, 0.0)))
    rows.append(("total", sum(measured.values()), sum(est.values())))
    return rows


# Captured at import: a world of one sets WORLD_SIZE itself once its process group starts.
UNDER_TORCHRUN = "WORLD_SIZE" in os.environ


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _ranks(name: str) -> int:
    from nemotron_train.config import load_config

    config_path, overrides = SHAPES[name]
    cfg = load_config(str(REPO / config_path) if config_path else None, COMMON + overrides)
    return cfg.parallel.tp * cfg.parallel.pp


def run_under_torchrun(name: str, modes: List[str], cuda: bool) -> List[dict]:
    """A multi-rank shape: this script again under torchrun; rank 0 hands back its rows."""
    import subprocess
    import tempfile

    from nemotron_train.platform import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={_ranks(name)}",
               f"--master-port={free_port()}", __file__, "--shapes", name, "--modes", ",".join(modes),
               "--no-write", "--json", str(out)] + (["--cuda"] if cuda else [])
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return json.loads(out.read_text())


def run_shape(name: str, modes: List[str], cuda: bool) -> List[dict]:
    config_path, overrides = SHAPES[name]
    results = []
    for mode in modes:
        res = measure(config_path, COMMON + overrides + MODES[mode], "cpu")
        cfg = res["cfg"]
        kinds = per_kind(res["places"])
        est = estimate(cfg, res["layer_types"])
        full = cfg.recompute.granularity == "full"
        row = {"shape": name, "mode": mode, "rows": compare(kinds, est, full), "cuda": None}
        if cuda:
            row["cuda"] = measure(config_path, COMMON + overrides + MODES[mode], "cuda")["cuda_bytes"]
        results.append(row)
        if not _is_rank0():
            continue
        total = row["rows"][-1]
        print(f"{name:9s} {mode:22s} measured {total[1] / 2**20:9.2f} MiB  plan {total[2] / 2**20:9.2f} MiB"
              f"  ({(total[2] / total[1] - 1) * 100:+.1f}%)", flush=True)
    return results


def shape_line(name: str) -> str:
    from nemotron_train.config import load_config

    config_path, overrides = SHAPES[name]
    cfg = load_config(str(REPO / config_path) if config_path else None, COMMON + overrides)
    m, p = cfg.model, cfg.parallel
    return (f"`{name}`: pattern `{m.pattern}`, h {m.hidden_size}, ffn {m.ffn_hidden_size}, attention "
            f"{m.num_attention_heads}x{m.kv_channels} ({m.num_query_groups} KV), Mamba {m.mamba_num_heads}x"
            f"{m.mamba_head_dim} heads, state {m.mamba_state_dim}, {m.mamba_num_groups} groups, chunk {m.chunk_size}, "
            f"vocab {m.vocab_size}, seq {cfg.train.seq_length}, micro-batch 1, {cfg.precision.params_dtype}, TP{p.tp}"
            + (" + sequence parallel (bytes of one rank)" if p.sp else ""))


def render(results: List[dict], shapes: List[str], measured_on: datetime.date) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = [
        SECTION, "",
        "Bytes saved for backward by one micro-batch's forward (local spec, CPU), measured with autograd's "
        "saved-tensor hooks (each storage once, parameters excluded, storages freed for recompute count 0), "
        "next to `plan`'s estimate for the same run (`nemotron_train/models/activations.py`). "
        "Under full recompute only the stage total is compared (the chunk inputs are the only per-layer "
        "tensors left). `plan`'s te-spec (GPU) numbers are not measured here: `--cuda` adds "
        "`torch.cuda.memory_allocated` / `max_memory_allocated` on a GPU. Reproduce: `python bench/memory.py`.", "",
        *[f"- {shape_line(s)}" for s in shapes], "",
        f"Measured {measured_on.isoformat()} on {platform.machine()}, torch {torch.__version__}.", "",
        "| shape | recompute | place | measured MiB | plan MiB | plan vs measured | vs no recompute |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    base = {r["shape"]: r["rows"][-1][1] for r in results if r["mode"] == "none"}
    for r in results:
        for place, meas, est in r["rows"]:
            cut = (f"{(1 - meas / base[r['shape']]) * 100:.1f}% less"
                   if place == "total" and r["shape"] in base and r["mode"] != "none" else "")
            err = f"{(est / meas - 1) * 100:+.1f}%" if meas else "n/a"
            lines.append(f"| {r['shape']} | {r['mode']} | {place} | {mib(meas)} | {mib(est)} | {err} | {cut} |")
    if any(r["cuda"] is not None for r in results):
        lines += ["", "On the GPU (`--cuda`): `torch.cuda.memory_allocated` held after the forward, and "
                  "`max_memory_allocated` during it, above the weights:", ""]
        lines += [f"- {r['shape']} / {r['mode']}: held {mib(r['cuda']['held'])} MiB, peak {mib(r['cuda']['peak'])} MiB"
                  for r in results if r["cuda"] is not None]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--cuda", action="store_true", help="also run on the GPU and report max_memory_allocated")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--json", default=None, help="also write the rows (measured, plan bytes) to this JSON file")
    p.add_argument("--from-json", default=None, help="render the doc section from a --json file, measuring nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1" if UNDER_TORCHRUN else "2")))
    shapes, modes = args.shapes.split(","), args.modes.split(",")
    measured_on = datetime.datetime.now(datetime.timezone.utc).date()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        shapes = list(dict.fromkeys(r["shape"] for r in results))
        measured_on = datetime.datetime.fromtimestamp(Path(args.from_json).stat().st_mtime, datetime.timezone.utc).date()
    else:
        results = []
        for name in shapes:
            if _ranks(name) > 1 and not UNDER_TORCHRUN:
                results += run_under_torchrun(name, modes, args.cuda)
            else:
                results += run_shape(name, modes, args.cuda)
    if not _is_rank0():
        return 0
    text = render(results, shapes, measured_on)
    if not UNDER_TORCHRUN:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"shape": r["shape"], "mode": r["mode"], "rows": r["rows"], "cuda": r["cuda"]} for r in results], indent=1))
    if not args.no_write:
        replace_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
