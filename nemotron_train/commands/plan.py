"""`nemotron-train plan CONFIG [overrides] [--json] [--world-size N] [--device D] [--engine]`: the
cost model of a run (layout, parameters, memory per GPU, FLOPs), or with `--engine` the exact
megatron-core config fields it would use, without starting anything.

The config is resolved for the GPU it targets (an H100 with the GPU kernels installed), not
for this machine, so a plan for a cluster can be made on a laptop.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

from nemotron_train.checkpoint.size import LUSTRE_TYPICAL_GBPS, checkpoint_cost
from nemotron_train.config.loader import load_config
from nemotron_train.models.cost import GIB, compute_plan
from nemotron_train.platform.devices import DEFAULT_DEVICE, device_names, get_device
from nemotron_train.platform.devices import largest_device

# A GPU plan assumes CUDA + NCCL with TE / mamba-ssm / causal-conv1d present, this TE version
# and the compute capability of the `--device` (platform/devices.py).
TARGET_TE_VERSION = "2.8"
CPU_DEVICE = "cpu"
CUDA_ALIAS = "cuda"  # --device cuda: the default GPU of the table


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _short(layers: str, width: int = 40) -> str:
    return layers if len(layers) <= width else layers[: width - 3] + "..."


def format_plan(plan: Dict[str, Any]) -> str:
    """Readable multi-line rendering of compute_plan's result."""
    par = plan["parallel"]
    counts = ", ".join(f"{v} {k}" for k, v in plan["layer_counts"].items())
    lines = [
        f"model {plan['model']}: {plan['num_layers']} layers ({counts}), Mamba d_inner {plan['mamba_d_inner']}",
        f"world size {plan['world_size']} = tp {par['tp']} x pp {par['pp']} x cp {par['cp']} x dp {par['dp']}"
        f"  (sequence parallel: {'on' if par['sp'] else 'off'})",
        f"parameters: total {_fmt_count(plan['total_params'])} ({plan['total_params']:,}); "
        f"embedding {_fmt_count(plan['embedding_params'])}, output layer {_fmt_count(plan['output_layer_params'])}, "
        f"layers {_fmt_count(plan['layer_params'])}",
        f"vocabulary: {plan['vocab_size']:,} padded to {plan['padded_vocab_size']:,} rows "
        f"(multiple of model.make_vocab_size_divisible_by x parallel.tp)",
        "",
        f"{'stage':>5}  {'layers':>9}  {'M/*/-':>9}  {'params/rank':>11}  {'act/mb':>10}  {'in flight':>9}  "
        f"{'memory/GPU':>11}  pattern",
    ]
    for st in plan["stages"]:
        c = st["layer_counts"]
        span = f"{st['first_layer']}-{st['first_layer'] + st['num_layers'] - 1}"
        mix = "/".join(str(v) for v in c.values())
        lines.append(
            f"{st['stage']:>5}  {span:>9}  {mix:>9}  {_fmt_count(st['params_per_rank']):>11}  "
            f"{_fmt_bytes(st['activation_bytes_per_microbatch']):>10}  {st['microbatches_in_flight']:>9}  "
            f"{_fmt_bytes(st['memory_total_bytes']):>11}  {_short(st['layers'])}"
        )
    mem = plan["memory_breakdown_bytes"]
    breakdown = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem.items())
    flops = ", ".join(f"{k} {_fmt_count(v)}" for k, v in plan["flops_per_token_breakdown"].items())
    lines += [
        "",
        f"memory per GPU: {_fmt_bytes(plan['memory_per_gpu_bytes'])} (stage {plan['memory_heaviest_stage']}: {breakdown})",
        _activation_line(plan),
        *_fit_lines(plan),
        f"model FLOPs per token (fwd+bwd): {_fmt_count(plan['flops_per_token'])} ({flops}); "
        f"6 x params = {_fmt_count(6 * plan['total_params'])}",
        f"hardware FLOPs per token (HFU, with recompute): {_fmt_count(plan['hardware_flops_per_token'])} "
        f"({plan['hardware_flops_per_token'] / plan['flops_per_token']:.3f} x model FLOPs)",
        f"per step: {plan['tokens_per_step']:,} tokens in {plan['num_microbatches']} micro-batches per DP rank, "
        f"{plan['flops_per_step']:.3e} FLOPs",
        *_checkpoint_lines(plan),
    ]
    return "\n".join(lines)


def resolve_for_device(cfg, world_size: int, device: str):
    """Resolve `cfg` for the accelerator a plan is made for: a GPU of the device table (CUDA +
    NCCL, TE / mamba-ssm present, that GPU's compute capability) or `cpu` (the local spec)."""
    from nemotron_train.platform import Platform
    from nemotron_train.resolve import resolve_run  # imports torch: only when the command runs

    if device == CPU_DEVICE:
        return resolve_run(cfg, world_size, Platform("cpu", "gloo"), capability=None, missing_kernels=[])
    return resolve_run(cfg, world_size, Platform("cuda", "nccl"), capability=get_device(device).capability,
                       missing_kernels=[], te_version=TARGET_TE_VERSION)


