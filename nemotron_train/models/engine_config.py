"""What a run hands megatron-core (and TransformerEngine), computed in one place.

`engine_fields(run)` is the exact set of `TransformerConfig`, `DistributedDataParallelConfig`
and `OptimizerConfig` fields, plus the TE FP8 recipe, of a resolved run. The trainer builds
its configs from the same functions (`transformer_kwargs` in build.py, `ddp_kwargs`,
`optimizer_kwargs` here) and `nemotron-train plan --engine` prints them, without building a
model, so what a plan shows is what a run gets.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from nemotron_train.fp8.te import te_recipe_kwargs
from nemotron_train.resolve import ResolvedRun

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def performance_transformer_kwargs(run: ResolvedRun) -> Dict[str, Any]:
    """TransformerConfig fields from `performance.*` (fusions, TP overlap, CUDA graphs)."""
    perf = run.performance
    return dict(
        gradient_accumulation_fusion=perf.gradient_accumulation_fusion,
        masked_softmax_fusion=perf.masked_softmax_fusion,
        persist_layer_norm=perf.persist_layer_norm,
        cross_entropy_loss_fusion=perf.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=perf.cross_entropy_fusion_impl,
        tp_comm_overlap=perf.tp_comm_overlap,
        tp_comm_bootstrap_backend=perf.tp_comm_bootstrap_backend,
        cuda_graph_impl=perf.cuda_graph_impl,
        cuda_graph_scope=list(perf.cuda_graph_scope),
        cuda_graph_warmup_steps=perf.cuda_graph_warmup_steps,
    )


def ddp_kwargs(run: ResolvedRun) -> Dict[str, Any]:
    """DistributedDataParallelConfig fields."""
    cfg, perf = run.cfg, run.performance
    fp8 = cfg.precision.fp8
    return dict(
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=perf.overlap_grad_reduce,
        overlap_param_gather=perf.overlap_param_gather,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        check_for_large_grads=cfg.resilience.check_large_grads,  # reported through the rerun state machine
        # None: megatron-core's default (max(40M, 1M x DP) elements with overlap, else one bucket).
        bucket_size=perf.bucket_size,
        average_in_collective=perf.average_in_collective,
        # FP8 weights are all-gathered as FP8 (half the bytes) when TE keeps them in FP8.
        fp8_param_gather=run.fp8_backend == "te" and fp8.fp8_param_gather,
    )


def optimizer_kwargs(run: ResolvedRun) -> Dict[str, Any]:
    """megatron-core OptimizerConfig fields."""
    cfg = run.cfg
    o = cfg.optimizer
    bf16 = cfg.precision.params_dtype == "bf16"
    return dict(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
        # With overlapped parameter all-gather the gather of step t+1 starts during step t's
        # forward; the optimizer must know (megatron-core reads it from here too).
        overlap_param_gather=run.performance.overlap_param_gather,
    )


def te_recipe_fields(run: ResolvedRun) -> Optional[Dict[str, Any]]:
    """The TE FP8 recipe (class name and arguments); None unless FP8 runs through TE."""
    if run.fp8_backend != "te":
        return None
    name, kwargs = te_recipe_kwargs(run.cfg.precision.fp8)
    return {"class": f"transformer_engine.common.recipe.{name}", **kwargs}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if callable(value):
        return getattr(value, "__name__", repr(value))
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def engine_fields(run: ResolvedRun) -> Dict[str, Any]:
    """Everything megatron-core and TE would be given, as JSON-ready values."""
    from nemotron_train.models.build import transformer_kwargs

    return {
        "device": run.device_type,
        "spec": run.spec,
        "fp8_backend": run.fp8_backend,
        "TransformerConfig": {k: _jsonable(v) for k, v in transformer_kwargs(run).items()},
        "DistributedDataParallelConfig": {k: _jsonable(v) for k, v in ddp_kwargs(run).items()},
        "OptimizerConfig": {k: _jsonable(v) for k, v in optimizer_kwargs(run).items()},
        "te_fp8_recipe": te_recipe_fields(run),
        "trainer": {
            "manual_gc": run.performance.manual_gc,
            "manual_gc_interval": run.performance.manual_gc_interval,
            "torch_compile": run.performance.torch_compile,
        },
    }


def init_tp_comm_overlap(run: ResolvedRun, te_module: Any = None) -> bool:
    """Create TE's userbuffers for TP communication overlap (before any TE layer is built),
    as Megatron does at startup: one buffer set for [seq_length x micro_batch, hidden].
    Returns whether it did; `te_module` stands in for `transformer_engine.pytorch` in tests."""
    if not run.performance.tp_comm_overlap:
        return False
    if te_module is None:
        import transformer_engine.pytorch as te_module
    cfg = run.cfg
    shape = [cfg.train.seq_length * cfg.train.micro_batch_size, cfg.model.hidden_size]
    te_module.module.base.initialize_ub(
        shape=shape,
        tp_size=cfg.parallel.tp,
        use_fp8=run.fp8_backend == "te",
        bootstrap_backend=run.performance.tp_comm_bootstrap_backend,
    )
    return True
