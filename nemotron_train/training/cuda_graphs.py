"""CUDA graphs of whole layers through TransformerEngine (`performance.cuda_graph_impl:
transformer_engine`), captured as Megatron's training loop does: the first
`cuda_graph_warmup_steps` steps run eagerly (allocator and autotuning settle), then
megatron-core's `TECudaGraphHelper` captures the layers of `cuda_graph_scope` once and, with
overlapped parameter all-gather, moves the gather hooks of the graphed layers to its manual ones.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class CudaGraphCapture:
    """Call `after_step(step)` after every training step; captures once, after the warm-up.

    `helper_factory` builds the capture helper (megatron-core's TECudaGraphHelper by default)."""

    def __init__(self, run: Any, model: Any, tcfg: Any, optimizer: Any,
                 helper_factory: Optional[Callable[..., Any]] = None) -> None:
        perf = run.performance
        self.enabled = perf.cuda_graph_impl == "transformer_engine"
        self.warmup_steps = perf.cuda_graph_warmup_steps
        self.manual_hooks = perf.overlap_param_gather
        self.helper = None
        self.captured_at: Optional[int] = None
        if self.enabled:
            if helper_factory is None:
                from megatron.core.transformer.cuda_graphs import TECudaGraphHelper as helper_factory
            t = run.cfg.train
            self.helper = helper_factory(model=[model], config=tcfg, seq_length=t.seq_length,
                                         micro_batch_size=t.micro_batch_size, optimizers=[optimizer])

    def after_step(self, step: int, first_step: int = 0) -> bool:
        """Capture when `warmup_steps` steps of this process have run; returns whether it did."""
        if not self.enabled or self.captured_at is not None or step - first_step < self.warmup_steps:
            return False
        self.helper.create_cudagraphs()
        if self.manual_hooks:
            self.helper.cuda_graph_set_manual_hooks()
        self.captured_at = step
        return True
