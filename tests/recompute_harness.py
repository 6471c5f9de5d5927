"""Per-rank worker for the recompute-equivalence test (under torchrun, or alone as one rank).

    python tests/recompute_harness.py --out DIR [layout overrides]

In one process (one set of process groups), for each recompute variant it builds the smoke
model from the same seed, trains it for STEPS steps through megatron-core's schedule (1F1B
when PP > 1; plain SGD on the main grads, so nothing but the forward-backward can differ)
and writes, per rank, `DIR/<variant>.rank<R>.pt` = {"losses": [...], "grads": [per step
{name: this rank's grad shard}]}. The test compares every variant with "none" bitwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parallel_harness import setup, wrap_for_schedule  # noqa: E402

STEPS = 2
LR = 0.5
VARIANTS = {
    "none": [],
    "full_uniform": ["recompute.granularity=full", "recompute.method=uniform", "recompute.num_layers=2"],
    "full_block": ["recompute.granularity=full", "recompute.method=block", "recompute.num_layers=2"],
    "sel_core_attn": ["recompute.granularity=selective", "recompute.modules=[core_attn]"],
    "sel_mlp": ["recompute.granularity=selective", "recompute.modules=[mlp]"],
    "sel_mamba": ["recompute.granularity=selective", "recompute.modules=[mamba]"],
    "sel_norm": ["recompute.granularity=selective", "recompute.modules=[norm]"],
    "sel_all": ["recompute.granularity=selective", "recompute.modules=[core_attn,mlp,mamba,norm]"],
}


def train_variant(overrides):
    import torch.distributed as dist

    cfg, pgs, model = setup(overrides)
    with torch.no_grad():  # non-trivial norms and SSM parameters, as parallel_harness does
        g = torch.Generator().manual_seed(5)
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    _, train_step = wrap_for_schedule(cfg, model, pgs)
    losses, grads = [], []
    for _ in range(STEPS):
        losses.append(train_step())
        grads.append({name: p.main_grad.detach().clone() for name, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(LR * p.main_grad)
    dist.barrier()
    return losses, grads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args, overrides = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch.distributed as dist

    for name in args.variants.split(","):
        losses, grads = train_variant(overrides + VARIANTS[name])
        torch.save({"losses": losses, "grads": grads}, out / f"{name}.rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
