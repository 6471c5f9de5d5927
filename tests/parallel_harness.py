"""Per-rank worker for layout-equivalence tests (run under torchrun, or alone as one rank).

    python tests/parallel_harness.py init   --out DIR [overrides]   # seed weights, save them
    python tests/parallel_harness.py run    --weights DIR --out DIR [overrides]

`run` loads the saved weights into the requested layout (dist_checkpointing reshards them),
runs one forward-backward through megatron-core's schedule (1F1B when PP > 1) on a fixed
global batch, and writes: the loss (`result.json`), the full logits when PP == 1
(`logits.pt`), and the gradients as a sharded checkpoint (`grads/`), which the test reads
back as full tensors, so every layout is compared in the same, unsharded form.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

SMOKE_MODEL = [
    "model.pattern=M*-M-",
    "model.num_layers=5",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.kv_channels=8",
    "model.mamba_num_heads=8",
    "model.mamba_head_dim=8",
    "model.mamba_state_dim=8",
    "model.mamba_num_groups=2",
    "model.chunk_size=8",
    # 61 ids (not divisible by TP 2) in 64 rows in every layout (a multiple of 32 x TP for TP 1
    # and 2): the padding rows take part in the loss alike, so the layouts must still agree.
    "model.vocab_size=61",
    "model.make_vocab_size_divisible_by=32",
    "model.spec=local",
    "train.seq_length=24",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "optimizer.use_distributed_optimizer=false",
    "data.source=mock",  # the harness feeds its own batches; a valid run config needs a source
]


def global_batch(cfg):
    g = torch.Generator().manual_seed(99)
    t = cfg.train
    tokens = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def micro_batches(cfg, dp_rank: int, dp_size: int):
    tokens, labels = global_batch(cfg)
    per_rank = cfg.train.global_batch_size // dp_size
    tokens, labels = tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank], labels[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    mbs = cfg.train.micro_batch_size
    pos = torch.arange(cfg.train.seq_length).expand(mbs, -1)
    for i in range(0, per_rank, mbs):
        yield {
            "tokens": tokens[i : i + mbs],
            "labels": labels[i : i + mbs],
            "loss_mask": torch.ones(mbs, cfg.train.seq_length),
            "position_ids": pos,
        }


def setup(overrides):
    from nemotron_train.config import load_config
    from nemotron_train.distributed.groups import init_process_groups
    from nemotron_train.models.build import build_model
    from nemotron_train.platform import setup_platform
    from nemotron_train.resolve import resolve_run

    cfg = load_config(None, SMOKE_MODEL + list(overrides))
    run = resolve_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    platform = setup_platform()
    pgs = init_process_groups(cfg, platform)
    torch.manual_seed(cfg.train.seed)
    model = build_model(run, pgs)
    return cfg, pgs, model


def cmd_init(args):
    from megatron.core import dist_checkpointing

    cfg, pgs, model = setup(args.overrides)
    # Non-trivial norms and SSM parameters, so the comparison exercises them too.
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if p.dim() == 1 and not os.environ.get("HARNESS_RAW_INIT"):
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    dist_checkpointing.save(model.sharded_state_dict(), args.out)


def wrap_for_schedule(cfg, model, pgs):
    """DDP-wrap `model` as the trainer does; return it with a function that runs one step's
    forward-backward over the global batch (mcore's schedule) and returns the reduced loss."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemotron_train.training.optim import wrap_ddp
    from nemotron_train.training.step import forward_step, reduce_loss

    tcfg = model.config
    tcfg.calculate_per_token_loss = True
    ddp = wrap_ddp(cfg, model, tcfg, pgs)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = ddp.no_sync
    dp_rank, dp_size = pgs.dp.rank(), pgs.dp.size()
    num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size)

    def train_step():
        ddp.zero_grad_buffer()
        out = get_forward_backward_func()(
            forward_step_func=partial(forward_step, torch.device("cpu")),
            data_iterator=micro_batches(cfg, dp_rank, dp_size),
            model=[ddp],
            num_microbatches=num_micro,
            seq_length=cfg.train.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
        )
        return reduce_loss(out, pgs, torch.device("cpu"))

    return ddp, train_step


def cmd_run(args):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    cfg, pgs, model = setup(args.overrides)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.weights))
    _, train_step = wrap_for_schedule(cfg, model, pgs)
    dp_rank, dp_size = pgs.dp.rank(), pgs.dp.size()
    loss = train_step()
    out = Path(args.out)
    if pgs.pp.size() == 1:
        _save_logits(cfg, model, out, dp_rank, dp_size)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    (out / "grads").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(out / "grads"))
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({"loss": loss}))


def _save_logits(cfg, model, out: Path, dp_rank: int, dp_size: int):
    import torch.distributed as dist

    tokens, _ = global_batch(cfg)
    pos = torch.arange(cfg.train.seq_length).expand(tokens.shape[0], -1)
    with torch.no_grad():
        logits = model(tokens, pos, None, runtime_gather_output=True)
    if dist.get_rank() == 0:
        torch.save(logits, out / "logits.pt")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["init", "run"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights")
    parser.add_argument("overrides", nargs="*")
    args, unknown = parser.parse_known_args()
    args.overrides = list(args.overrides) + unknown
    os.makedirs(args.out, exist_ok=True)
    (cmd_init if args.mode == "init" else cmd_run)(args)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
