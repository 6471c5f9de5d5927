"""`performance.*`: which speed settings a run gets on the platform it runs on.

Pure logic (no torch): the resolver calls `resolve_performance` once with what it found
(device type, resolved layer spec, TE version) and every consumer reads the result. A key
left `None` in the config becomes on where the platform supports it and off elsewhere; a
key forced on where it cannot run is a ConfigError naming the key and the way out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from nemotron_train.config.schema import Config
from nemotron_train.errors import ConfigError

# Fused paths that exist only as CUDA kernels in TE (or apex); on the local spec or on CPU
# mcore would either fail at the first forward or silently fall back.
GPU_ONLY_FLAGS = ("gradient_accumulation_fusion", "persist_layer_norm", "masked_softmax_fusion", "tp_comm_overlap")

# TE before 2.8 builds TP-overlap userbuffers for FP8 GEMMs only; layers kept in BF16
# (precision.fp8.first_last_layers_bf16) then run BF16 GEMMs through FP8 buffers and fail.
TP_OVERLAP_BF16_LAYERS_MIN_TE = "2.8"


@dataclass(frozen=True)
class Performance:
    """Resolved `performance.*`: every switch a concrete value."""

    overlap_grad_reduce: bool
    overlap_param_gather: bool
    bucket_size: Optional[int]
    average_in_collective: bool
    gradient_accumulation_fusion: bool
    persist_layer_norm: bool
    masked_softmax_fusion: bool
    cross_entropy_loss_fusion: bool
    cross_entropy_fusion_impl: str
    tp_comm_overlap: bool
    tp_comm_bootstrap_backend: str
    cuda_graph_impl: str
    cuda_graph_scope: Tuple[str, ...]
    cuda_graph_warmup_steps: int
    manual_gc: bool
    manual_gc_interval: int
    torch_compile: bool

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["cuda_graph_scope"] = list(self.cuda_graph_scope)
        return d


def _version_at_least(found: str, minimum: str) -> bool:
    from packaging.version import Version

    return Version(Version(found).base_version) >= Version(minimum)


def _gpu_reason(device_type: str, spec: str) -> Optional[str]:
    """Why GPU-only fusions cannot run here; None when they can."""
    if device_type != "cuda":
        return "this run is on CPU"
    if spec != "te":
        return "the layers use model.spec=local (pure torch, no TE/apex kernels)"
    return None


def resolve_performance(cfg: Config, device_type: str, spec: str, te_version: Optional[str] = None) -> Performance:
    """Concrete `performance.*` for a run on `device_type` with the resolved layer `spec`."""
    p, par = cfg.performance, cfg.parallel
    gpu_reason = _gpu_reason(device_type, spec)
    on_gpu = gpu_reason is None
    dist_opt = cfg.optimizer.use_distributed_optimizer

    for key in GPU_ONLY_FLAGS:
        if getattr(p, key) and not on_gpu:
            raise ConfigError(
                f"performance.{key}=true needs CUDA with the te layer spec, but {gpu_reason}; "
                f"remove it or set performance.{key}=false"
            )
    if p.cuda_graph_impl != "none" and not on_gpu:
        raise ConfigError(
            f"performance.cuda_graph_impl={p.cuda_graph_impl} needs CUDA with the te layer spec, but {gpu_reason}; "
            "set performance.cuda_graph_impl=none"
        )
    if p.cross_entropy_fusion_impl == "te" and p.cross_entropy_loss_fusion and not on_gpu:
        raise ConfigError(
            f"performance.cross_entropy_fusion_impl=te needs TransformerEngine on CUDA, but {gpu_reason}; "
            "use performance.cross_entropy_fusion_impl=native"
        )
    if p.overlap_param_gather and not dist_opt:
        raise ConfigError(
            "performance.overlap_param_gather=true gathers the distributed optimizer's parameter shards; "
            "set optimizer.use_distributed_optimizer=true or performance.overlap_param_gather=false"
        )
    if p.overlap_param_gather and p.overlap_grad_reduce is False:
        raise ConfigError(
            "performance.overlap_param_gather=true needs performance.overlap_grad_reduce (megatron-core overlaps "
            "both or neither); set performance.overlap_grad_reduce=true"
        )
    if p.average_in_collective:
        raise ConfigError(
            "performance.average_in_collective=true averages gradients over data-parallel ranks in the collective; "
            "the loss here is a per-token mean over the global batch (gradients are already divided by the global "
            "token count), so that would divide them by the DP size twice. Set performance.average_in_collective=false"
        )
    if p.bucket_size is not None and p.bucket_size <= 0:
        raise ConfigError(f"performance.bucket_size={p.bucket_size} must be a positive number of elements (or unset)")
    if p.manual_gc and p.manual_gc_interval < 0:
        raise ConfigError(f"performance.manual_gc_interval={p.manual_gc_interval} must be >= 0 (0: never collect)")
    if p.cuda_graph_warmup_steps < 0:
        raise ConfigError(f"performance.cuda_graph_warmup_steps={p.cuda_graph_warmup_steps} must be >= 0")

    tp_overlap_possible = on_gpu and par.tp > 1 and par.sp
    if p.tp_comm_overlap and not tp_overlap_possible:
        raise ConfigError(
            f"performance.tp_comm_overlap=true overlaps sequence-parallel communication with GEMMs; it needs "
            f"parallel.tp > 1 and parallel.sp=true (tp={par.tp}, sp={par.sp}). Set performance.tp_comm_overlap=false"
        )
    tp_comm_overlap = tp_overlap_possible if p.tp_comm_overlap is None else p.tp_comm_overlap
    fp8 = cfg.precision.fp8
    if tp_comm_overlap and fp8.enabled and fp8.first_last_layers_bf16 and te_version is not None:
        if not _version_at_least(te_version, TP_OVERLAP_BF16_LAYERS_MIN_TE):
            raise ConfigError(
                f"performance.tp_comm_overlap with FP8 and precision.fp8.first_last_layers_bf16="
                f"{fp8.first_last_layers_bf16} needs TransformerEngine >= {TP_OVERLAP_BF16_LAYERS_MIN_TE} "
                f"(older TE gives BF16 layers FP8 userbuffers); found {te_version}. Upgrade TE, set "
                "performance.tp_comm_overlap=false, or precision.fp8.first_last_layers_bf16=0"
            )

    def auto(value: Optional[bool], default: bool) -> bool:
        return default if value is None else bool(value)

    overlap_grad = auto(p.overlap_grad_reduce, device_type == "cuda")
    return Performance(
        overlap_grad_reduce=overlap_grad,
        overlap_param_gather=auto(p.overlap_param_gather, device_type == "cuda" and dist_opt and overlap_grad),
        bucket_size=p.bucket_size,
        average_in_collective=p.average_in_collective,
        gradient_accumulation_fusion=auto(p.gradient_accumulation_fusion, on_gpu),
        persist_layer_norm=auto(p.persist_layer_norm, on_gpu),
        masked_softmax_fusion=auto(p.masked_softmax_fusion, on_gpu),
        cross_entropy_loss_fusion=auto(p.cross_entropy_loss_fusion, device_type == "cuda"),
        cross_entropy_fusion_impl=p.cross_entropy_fusion_impl,
        tp_comm_overlap=tp_comm_overlap,
        tp_comm_bootstrap_backend=p.tp_comm_bootstrap_backend,
        cuda_graph_impl=p.cuda_graph_impl,
        cuda_graph_scope=tuple(p.cuda_graph_scope),
        cuda_graph_warmup_steps=p.cuda_graph_warmup_steps,
        manual_gc=p.manual_gc,
        manual_gc_interval=p.manual_gc_interval,
        torch_compile=auto(p.torch_compile, device_type == "cuda"),
    )
