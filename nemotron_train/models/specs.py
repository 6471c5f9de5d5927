"""ModuleSpecs for the hybrid stack. Implementations are chosen here, never in model code;
which spec a run uses is decided once, by `nemotron_train.resolve`.

- `te`: TransformerEngine layer-norm-fused column-parallel / row-parallel linears, TE
  dot-product attention, mcore's `MambaMixer` on mamba-ssm kernels, TE's norm.
- `local`: mcore `ColumnParallelLinear` / `RowParallelLinear` (or their FP8-emulating
  subclasses), our SP-aware `RMSNorm`, SDPA core attention and our pure-torch Mamba-2 mixer.

Both specs produce the same checkpoint keys: the local spec maps its separate norms onto
the names of TE's fused `layer_norm_weight`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from nemotron_train.models.layers import RMSNorm, SDPAttention
from nemotron_train.models.recompute import RecomputeNormMambaLayer, te_mamba_mixer
from nemotron_train.models.stack import HybridStack, HybridStackSubmodules

def local_stack_spec(
    fp8_emulation: bool, layer_context: Callable, init_seed: Optional[int] = None, mixer_params: Optional[dict] = None,
    recompute_modules: Sequence[str] = (),
) -> ModuleSpec:
    """`mixer_params` are the Mamba mixer's own constructor arguments (`d_conv`, `chunk_size`):
    mcore's `MambaLayer` passes it only the config and the width, so they travel in the spec."""
    from nemotron_train.models.mamba_mixer import MambaMixerSubmodules, TorchMambaMixer

    if fp8_emulation:
        from nemotron_train.fp8 import FP8ColumnParallelLinear as col, FP8RowParallelLinear as row
    else:
        col, row = ColumnParallelLinear, RowParallelLinear
    # Selective recompute of the Mamba pieces (attention/MLP layers read it from the config).
    mamba_layer = ModuleSpec(
        module=RecomputeNormMambaLayer,
        params={"recompute_norm": "norm" in recompute_modules},
        submodules=MambaLayerSubmodules(
            norm=RMSNorm,
            mixer=ModuleSpec(
                module=TorchMambaMixer,
                params={**(mixer_params or {}), "recompute_ssm": "mamba" in recompute_modules},
                submodules=MambaMixerSubmodules(in_proj=col, out_proj=row),
            ),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=col, core_attention=SDPAttention, linear_proj=row),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    return ModuleSpec(
        module=HybridStack,
        params={"layer_context": layer_context, "init_seed": init_seed},
        submodules=HybridStackSubmodules(
            mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer, final_norm=RMSNorm
        ),
    )


def te_stack_spec(
    layer_context: Callable, mixer_params: Optional[dict] = None, recompute_modules: Sequence[str] = ()
) -> ModuleSpec:
    """The GPU spec. Not exercised in CI (no TE/mamba-ssm there); see docs/gpu-validation.md.
    `mixer_params` as in `local_stack_spec`."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules

    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            mixer=ModuleSpec(
                module=te_mamba_mixer(),
                params={**(mixer_params or {}), "recompute_ssm": "mamba" in recompute_modules},
                submodules=MambaMixerSubmodules(in_proj=TELayerNormColumnParallelLinear, out_proj=TERowParallelLinear),
            ),
            mamba_bda=get_bias_dropout_add,
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return ModuleSpec(
        module=HybridStack,
        params={"layer_context": layer_context},
        submodules=HybridStackSubmodules(
            mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer, final_norm=TENorm
        ),
    )
