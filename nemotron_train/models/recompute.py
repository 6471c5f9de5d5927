"""Activation recomputation for the hybrid stack, through megatron-core's own checkpoints.

- Full recompute (`HybridStack`): a chunk of layers runs under `tensor_parallel.checkpoint`
  (TE's checkpoint when TE runs FP8, as mcore's TransformerBlock does), so only the chunk's
  input is kept; the RNG states (CPU, CUDA and the TP tracker) are replayed on recompute.
  Under sequence parallelism that input is already the rank's sequence shard.
- Selective recompute inside the layers:
    core_attn, mlp, norm of attention/MLP layers: mcore's TransformerLayer/Attention (we set
      `recompute_modules` on the TransformerConfig, see `mcore_recompute_kwargs`);
    mamba: conv1d, SSD scan and gated norm recomputed from the in_proj output (the mixers
      wrap their SSM step with `checkpoint_ssm`); out_proj keeps its own input;
    norm of Mamba layers: `RecomputeNormMambaLayer` (with the te spec the norm is fused into
      in_proj, as for attention/MLP layers, and there is nothing separate to recompute).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import deprecate_inference_params

# Our module names -> mcore's `recompute_modules` names (mamba is ours alone).
MCORE_MODULES = {"core_attn": "core_attn", "mlp": "mlp", "norm": "layernorm"}


def mcore_recompute_kwargs(granularity: str, method: str, num_layers: int, modules: Sequence[str],
                           spec: str = "local") -> Dict:
    """TransformerConfig fields for a `recompute` section. `full` is carried out by
    HybridStack (which reads these fields, as mcore's TransformerBlock does); `selective`
    by mcore's layers for the modules it knows. The te spec fuses the pre-norms into the next
    linear, so `norm` has nothing to recompute there and is not passed on (mcore would refuse
    it with FP8 delayed scaling)."""
    if granularity == "full":
        return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=num_layers)
    if granularity == "selective":
        wanted = [m for m in modules if m in MCORE_MODULES and not (spec == "te" and m == "norm")]
        return dict(recompute_granularity="selective", recompute_modules=[MCORE_MODULES[m] for m in wanted])
    return {}


def fix_checkpoint_without_output() -> None:
    """mcore 0.16's `CheckpointWithoutOutput(fp8=False)` sets `self.fp8 = fp8 is not None`,
    i.e. True, and then calls TransformerEngine's FP8 state manager, which is undefined
    without TE: every norm recompute (TransformerLayer's included) fails on a TE-less
    install. Without TE there is no FP8 autocast to replay, so FP8 handling is switched off
    there; with TE the class is left as it is."""
    from megatron.core.tensor_parallel import random as mcore_random

    cls = mcore_random.CheckpointWithoutOutput
    if mcore_random.HAVE_TE or getattr(cls, "_fp8_needs_te_fixed", False):
        return
    original_init = cls.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = False

    cls.__init__ = __init__
    cls._fp8_needs_te_fixed = True


def checkpoint_chunk(config: TransformerConfig, tp_group, run: Callable, *args):
    """Run `run(*args)` keeping only `args` for backward (full recompute of a chunk)."""
    if config.fp8:
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(
            run, config.distribute_saved_activations, tensor_parallel.random.get_cuda_rng_tracker, tp_group, *args
        )
    return tensor_parallel.checkpoint(run, config.distribute_saved_activations, *args)


def recomputed_chunks(num_layers: int, method: Optional[str], chunk: Optional[int]):
    """(start, stop, checkpointed) spans covering a stage's `num_layers` layers.

    uniform: consecutive chunks of `chunk` layers, each checkpointed (the last may be short);
    block: the first `chunk` layers checkpointed one by one, the rest run plainly."""
    if method is None:
        return [(0, num_layers, False)]
    if method == "uniform":
        return [(i, min(i + chunk, num_layers), True) for i in range(0, num_layers, chunk)]
    assert method == "block", method
    first = min(chunk, num_layers)
    spans = [(i, i + 1, True) for i in range(first)]
    return spans + ([(first, num_layers, False)] if first < num_layers else [])


def checkpoint_ssm(ssm: Callable[[torch.Tensor], torch.Tensor], zxBCdt: torch.Tensor, enabled: bool) -> torch.Tensor:
    """The mixer's SSM step (conv, scan, gated norm) from the in_proj output, recomputed in
    backward when `enabled`: only the in_proj output is kept for it."""
    if not enabled or not torch.is_grad_enabled():
        return ssm(zxBCdt)
    return tensor_parallel.checkpoint(ssm, False, zxBCdt)


class RecomputeNormMambaLayer(MambaLayer):
    """mcore's MambaLayer, with its pre-norm output dropped after the mixer consumed it and
    recomputed from the layer input in backward (mcore's CheckpointWithoutOutput, as
    TransformerLayer does for its norms)."""

    def __init__(self, *args, recompute_norm: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute_norm = recompute_norm

    def forward(self, hidden_states, attention_mask=None, inference_context=None, rotary_pos_emb=None, *,
                inference_params=None, packed_seq_params=None):
        if not (self.recompute_norm and torch.is_grad_enabled()):
            return super().forward(hidden_states, attention_mask, inference_context, rotary_pos_emb,
                                   inference_params=inference_params, packed_seq_params=packed_seq_params)
        inference_context = deprecate_inference_params(inference_context, inference_params)
        residual = hidden_states.to(torch.float32) if self.residual_in_fp32 else hidden_states
        hidden_states = hidden_states.to(dtype=self.config.params_dtype)
        norm_checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
        normed = norm_checkpoint.checkpoint(self.norm, hidden_states)
        mixer_out_with_bias = self.mixer(normed, inference_context=inference_context, packed_seq_params=packed_seq_params)
        # Free the norm output now; it is rebuilt when the mixer output's gradient arrives.
        norm_checkpoint.discard_output_and_register_recompute(mixer_out_with_bias[0])
        with self.bias_dropout_add_exec_handler():
            return self.mamba_bda(training=self.training, fused=self.config.bias_dropout_fusion)(
                mixer_out_with_bias, residual, self.hidden_dropout
            )


def te_mamba_mixer():
    """mcore's MambaMixer (mamba-ssm kernels) with the same SSM-step recompute as ours.
    Built on first use: importing mcore's mixer needs Triton and mamba-ssm."""
    global _TEMambaMixer
    if _TEMambaMixer is None:
        from megatron.core.ssm.mamba_mixer import MambaMixer

        class RecomputeMambaMixer(MambaMixer):
            def __init__(self, *args, recompute_ssm: bool = False, **kwargs):
                super().__init__(*args, **kwargs)
                self.recompute_ssm = recompute_ssm

            def _ssm_training(self, zxBCdt, packed_seq_params=None):
                parent = super()._ssm_training
                return checkpoint_ssm(lambda t: parent(t, packed_seq_params), zxBCdt, self.recompute_ssm)

        _TEMambaMixer = RecomputeMambaMixer
    return _TEMambaMixer


_TEMambaMixer = None