def _checkpoint_lines(plan: Dict[str, Any]) -> list:
    ck = plan.get("checkpoint")
    if ck is None:
        return []
    return [
        f"checkpoint: {_fmt_bytes(ck['total_bytes'])} ({ck['bytes_per_param']} bytes/param: weights + optimizer), "
        f"{_fmt_bytes(ck['per_rank_bytes'])} written per rank; save ~{ck['save_seconds']:.3g} s at "
        f"{ck['fs_gbps']:g} GB/s (--fs-gbps)"
    ]


def _activation_line(plan: Dict[str, Any]) -> str:
    st = plan["stages"][plan["memory_heaviest_stage"]]
    parts = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in st["activation_breakdown_per_microbatch"].items() if v)
    return (f"activations per micro-batch (recompute {plan['recompute']}): "
            f"{_fmt_bytes(st['activation_bytes_per_microbatch'])} ({parts}) x {st['microbatches_in_flight']} in flight")


def _fit_lines(plan: Dict[str, Any]) -> list:
    dev = plan.get("device")
    if dev is None:
        return ["device: cpu (no memory limit checked)"]
    verdict = "fits" if dev["fits"] else "DOES NOT FIT"
    return [
        f"device {dev['name']}: {_fmt_bytes(dev['memory_bytes'])}, memory per GPU {_fmt_bytes(plan['memory_per_gpu_bytes'])}, "
        f"headroom {_fmt_bytes(dev['headroom_bytes'])} -> {verdict} (needs >= {_fmt_bytes(dev['reserve_bytes'])} free "
        "for CUDA context, NCCL buffers, fragmentation)"
    ]


def format_engine(fields: Dict[str, Any]) -> str:
    """Readable rendering of models.engine_config.engine_fields: one `section.field = value` a line."""
    lines = [f"device {fields['device']}, layer spec {fields['spec']}, FP8 backend {fields['fp8_backend'] or 'off'}"]
    for section in ("TransformerConfig", "DistributedDataParallelConfig", "OptimizerConfig", "te_fp8_recipe", "trainer"):
        values = fields[section]
        lines.append(f"{section}:" + ("" if values else " none"))
        for key, value in (values or {}).items():
            lines.append(f"  {key} = {value}")
    return "\n".join(lines)


def _positive_gbps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give the bandwidth in GB/s, a positive number (e.g. 20)")
    return value


def _warn_beyond_every_device(memory_bytes: float) -> None:
    """Whatever --device says, a plan larger than every GPU of the table cannot run anywhere."""
    largest = largest_device()
    if memory_bytes > largest.memory_gib * GIB:
        print(
            f"warning: memory per GPU {_fmt_bytes(memory_bytes)} exceeds the largest known device "
            f"({largest.name}, {largest.memory_gib:.1f} GiB); raise parallel.tp / parallel.pp, lower "
            "train.micro_batch_size or shrink the model",
            file=sys.stderr,
        )


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    world_size = args.world_size or cfg.launch.nproc_per_node * cfg.launch.nnodes
    if args.device == CUDA_ALIAS:
        args.device = DEFAULT_DEVICE
    run = resolve_for_device(cfg, world_size, args.device)
    if args.engine:
        from nemotron_train.models.engine_config import engine_fields  # imports torch and megatron-core

        fields = engine_fields(run)
        print(json.dumps(fields, indent=2) if args.json else format_engine(fields))
        sys.stdout.flush()
        return 0
    plan = compute_plan(cfg, world_size, device=None if args.device == CPU_DEVICE else get_device(args.device),
                        spec=run.spec)
    plan["checkpoint"] = checkpoint_cost(plan, cfg, args.fs_gbps)
    _warn_beyond_every_device(plan["memory_per_gpu_bytes"])
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
    sys.stdout.flush()
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="show layout, parameter counts, memory and FLOPs of a config without running it",
        description="Compute the pipeline layout, parameter counts, per-GPU memory and model FLOPs of a "
        "config without starting processes or allocating weights.",
    )
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of GPUs (default: launch.nproc_per_node x launch.nnodes)")
    parser.add_argument("--device", type=str.lower, default=DEFAULT_DEVICE, choices=device_names() + (CPU_DEVICE, CUDA_ALIAS),
                        help=f"accelerator the plan is for: memory and peak throughput from the device table "
                        f"(default {DEFAULT_DEVICE}); cpu plans the local spec with no memory limit")
    parser.add_argument("--engine", action="store_true",
                        help="print the megatron-core TransformerConfig / DDP / optimizer fields and the TE FP8 "
                        "recipe the run would use on --device, without building a model")
    parser.add_argument("--fs-gbps", type=_positive_gbps, default=LUSTRE_TYPICAL_GBPS,
                        help="filesystem write bandwidth for the checkpoint save time, GB/s aggregate "
                        f"(default {LUSTRE_TYPICAL_GBPS:g}, a typical shared Lustre figure)")
    parser.set_defaults(func=_run)
