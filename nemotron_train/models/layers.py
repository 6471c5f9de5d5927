"""Pure-torch building blocks for the `local` layer spec.

- `RMSNorm`: megatron-core's torch norm refuses sequence parallelism; this one supports it
  by marking its weight `sequence_parallel` so mcore reduces its grad across TP ranks.
- `SDPAttention`: core attention through `F.scaled_dot_product_attention`, with the same
  constructor and call signature as mcore's `DotProductAttention`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as TE and Nemotron-H's reference do."""
    # Always a copy (also for fp32 input): `x` then has one consumer here, so its gradient is
    # summed in the same order whether or not the norm is recomputed (bitwise-equal runs).
    # The copy replaces `x` among the saved tensors, so memory is unchanged.
    x32 = x.to(torch.float32, copy=True)
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


class RMSNorm(torch.nn.Module):
    """RMSNorm with mcore's norm constructor `(config, hidden_size, eps)`."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: Optional[float] = None):
        super().__init__()
        self.config = config
        # mcore's MambaLayer builds its norm without `eps`: take model.norm_epsilon from the
        # config then, as TE's norm does.
        self.eps = config.layernorm_epsilon if eps is None else eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # With SP each TP rank sees a different slice of the sequence, so the weight's grad
        # is partial per rank and must be all-reduced over TP (mcore's finalize_model_grads).
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


class SDPAttention(MegatronModule):
    """Causal core attention over [s, b, heads, dim] tensors with GQA, via torch SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention does not support packed sequences or attention bias; use the te spec")
        s, b = query.shape[0], query.shape[1]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.num_heads != self.num_groups:
            rep = self.num_heads // self.num_groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, self.num_heads * self.head_dim)
